"""`onnx_passes.fold_static_ifs`: `If` nodes whose condition the shapes decide are
replaced by the branch they take; outputs are unchanged; undecided ones stay."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from wenet_moe.export.onnx_passes import fold_static_ifs


def _int(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.array(value, np.int64), name))


def _shape_test(prefix, tensor, axis, op, bound):
    """Nodes computing bool `prefix/cond` = tensor.shape[axis] <op> bound (as the
    TorchScript exporter writes `x.size(axis) > bound`)."""
    return [helper.make_node("Shape", [tensor], [f"{prefix}/shape"]),
            _int(f"{prefix}/axis", axis), _int(f"{prefix}/bound", bound),
            helper.make_node("Gather", [f"{prefix}/shape", f"{prefix}/axis"], [f"{prefix}/dim"], axis=0),
            helper.make_node(op, [f"{prefix}/dim", f"{prefix}/bound"], [f"{prefix}/cmp"]),
            helper.make_node("Cast", [f"{prefix}/cmp"], [f"{prefix}/cond"], to=TensorProto.BOOL)]


def _branch(name, nodes, outputs, initializers=()):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, "T"])
                                               for o in outputs], list(initializers))


def _model():
    """x float (2, T), m bool (1, K) -> four outputs, each through an If:
    a: x.size(0) > 0 (static: then, 2x, with a branch initializer),
    b: m.size(1) > 0 (symbolic K: decided only with a lower bound), then relu(x) else -x,
    c: x.size(1) > 3 (symbolic T: undecided), then x * 3 else x - 1,
    d: x.size(0) == 5 (static: else) whose branch holds an If on x.size(0) >= 2 (then),
       returning a copy of x and one output twice."""
    nodes = _shape_test("a", "x", 0, "Greater", 0)
    two = numpy_helper.from_array(np.array(2.0, np.float32), "a_then/two")
    nodes.append(helper.make_node("If", ["a/cond"], ["a"], name="If_a",
                                  then_branch=_branch("a_then", [helper.make_node("Mul", ["x", "a_then/two"], ["a_then/y"])],
                                                      ["a_then/y"], [two]),
                                  else_branch=_branch("a_else", [helper.make_node("Neg", ["x"], ["a_else/y"])],
                                                      ["a_else/y"])))
    nodes += _shape_test("b", "m", 1, "Greater", 0)
    nodes.append(helper.make_node("If", ["b/cond"], ["b"], name="If_b",
                                  then_branch=_branch("b_then", [helper.make_node("Relu", ["x"], ["b_then/y"])],
                                                      ["b_then/y"]),
                                  else_branch=_branch("b_else", [helper.make_node("Neg", ["x"], ["b_else/y"])],
                                                      ["b_else/y"])))
    nodes += _shape_test("c", "x", 1, "Greater", 3)
    nodes.append(helper.make_node("If", ["c/cond"], ["c"], name="If_c",
                                  then_branch=_branch("c_then", [_int("c_then/i3", 3),
                                                                 helper.make_node("Cast", ["c_then/i3"], ["c_then/f3"], to=TensorProto.FLOAT),
                                                                 helper.make_node("Mul", ["x", "c_then/f3"], ["c_then/y"])],
                                                      ["c_then/y"]),
                                  else_branch=_branch("c_else", [helper.make_node("Abs", ["x"], ["c_else/y"])],
                                                      ["c_else/y"])))
    nodes += _shape_test("d", "x", 0, "Equal", 5)
    inner = _shape_test("e", "x", 0, "GreaterOrEqual", 2) + [helper.make_node(
        "If", ["e/cond"], ["d_else/inner"], name="If_e",
        then_branch=_branch("e_then", [helper.make_node("Sigmoid", ["x"], ["e_then/y"])], ["e_then/y"]),
        else_branch=_branch("e_else", [helper.make_node("Tanh", ["x"], ["e_else/y"])], ["e_else/y"]))]
    nodes.append(helper.make_node("If", ["d/cond"], ["d", "d_outer", "d_again"], name="If_d",
                                  then_branch=_branch("d_then", [helper.make_node("Exp", ["x"], ["d_then/y"]),
                                                                 helper.make_node("Identity", ["x"], ["d_then/x"])],
                                                      ["d_then/y", "d_then/x", "d_then/y"]),
                                  else_branch=_branch("d_else", inner + [helper.make_node("Identity", ["x"], ["d_else/x"])],
                                                      ["d_else/inner", "d_else/x", "d_else/inner"])))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "T"]),
                     helper.make_tensor_value_info("m", TensorProto.BOOL, [1, "K"])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, "T"])
         for o in ("a", "b", "c", "d", "d_outer", "d_again")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model, x, m):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "m": m})


def _ifs(model):
    return sorted(n.name for n in model.graph.node if n.op_type == "If")


def test_static_conditions_fold_and_outputs_stay():
    model = _model()
    folded = onnx.ModelProto.FromString(model.SerializeToString())
    # a, d and then d's inner If (decided once d's branch is inlined); b needs K >= 1
    assert fold_static_ifs(folded) == 3
    assert _ifs(folded) == ["If_b", "If_c"]
    onnx.checker.check_model(folded)
    # a branch's initializer stays an initializer (weights are quantized as such)
    assert "a_then/two" in {t.name for t in folded.graph.initializer}
    assert not any(n.op_type == "Constant" and n.output[0].endswith("two") for n in folded.graph.node)
    # the condition nodes of the folded Ifs are gone with them
    assert not any(n.output[0].startswith(("a/", "d/", "e/")) for n in folded.graph.node)
    rng = np.random.default_rng(0)
    for t, k in ((1, 1), (3, 2), (4, 1), (7, 3)):
        x = rng.standard_normal((2, t)).astype(np.float32)
        m = np.ones((1, k), bool)
        want, got = _run(model, x, m), _run(folded, x, m)
        # (ONNX Runtime returns None for an If's output repeated in its branch)
        for w, g in zip(want[:5], got[:5]):
            np.testing.assert_array_equal(w, g)
        np.testing.assert_allclose(got[0], 2 * x)
        np.testing.assert_allclose(got[3], 1 / (1 + np.exp(-x)), rtol=1e-6)
        np.testing.assert_array_equal(got[4], x)
        np.testing.assert_array_equal(got[5], got[3])


def test_lower_bounds_of_symbolic_dims_decide_more():
    model = _model()
    assert fold_static_ifs(model, {"m": {1: 1}}) == 4
    assert _ifs(model) == ["If_c"]             # T > 3 is not decided by T >= 1
    x = np.array([[-1.0, 2.0], [3.0, -4.0]], np.float32)
    np.testing.assert_array_equal(_run(model, x, np.ones((1, 2), bool))[1], np.maximum(x, 0))


def test_a_bound_that_decides_the_other_way():
    model = _model()
    assert fold_static_ifs(model, {"x": {1: 4}}) == 4       # T >= 4: c takes then
    assert _ifs(model) == ["If_b"]
    x = np.ones((2, 5), np.float32)
    np.testing.assert_array_equal(_run(model, x, np.ones((1, 1), bool))[2], 3 * x)


@pytest.mark.parametrize("op,bound,branch", [("Greater", 2, "else"), ("Less", 3, "then"),
                                             ("LessOrEqual", 1, "else"), ("Equal", 2, "then")])
def test_comparisons(op, bound, branch):
    """x.size(0) == 2: each comparison is decided and takes the branch it names."""
    nodes = _shape_test("t", "x", 0, op, bound)
    nodes.append(helper.make_node("If", ["t/cond"], ["y"], name="If_t",
                                  then_branch=_branch("t_then", [helper.make_node("Exp", ["x"], ["then/y"])], ["then/y"]),
                                  else_branch=_branch("t_else", [helper.make_node("Neg", ["x"], ["else/y"])], ["else/y"])))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "T"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert fold_static_ifs(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Exp" if branch == "then" else "Neg"]


def test_broadcast_bounds_allow_a_dim_of_one():
    """A dim that may be 1 does not bound the broadcast; dims that cannot be 1 are it."""
    from wenet_moe.export.onnx_passes import _broadcast
    assert _broadcast([[(1, 60)], [(0, 0)]]) == [(0, 0)]          # 1 x 0 -> 0
    assert _broadcast([[(0, 50)], [(0, 10)]]) == [(0, 50)]        # 50 x 1 -> 50
    assert _broadcast([[(2, 9)], [(0, 100)], [(1, 1)]]) == [(2, 9)]
    assert _broadcast([[(3, 3), (1, 1)], [(5, 5)]]) == [(3, 3), (5, 5)]
