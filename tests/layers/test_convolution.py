"""Conformer convolution module: causality, cache streaming, padding, errors."""
import pytest
import torch

from wenet_moe.layers.convolution import ConvolutionModule


def init_norm(conv):
    """Non-trivial BatchNorm statistics so eval mode is not the identity."""
    if isinstance(conv.norm, torch.nn.BatchNorm1d):
        conv.norm.running_mean.uniform_(-0.5, 0.5)
        conv.norm.running_var.uniform_(0.5, 2.0)
    return conv.eval()


def reference(conv, x, causal, pad_input=False):
    """Independent computation for one unpadded utterance x (T, D); `pad_input`:
    zero frames are added to the module input (WeNet) instead of the GLU output."""
    d = x.size(1)
    w1, b1 = conv.pointwise_conv1.weight[:, :, 0], conv.pointwise_conv1.bias
    k = conv.depthwise_conv.kernel_size[0]
    left = k - 1 if causal else (k - 1) // 2

    def glu(v):
        h = v @ w1.T + b1
        return h[:, :d] * torch.sigmoid(h[:, d:])  # GLU, (T, D)

    if pad_input:
        padded = glu(torch.cat([torch.zeros(left, d), x, torch.zeros(k - 1 - left, d)]))
    else:
        padded = torch.cat([torch.zeros(left, d), glu(x), torch.zeros(k - 1 - left, d)])
    wd = conv.depthwise_conv.weight[:, 0, :]  # (D, k)
    y = torch.stack([(padded[t:t + k].T * wd).sum(-1) for t in range(x.size(0))])
    y = y + conv.depthwise_conv.bias
    if conv.use_layer_norm:
        y = torch.nn.functional.layer_norm(y, (d,), conv.norm.weight, conv.norm.bias, 1e-5)
    else:
        bn = conv.norm
        y = (y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    y = torch.nn.functional.silu(y)
    return y @ conv.pointwise_conv2.weight[:, :, 0].T + conv.pointwise_conv2.bias


@pytest.mark.parametrize("causal,norm,kernel", [(True, "layer_norm", 4), (False, "batch_norm", 5),
                                                (True, "batch_norm", 3)])
def test_matches_reference(causal, norm, kernel):
    conv = init_norm(ConvolutionModule(6, kernel, norm=norm, causal=causal))
    x = torch.randn(1, 11, 6)
    y, cache = conv(x)
    assert torch.allclose(y[0], reference(conv, x[0], causal), atol=1e-5)
    assert cache.shape == ((1, 6, kernel - 1) if causal else (1, 6, 0))


def test_causal_streaming_with_cache_equals_full():
    conv = init_norm(ConvolutionModule(6, 5, norm="batch_norm", causal=True))
    x = torch.randn(1, 20, 6)
    full, _ = conv(x)
    outs, cache = [], torch.zeros((0, 0, 0))
    no_mask = torch.ones((0, 0, 0), dtype=torch.bool)
    for a, b in [(0, 3), (3, 4), (4, 13), (13, 20)]:
        y, cache = conv(x[:, a:b], no_mask, cache)
        assert cache.shape == (1, 6, 4)
        outs.append(y)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_padding_does_not_leak(causal):
    conv = init_norm(ConvolutionModule(6, 7, causal=causal))
    x = torch.randn(2, 12, 6)
    x[1, 8:] = 50.0  # padding garbage
    mask = torch.tensor([[True] * 12, [True] * 8 + [False] * 4]).unsqueeze(1)
    y, _ = conv(x, mask)
    alone, _ = conv(x[1:, :8])
    assert torch.allclose(y[1, :8], alone[0], atol=1e-5)
    assert not y[1, 8:].any()


def test_pad_input_matches_reference():
    """WeNet's placement, causal: the left context frames pass through
    pointwise_conv1 + GLU, so with a conv1 bias they are GLU(bias), not zeros: the
    outputs differ from the default placement (by a clear margin) and equal the
    independent computation."""
    conv = init_norm(ConvolutionModule(6, 5, norm="layer_norm", causal=True, pad_input=True))
    with torch.no_grad():
        conv.pointwise_conv1.bias.uniform_(0.5, 1.0)
    x = torch.randn(1, 9, 6)
    y, cache = conv(x)
    want = reference(conv, x[0], True, pad_input=True)
    assert torch.allclose(y[0], want, atol=1e-5)
    assert (want - reference(conv, x[0], True, pad_input=False)).abs().max() > 1e-2
    assert torch.equal(cache[0], x[0, -4:].T)  # the last kernel-1 module inputs
    # without a conv1 bias both placements agree: GLU(0 * W + 0) = 0
    with torch.no_grad():
        conv.pointwise_conv1.bias.zero_()
    y, _ = conv(x)
    assert torch.allclose(y[0], reference(conv, x[0], True, pad_input=False), atol=1e-5)


def test_pad_input_noncausal():
    """Symmetric kernel: the depthwise convolution's own zero padding (after the GLU)
    as by default, but padding frames are masked at the input, so they reach valid
    frames near the end as GLU(bias), as in WeNet."""
    conv = init_norm(ConvolutionModule(6, 5, norm="batch_norm", causal=False, pad_input=True))
    with torch.no_grad():
        conv.pointwise_conv1.bias.uniform_(0.5, 1.0)
    x = torch.randn(2, 12, 6)
    y, _ = conv(x[:1])
    assert torch.allclose(y[0], reference(conv, x[0], False), atol=1e-5)
    x[1, 8:] = 50.0
    mask = torch.tensor([[True] * 12, [True] * 8 + [False] * 4]).unsqueeze(1)
    y, _ = conv(x, mask)
    zeroed = x[1:].clone()
    zeroed[0, 8:] = 0.0
    as_zero_frames, _ = conv(zeroed)
    assert torch.allclose(y[1, :8], as_zero_frames[0, :8], atol=1e-5)
    alone, _ = conv(x[1:, :8])
    assert (y[1, 6:8] - alone[0, 6:8]).abs().max() > 1e-3
    assert not y[1, 8:].any()


def test_pad_input_streaming_and_padding():
    conv = init_norm(ConvolutionModule(6, 5, norm="batch_norm", causal=True, pad_input=True))
    with torch.no_grad():
        conv.pointwise_conv1.bias.uniform_(0.5, 1.0)
    x = torch.randn(2, 20, 6)
    full, _ = conv(x[:1])
    outs, cache = [], torch.zeros((0, 0, 0))
    no_mask = torch.ones((0, 0, 0), dtype=torch.bool)
    for a, b in [(0, 3), (3, 4), (4, 13), (13, 20)]:
        y, cache = conv(x[:1, a:b], no_mask, cache)
        assert cache.shape == (1, 6, 4)
        outs.append(y)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
    # causal: padding at the end cannot reach valid frames
    x[1, 12:] = 50.0
    mask = torch.tensor([[True] * 20, [True] * 12 + [False] * 8]).unsqueeze(1)
    y, _ = conv(x, mask)
    alone, _ = conv(x[1:, :12])
    assert torch.allclose(y[1, :12], alone[0], atol=1e-5)
    assert not y[1, 12:].any()


def test_errors():
    with pytest.raises(ValueError, match="odd cnn_module_kernel"):
        ConvolutionModule(4, 8, causal=False)
    with pytest.raises(ValueError, match="cnn_module_norm"):
        ConvolutionModule(4, 3, norm="group_norm")


def test_scriptable():
    conv = init_norm(ConvolutionModule(6, 4, norm="layer_norm", causal=True))
    s = torch.jit.script(conv)
    x = torch.randn(1, 5, 6)
    cache = torch.randn(1, 6, 3)
    m = torch.ones(1, 1, 5, dtype=torch.bool)
    for a, b in zip(conv(x, m, cache), s(x, m, cache)):
        assert torch.allclose(a, b, atol=1e-6)
