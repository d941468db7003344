"""forward_chunk survives torch.jit.script + the TorchScript-based ONNX exporter with
dynamic chunk/cache lengths (what the export engineer does), and onnxruntime gives
the eager outputs over many chunks, including a shorter last chunk."""
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from test_encoder_common import FEAT, tiny_conformer
from wenet_moe.export.onnx_passes import fold_static_ifs


class _ChunkForward(torch.nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, x: torch.Tensor, offset: int, required_cache_size: int,
                att_cache: torch.Tensor, cnn_cache: torch.Tensor, att_mask: torch.Tensor):
        return self.enc.forward_chunk(x, offset, required_cache_size, att_cache, cnn_cache,
                                      att_mask)


def export(enc, required):
    example = (torch.randn(1, 19, FEAT), 0, required, torch.zeros(2, 2, max(required, 0), 16),
               torch.zeros(2, 1, 16, 3), torch.ones(1, 1, max(required, 0) + 4, dtype=torch.bool))
    f = io.BytesIO()
    torch.onnx.export(torch.jit.script(_ChunkForward(enc)), example, f, dynamo=False,
                      opset_version=17,
                      input_names=["x", "offset", "required_cache_size", "att_cache",
                                   "cnn_cache", "att_mask"],
                      output_names=["out", "r_att_cache", "r_cnn_cache"],
                      dynamic_axes={"x": {1: "T"}, "att_cache": {2: "T_cache"},
                                    "att_mask": {2: "T_keys"}, "out": {1: "T_out"},
                                    "r_att_cache": {2: "T_next"}})
    # the export pipeline's `fold_static_ifs` removes the shape tests the contract
    # decides (the raw graph's unused masking branch fails ONNX shape inference)
    proto = onnx.load_from_string(f.getvalue())
    folded = fold_static_ifs(proto, {"x": {1: 1}, "att_mask": {2: 1}})
    assert folded >= 5 * 2, folded     # five per block at least
    left = [n for n in proto.graph.node if n.op_type == "If"]
    assert len(left) <= 1, [n.name for n in left]   # required_cache_size's sign: an input
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("required", [8, -1])
def test_onnx_forward_chunk_matches_eager(required):
    enc = tiny_conformer()
    sess = export(enc, required)
    xs = torch.randn(1, 140, FEAT)
    cache_len = max(required, 0)
    att, cnn, offset = torch.zeros(2, 2, cache_len, 16), torch.zeros(2, 1, 16, 3), 0
    chunks = 0
    for k, start in enumerate(range(0, xs.size(1) - 6, 16)):
        x = xs[:, start:start + 19]
        t_out = (x.size(1) - 3) // 4
        mask = torch.ones(1, 1, att.size(2) + t_out, dtype=torch.bool)
        if required > 0:
            mask[..., :max(required - 4 * k, 0)] = False
        with torch.no_grad():
            ref = enc.forward_chunk(x, offset, required, att, cnn, mask)
        got = sess.run(None, {"x": x.numpy(), "offset": np.array(offset),
                              "required_cache_size": np.array(required),
                              "att_cache": att.numpy(), "cnn_cache": cnn.numpy(),
                              "att_mask": mask.numpy()})
        for r, g in zip(ref, got):
            assert r.shape == g.shape
            np.testing.assert_allclose(g, r.numpy(), atol=1e-5, rtol=0)
        att, cnn = ref[1], ref[2]
        offset += ref[0].size(1)
        chunks += 1
    assert chunks == 9 and x.size(1) < 19  # the last chunk was shorter
