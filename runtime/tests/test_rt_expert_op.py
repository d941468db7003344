"""The kernel's ONNX Runtime custom op (`wenet_moe.kernel::RoutedExperts`, registered by
`moe_cpu.c`'s RegisterCustomOps): in a session it computes exactly what the kernel's
direct call computes, for each weight type, router and thread count; bad inputs are
errors that name the op and the input; and joining pieces renames what they define
differently."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from wenet_moe.export.expert_split import _join_piece, kernel_op, supplied_initializer
from wenet_moe_runtime import native
from wenet_moe_runtime.expert_encoder import THREADS_INPUT, kernel_op_session

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason=f"no MoE CPU kernel: {native.disabled_reason()}")
E, D, H = 6, 32, 48         # 6 experts: the router's vector groups of 8 and its tail


def _call(weights: str, emb_dim: int, k: int = 2, renormalize: bool = True, activation: str = "swish",
          seed: int = 0) -> native.RoutedExperts:
    rng = np.random.default_rng(seed)
    f = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
    return native.RoutedExperts(native.library(), f(E, emb_dim + D), f(E), f(E, D, H), f(E, H), f(E, H, D),
                                f(E, D), k, renormalize, activation, 1, weights)


def _session(call: native.RoutedExperts, weights: str, threads: int, k: int = 2, renormalize: bool = True,
             activation: str = "swish", attrs=None):
    node, stubs = kernel_op(0, "x", "emb", "y", k, renormalize, activation, weights)
    for key, value in (attrs or {}).items():
        node.attribute.remove(next(a for a in node.attribute if a.name == key))
        node.attribute.append(helper.make_attribute(key, value))
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "op", [helper.make_tensor_value_info("x", f32, ["T", None]),
                       helper.make_tensor_value_info("emb", f32, ["T", None])],
        [helper.make_tensor_value_info("y", f32, ["T", D])],
        stubs + [supplied_initializer(THREADS_INPUT, onnx.TensorProto.INT64)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("wenet_moe.kernel", 1)], ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return kernel_op_session(model.SerializeToString(), [call], options, native.library())


@pytest.mark.parametrize("weights", ["fp32", "bf16", "w8a8"])
@pytest.mark.parametrize("emb_dim", [0, 16])
@pytest.mark.parametrize("threads", [1, 2])
def test_op_equals_the_direct_call(weights, emb_dim, threads):
    call = _call(weights, emb_dim)
    session, _ = _session(call, weights, threads)
    rng = np.random.default_rng(1)
    for n in (0, 1, 3, 16, 61):
        x = rng.standard_normal((n, D)).astype(np.float32)
        emb = rng.standard_normal((n, emb_dim)).astype(np.float32)
        got = session.run(None, {"x": x, "emb": emb})[0]
        want = call(x, emb if emb_dim else None)
        assert got.shape == (n, D)
        np.testing.assert_array_equal(got, want)    # the same C code: thread count and all
        if n:
            assert np.abs(got).max() > 0.05


def test_op_router_variants():
    """Unnormalised gates (switch / speechmoe), one expert, relu."""
    for k, renormalize, activation in ((1, False, "relu"), (2, False, "swish")):
        call = _call("fp32", 0, k, renormalize, activation, seed=3)
        session, _ = _session(call, "fp32", 2, k, renormalize, activation)
        x = np.random.default_rng(4).standard_normal((20, D)).astype(np.float32)
        np.testing.assert_array_equal(session.run(None, {"x": x, "emb": x[:, :0]})[0], call(x))


def test_op_errors_name_the_op_and_the_input():
    call = _call("fp32", 0)
    session, _ = _session(call, "fp32", 1)
    x = np.zeros((4, D + 16), np.float32)       # rows wider than the router's input
    with pytest.raises(Exception, match=r"wenet_moe\.kernel::RoutedExperts: router_t must be"):
        session.run(None, {"x": x, "emb": x[:, :0]})
    x = np.zeros((4, D), np.float32)
    with pytest.raises(Exception, match=r"RoutedExperts: route_emb must hold 4 x 0 values"):
        session.run(None, {"x": x, "emb": np.zeros((4, 3), np.float32)})
    with pytest.raises(Exception, match=r"RoutedExperts: bad attributes k=2 renormalize=1 activation=7"):
        _session(call, "fp32", 1, attrs={"activation": 7})
    # weights held as fp32 but declared bf16: the byte count does not match
    session, _ = _session(call, "fp32", 1, attrs={"weights": 1})
    with pytest.raises(Exception, match=r"RoutedExperts: w1 and w2 must hold 18432 bytes each \(6 x 32 x 48 x 2\)"):
        session.run(None, {"x": x, "emb": x[:, :0]})


def test_join_renames_what_pieces_define_differently():
    """Two pieces each define `scale` (an int8 quantizer's per-piece name) and a copied
    constant `pos`; the later `scale` is renamed, inside an If branch too, and `pos` is
    kept once."""
    f32 = onnx.TensorProto.FLOAT

    def piece(value: float, x: str, out: str, tag: str) -> onnx.GraphProto:
        then = helper.make_graph([helper.make_node("Mul", [x, "scale"], ["t"])], "then", [],
                                 [helper.make_tensor_value_info("t", f32, None)])
        other = helper.make_graph([helper.make_node("Add", [x, "pos"], ["e"])], "else", [],
                                  [helper.make_tensor_value_info("e", f32, None)])
        nodes = [helper.make_node("Constant", [], ["pos"], value=numpy_helper.from_array(np.float32(2.0))),
                 helper.make_node("If", ["flag"], ["y" + tag], then_branch=then, else_branch=other),
                 helper.make_node("Add", ["y" + tag, "scale"], [out], name="add")]
        return helper.make_graph(
            nodes, tag, [helper.make_tensor_value_info(n, f32 if n != "flag" else onnx.TensorProto.BOOL, None)
                         for n in (x, "flag")], [helper.make_tensor_value_info(out, f32, None)],
            [numpy_helper.from_array(np.float32(value), "scale")])

    inits, nodes, order = {}, {}, []
    _join_piece(piece(3.0, "x", "a", "p0"), "p0", inits, nodes, order)
    _join_piece(piece(5.0, "a", "b", "p1"), "p1", inits, nodes, order)
    assert set(inits) == {"scale", "scale@p1"}
    assert [n.op_type for n in order] == ["Constant", "If", "Add", "If", "Add"]     # pos once
    assert order[4].input == ["yp1", "scale@p1"] and order[4].name == "add@p1"
    branch = {a.name: a.g for a in order[3].attribute}
    assert branch["then_branch"].node[0].input == ["a", "scale@p1"]
    assert branch["else_branch"].node[0].input == ["a", "pos"]
    graph = helper.make_graph(order, "joined", [helper.make_tensor_value_info("x", f32, []),
                                                helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("b", f32, None)], list(inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.float32(1.0)
    run = lambda flag: session.run(None, {"x": np.array(x), "flag": np.array(flag)})[0]  # noqa: E731
    assert run(True) == pytest.approx((x * 3 + 3) * 5 + 5)
    assert run(False) == pytest.approx((x + 2 + 3) + 2 + 5)


def test_op_runs_concurrently_on_one_session():
    """The op's work space is per calling thread: two threads running one session at once
    (as ONNX Runtime allows) each get their own inputs' results."""
    import threading
    call = _call("fp32", 16)
    session, _ = _session(call, "fp32", 2)
    rng = np.random.default_rng(5)
    inputs = [(rng.standard_normal((n, D)).astype(np.float32), rng.standard_normal((n, 16)).astype(np.float32))
              for n in (7, 40) for _ in range(6)]
    want = [call(x, e) for x, e in inputs]
    got = [[None] * len(inputs) for _ in range(2)]

    def worker(w: int) -> None:
        for _ in range(5):
            for i in (range(len(inputs)) if w == 0 else reversed(range(len(inputs)))):
                got[w][i] = session.run(None, {"x": inputs[i][0], "emb": inputs[i][1]})[0]

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in range(2):
        for g, v in zip(got[w], want):
            np.testing.assert_array_equal(g, v)
