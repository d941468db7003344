"""`OnnxAsrModel` refuses graphs that do not belong together: a `config_hash`
differing between the graphs it loads (a file of another export) or a
`vocab_size` that is not `units.txt`'s size, with a one-line error naming the
file. Graphs without a `config_hash` (hand-made models) still load. Pass-through
stand-in graphs built with `onnx.helper`: only loading and metadata matter here."""
from __future__ import annotations

import os

import onnx
import pytest
from onnx import TensorProto, helper

from wenet_moe_runtime.model import ModelError, OnnxAsrModel

UNITS = ["<blank>", "<unk>", "a", "b", "c", "<sos/eos>"]
META = {"chunk_size": 4, "left_chunks": -1, "subsampling_rate": 4, "right_context": 6,
        "sos_symbol": 5, "eos_symbol": 5, "output_size": 8, "num_blocks": 1, "head": 2,
        "cnn_module_kernel": 3, "vocab_size": len(UNITS)}
GRAPHS = {  # name -> (inputs, outputs passed through from the first inputs)
    "encoder": (["chunk", "offset", "required_cache_size", "att_cache", "cnn_cache", "att_mask"],
                ["output", "r_att_cache", "r_cnn_cache"]),
    "ctc": (["hidden"], ["probs"]),
    "decoder": (["hyps", "hyps_lens", "encoder_out", "reverse_weight"], ["score", "r_score"]),
}


def write_graph(path, name, meta):
    inputs, outputs = GRAPHS[name]
    float_in = {"encoder": [0, 3, 4], "ctc": [0], "decoder": [2, 2]}[name]
    nodes = [helper.make_node("Identity", [inputs[i]], [o]) for i, o in zip(float_in, outputs)]
    types = {"offset": TensorProto.INT64, "required_cache_size": TensorProto.INT64,
             "att_mask": TensorProto.BOOL, "hyps": TensorProto.INT64,
             "hyps_lens": TensorProto.INT64}
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(i, types.get(i, TensorProto.FLOAT), None)
                      for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.save(model, path)


def write_dir(root, hashes=None, vocab=None, int8_hashes=None):
    """fp32 + int8 stand-in graphs; `hashes`/`int8_hashes`: name -> config_hash
    (absent: no key), `vocab`: name -> vocab_size metadata (None: no key)."""
    os.makedirs(root, exist_ok=True)
    for suffix, table in ((".onnx", hashes or {}), (".int8.onnx", int8_hashes or {})):
        for name in GRAPHS:
            meta = dict(META)
            if name in table:
                meta["config_hash"] = table[name]
            if vocab and name in vocab:
                if vocab[name] is None:
                    del meta["vocab_size"]
                else:
                    meta["vocab_size"] = vocab[name]
            write_graph(os.path.join(root, name + suffix), name, meta)
    with open(os.path.join(root, "units.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{s} {i}\n" for i, s in enumerate(UNITS))
    return root


SAME = {n: "1f2e3d4c5b6a7988" for n in GRAPHS}


def test_graphs_without_or_with_one_config_hash_load(tmp_path):
    for i, hashes in enumerate([{}, SAME, {"encoder": SAME["encoder"]}]):
        d = write_dir(str(tmp_path / str(i)), hashes, int8_hashes=hashes)
        for int8 in (False, True):
            model = OnnxAsrModel(d, int8=int8)
            assert model.info.vocab_size == len(UNITS) and len(model.symbols) == len(UNITS)


def test_mixed_config_hash_names_the_file(tmp_path):
    d = write_dir(str(tmp_path / "m"), dict(SAME, decoder="ffffffffffffffff"),
                  int8_hashes=dict(SAME, ctc="0000000000000000"))
    for int8, bad, value in ((False, "decoder.onnx", "ffffffffffffffff"),
                             (True, "ctc.int8.onnx", "0000000000000000")):
        with pytest.raises(ModelError) as e:
            OnnxAsrModel(d, int8=int8)
        first = os.path.join(d, "encoder.int8.onnx" if int8 else "encoder.onnx")
        assert str(e.value) == (f"{os.path.join(d, bad)}: config_hash {value} differs from "
                                f"{SAME['encoder']} of {first} (graphs of different exports; "
                                f"re-export the whole directory)")
        assert "\n" not in str(e.value)
    # a graph without a hash is not compared: only present hashes must agree
    d = write_dir(str(tmp_path / "partial"), {"encoder": "aaaaaaaaaaaaaaaa"},
                  int8_hashes={"ctc": "aaaaaaaaaaaaaaaa", "decoder": "bbbbbbbbbbbbbbbb"})
    OnnxAsrModel(d)
    with pytest.raises(ModelError, match=r"decoder\.int8\.onnx: config_hash bbbbbbbbbbbbbbbb "
                                         r"differs from aaaaaaaaaaaaaaaa of .*ctc\.int8\.onnx"):
        OnnxAsrModel(d, int8=True)


def test_vocab_size_must_match_units(tmp_path):
    d = write_dir(str(tmp_path / "v"), SAME, vocab={"ctc": len(UNITS) + 2})
    with pytest.raises(ModelError) as e:
        OnnxAsrModel(d)
    assert str(e.value) == (f"{os.path.join(d, 'ctc.onnx')}: metadata vocab_size "
                            f"{len(UNITS) + 2}, but {os.path.join(d, 'units.txt')} has "
                            f"{len(UNITS)} symbols")
    d = write_dir(str(tmp_path / "n"), SAME, vocab={n: None for n in GRAPHS})
    assert OnnxAsrModel(d).info.vocab_size == len(UNITS)  # no key: units.txt's size
