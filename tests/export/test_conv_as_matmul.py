"""`onnx_passes.conv_as_matmul`: convolutions as im2col + MatMul in ONNX, exact, and
only where they qualify (group 1, no padding, enough inputs per output)."""
import io

import numpy as np
import onnx
import pytest
import torch

from wenet_moe.export import onnx_passes
from wenet_moe.export.verify import session


class Convs(torch.nn.Module):
    """Conv2dSubsampling-like stack, a pointwise Conv1d and a depthwise one."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Conv2d(1, 8, 3, 2)           # 9 inputs per output: stays
        self.second = torch.nn.Conv2d(8, 16, 3, (2, 3))    # 72: rewritten
        self.pointwise = torch.nn.Conv1d(16 * 2, 32, 1)    # 32 (or with min_inputs 32)
        self.depthwise = torch.nn.Conv1d(32, 32, 5, groups=32, padding=2)   # stays
        self.nobias = torch.nn.Conv1d(32, 8, 3, bias=False)   # 96: rewritten

    def forward(self, x):
        h = self.second(torch.relu(self.first(x.unsqueeze(1))))
        b, c, t, f = h.shape
        h = h.permute(0, 1, 3, 2).reshape(b, c * f, t)
        return self.nobias(self.depthwise(self.pointwise(h)))


def exported(model):
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.randn(2, 31, 17),), buf, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 1: "t"}}, dynamo=False, opset_version=17)
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("per_tap", [False, True])
@pytest.mark.parametrize("min_inputs,rewritten", [(64, 2), (32, 3)])
def test_rewritten_graph_equals_the_convolutions(min_inputs, rewritten, per_tap):
    """Both forms: im2col columns, or (per_tap, any input channel count) a MatMul per
    kernel tap summed, and a lone MatMul for the 1x1 convolution."""
    torch.manual_seed(0)
    model = Convs().eval()
    proto = exported(model)
    channels = 1 if per_tap else 10 ** 6
    assert onnx_passes.conv_as_matmul(proto, min_inputs=min_inputs, per_tap_channels=channels) == rewritten
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    # per tap: 9 + 3 tap products (+ 1 for the pointwise one) and no columns
    assert ops.count("MatMul") == (12 + (rewritten == 3) if per_tap else rewritten)
    assert ("Sum" in ops) == per_tap
    assert any(n.output[0].endswith("/columns") for n in proto.graph.node) != per_tap
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 5 - rewritten
    names = {t.name for t in proto.graph.initializer}
    assert "second.weight" not in names and "first.weight" in names   # replaced weights dropped
    sess = session(proto.SerializeToString())
    for frames in (15, 16, 31, 64):          # odd and even lengths: the strided slices' ends
        x = torch.randn(2, frames, 17)
        with torch.no_grad():
            want = model(x).numpy()
        got = sess.run(None, {"x": x.numpy()})[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_padded_and_dilated_convolutions_stay():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.padded = torch.nn.Conv1d(32, 32, 3, padding=1)
            self.dilated = torch.nn.Conv1d(32, 32, 3, dilation=2)

        def forward(self, x):
            return self.dilated(self.padded(x.transpose(1, 2)))

    buf = io.BytesIO()
    torch.onnx.export(Odd().eval(), (torch.randn(1, 20, 32),), buf, dynamo=False, opset_version=17)
    proto = onnx.load_from_string(buf.getvalue())
    assert onnx_passes.conv_as_matmul(proto) == 0
