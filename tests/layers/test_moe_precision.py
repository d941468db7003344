"""moe_conf.expert_precision: bf16 / bf16a / int8 / w8a8 packed experts (eager CPU inference)
against an independent float64 reference on weights (and, for w8a8, expert input rows)
rounded the same way, every kernel kind, activation and router; thread-count
independence; config errors; training and TorchScript untouched."""
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from wenet_moe.config import ConfigError
from wenet_moe.layers import cpu_kernel
from wenet_moe.layers import moe as moe_module
from wenet_moe.layers.moe import MoEFactory
from quantized_reference import bf16_round, int8_round, int8_rows, w8a8_linear

EMPTY = torch.zeros(0)
_CC = os.environ.get("CC") or "cc"
_NO_KERNEL = ("disabled by WENET_MOE_CPU_KERNEL=0" if os.environ.get("WENET_MOE_CPU_KERNEL") == "0"
              else f"no C compiler '{_CC}' on PATH" if shutil.which(_CC) is None else "")
needs_kernel = pytest.mark.skipif(bool(_NO_KERNEL), reason=f"MoE CPU kernel: {_NO_KERNEL}")
needs_onednn = pytest.mark.skipif(not moe_module._ONEDNN_LINEAR,
                                  reason="this torch build has no oneDNN linear ops")
needs_bf16_gemm = pytest.mark.skipif(not moe_module._bf16_gemm_supported(),
                                     reason="oneDNN has no native bf16 GEMM on this CPU")
# dim 48 / hidden 80: 3 and 5 column blocks of 16 (odd: the kernel's single-block tail)
DIM, HIDDEN = 48, 80


def rounded_rows(x64: torch.Tensor, precision: str) -> torch.Tensor:
    """Expert activations as `precision` multiplies them: w8a8 rounds each row (in
    float32) to int8 times its scale, bf16a every value (through float32) to bf16;
    other precisions keep them."""
    if precision == "bf16a":
        return torch.from_numpy(bf16_round(x64.float()))
    if precision != "w8a8":
        return x64
    q, scale = int8_rows(x64.detach().float().numpy())
    return torch.from_numpy(q.astype(np.float64) * scale.astype(np.float64))


def reference(layer, x: torch.Tensor, precision: str) -> torch.Tensor:
    """float64 MoE output with the layer's own routing and its expert weights rounded to
    `precision` (fp32: unrounded; w8a8 also rounds each expert input row, both
    linears'; bf16a, as a bf16 GEMM computes the experts, the input rows, the hidden
    units after the activation (before it too for an activation oneDNN does not fuse:
    not relu, swish or gelu) and the expert outputs); activation by torch in float64,
    gates and the gated sum in float64."""
    flat = x.reshape(-1, x.size(-1))
    _, top_idx, gates = layer.route(flat, EMPTY)
    unfused = not isinstance(layer.activation, (torch.nn.ReLU, torch.nn.SiLU, torch.nn.GELU))
    if precision in ("bf16", "bf16a"):
        w1, w2 = bf16_round(layer.w1), bf16_round(layer.w2)
    elif precision in ("int8", "w8a8"):
        w1, w2 = int8_round(layer.w1), int8_round(layer.w2)
    else:
        w1, w2 = (w.detach().double().numpy() for w in (layer.w1, layer.w2))
    w1, w2 = torch.from_numpy(w1), torch.from_numpy(w2)
    x64 = flat.double()
    out = torch.zeros_like(x64)
    for e in range(layer.n_expert):
        pre = rounded_rows(x64, precision) @ w1[e] + layer.b1[e].double()
        if precision == "bf16a" and unfused:
            pre = rounded_rows(pre, precision)
        y = rounded_rows(layer.activation(pre), precision) @ w2[e] + layer.b2[e].double()
        if precision == "bf16a":
            y = rounded_rows(y, precision)
        for j in range(top_idx.size(1)):
            chosen = (top_idx[:, j] == e).unsqueeze(1)
            out += torch.where(chosen, gates[:, j:j + 1].double() * y, torch.zeros_like(y))
    return out.view(x.shape)


def make(router, k, activation, precision, packed=True, n_expert=5):
    torch.manual_seed(0)
    conf = {"router": router, "packed_experts": packed, "expert_precision": precision}
    return MoEFactory(DIM, HIDDEN, 0.1, activation, n_expert, k, conf, False)().eval()


def warnings_of_two_calls(layer, caplog, key: str):
    """Messages containing `key` that the MoE module logs over two inference calls."""
    x = torch.randn(1, 5, DIM)
    with caplog.at_level(logging.WARNING, logger="wenet_moe.layers.moe"), torch.inference_mode():
        layer(x, EMPTY)
        layer(x, EMPTY)
    return [r.getMessage() for r in caplog.records if key in r.getMessage()]


KINDS = [pytest.param("kernel", marks=needs_kernel), pytest.param("onednn", marks=needs_onednn),
         "values"]


def outputs_by_kind(kind, router, k, activation, precision, monkeypatch):
    """(layer, x (2, 21, D), its output, the output of x's first frame alone), float64,
    of a `precision` layer whose packed experts are of `kind` (checked; "values" is the
    fallback without the C kernel and oneDNN: MKL on rounded copies). 1..25 rows per
    expert."""
    if kind == "values":
        monkeypatch.setattr(cpu_kernel, "library", lambda: None)
        monkeypatch.setattr(moe_module, "_ONEDNN_LINEAR", False)
    layer = make(router, k, activation, precision, packed=True if kind == "values" else kind)
    x = torch.randn(2, 21, DIM)
    with torch.inference_mode():
        assert layer._packed(x.view(-1, DIM))[0] == kind
        got = layer(x, EMPTY).double()
        one = layer(x[:1, :1], EMPTY).double()
    return layer, x, got, one


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ["relu", "swish", "gelu", "tanh"])
@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1), ("speechmoe", 3), ("omni", 2)])
def test_rounded_experts_match_float64_reference(precision, kind, activation, router, k, monkeypatch):
    """Every kind computes with the weights rounded to `precision`: equal to the float64
    reference on independently rounded weights up to fp32 accumulation (1e-5 on outputs
    of size ~1), and far from the unrounded weights' output (> 1e-4: the rounding is
    really applied), but within the rounding's reach (bf16 moves a weight by <= 2^-9 of
    itself, int8 by <= max|w| / 254: outputs by < 3% of their range here).
    "values" is the fallback without the C kernel and oneDNN (MKL on rounded copies)."""
    layer, x, got, one = outputs_by_kind(kind, router, k, activation, precision, monkeypatch)
    want = reference(layer, x, precision)
    unrounded = reference(layer, x, "fp32")
    span = unrounded.abs().max().item()
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, span)
    assert (one - want[:1, :1]).abs().max().item() < 1e-5 * max(1.0, span)
    moved = (got - unrounded).abs().max().item()
    assert 1e-4 < moved < 0.03 * span, (moved, span)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ["relu", "swish", "gelu"])
@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1), ("speechmoe", 3), ("omni", 2)])
def test_w8a8_experts_round_weights_and_rows(kind, activation, router, k, monkeypatch):
    """w8a8: every kind computes with int8 weights AND each expert input row rounded to
    int8 (both linears). Equal to the float64 reference that rounds the same way within
    5e-3 of the output range (a hidden value whose float32 and float64 forms round to
    different integers moves one product by a row step: a few such flips stay below
    that), and at least 3x closer to it than to the weight-only int8 reference (the
    rows really are rounded)."""
    layer, x, got, one = outputs_by_kind(kind, router, k, activation, "w8a8", monkeypatch)
    want = reference(layer, x, "w8a8")
    weight_only = reference(layer, x, "int8")
    span = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err < 5e-3 * span, (err, span)
    assert (one - want[:1, :1]).abs().max().item() < 5e-3 * span
    assert 3 * err < (got - weight_only).abs().max().item()


@pytest.mark.parametrize("kind", [pytest.param("kernel", marks=needs_kernel),
                                  pytest.param("onednn", marks=[needs_onednn, needs_bf16_gemm]), "values"])
@pytest.mark.parametrize("activation", ["relu", "swish", "gelu", "tanh"])
@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1), ("speechmoe", 3), ("omni", 2)])
def test_bf16a_rounds_weights_rows_hidden_and_outputs(kind, activation, router, k, monkeypatch):
    """bf16a: every kind (the kernel rounding in fp32, oneDNN's bf16 GEMM, the MKL
    fallback) computes what a bf16 GEMM does. Against the float64 reference that rounds
    the same way: a value may land one bf16 step (2^-8 relative) away where fp32 and
    float64 sums straddle a rounding boundary, so the largest error stays below 2^-7 of
    the output range and at most 3% of the values differ by more than 1e-6 of it; at
    least 3x closer to it than to the weight-only bf16 reference (the activations
    really are rounded). One frame alone gives what it gives among 42."""
    layer, x, got, one = outputs_by_kind(kind, router, k, activation, "bf16a", monkeypatch)
    want = reference(layer, x, "bf16a")
    weight_only = reference(layer, x, "bf16")
    span = want.abs().max().item()
    err = (got - want).abs()
    assert err.max().item() < 2 ** -7 * span, (err.max().item(), span)
    assert (err > 1e-6 * span).double().mean().item() < 0.03
    assert (one - want[:1, :1]).abs().max().item() < 2 ** -7 * span
    assert 3 * err.max().item() < (got - weight_only).abs().max().item()


@needs_kernel
@needs_onednn
@needs_bf16_gemm
def test_bf16a_takes_the_bf16_gemm_above_the_measured_rows(monkeypatch):
    """packed_experts true with bf16a: the kernel up to `kernel_max_rows` rows per
    expert, oneDNN's bf16 GEMM (bfloat16 packed weights) above it, at one thread too."""
    monkeypatch.setenv("WENET_MOE_KERNEL_MAX_ROWS", "4")
    layer = make("topk", 2, "swish", "bf16a")
    with torch.inference_mode():
        assert layer._packed(torch.zeros(1, DIM), 4.0)[0] == "kernel"
        kind, packs = layer._packed(torch.zeros(1, DIM), 5.0)
    assert kind == "onednn" and len(packs) == layer.n_expert
    assert packs[0][0].dtype == torch.bfloat16 and packs[0][2].dtype == torch.bfloat16
    monkeypatch.delenv("WENET_MOE_KERNEL_MAX_ROWS")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        limit = moe_module.kernel_max_rows(DIM, HIDDEN, "swish", "bf16a")
        assert limit in (0.0, float("inf")) or limit in moe_module._PROBE_ROWS
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_bf16a_without_a_bf16_gemm_stays_on_the_kernel(monkeypatch):
    """A CPU where oneDNN has no native bf16 GEMM (AVX2 only: torch refuses its bf16
    linear there): bf16a takes the kernel at every size and never probes; forced onto
    oneDNN it falls back to fp32 MKL on rounded values, with the same numbers."""
    monkeypatch.setattr(moe_module, "_bf16_gemm_supported", lambda: False)
    monkeypatch.setattr(moe_module, "_KERNEL_MAX_ROWS", {})
    monkeypatch.setattr(moe_module, "_ONEDNN_LINEAR", True)
    assert moe_module.kernel_max_rows(DIM, HIDDEN, "swish", "bf16a") == float("inf")
    assert moe_module._KERNEL_MAX_ROWS == {}
    layer = make("topk", 2, "swish", "bf16a")
    x = torch.randn(1, 300, DIM)
    with torch.inference_mode():
        assert layer._packed(x.view(-1, DIM), 120.0)[0] == "kernel"
        got = layer(x, EMPTY).double()
        layer.packed_experts = "onednn"
        assert layer._packed(x.view(-1, DIM), 120.0)[0] == "values"
        fallback = layer(x, EMPTY).double()
    want = reference(layer, x, "bf16a")
    span = want.abs().max().item()
    for out in (got, fallback):
        assert (out - want).abs().max().item() < 2 ** -7 * span


@needs_kernel
def test_w8a8_kernel_is_exact_integer_arithmetic():
    """The kernel's w8a8 linear equals int64 sums of int8 rows x int8 weights times
    their scales (numpy, `w8a8_linear`) up to the fp32 epilogue (1e-6 relative), for 1 to
    30 rows (every tile size; several tiles), an odd number of column blocks, an
    all-zero row (y = b) and a row whose values tie at .5 (rounded to even)."""
    lib = cpu_kernel.library()
    gen = torch.Generator().manual_seed(3)
    n_expert, k_dim, n_dim = 3, 48, 48
    w = torch.randn(n_expert, k_dim, n_dim, generator=gen) * 0.2
    bias = torch.randn(n_expert, n_dim, generator=gen)
    packed, aux = cpu_kernel.pack_expert_weight(w, "w8a8")
    for counts in ([1, 2, 3], [4, 5, 6], [7, 12, 13], [30, 0, 11]):
        rows = sum(counts)
        x = torch.randn(rows, k_dim, generator=gen) * 3
        x[0] = 0.0
        x[-1] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5] + [0.25] * (k_dim - 6))
        out = torch.full((rows, n_dim), float("nan"))
        cpu_kernel.segment_linear(lib, x, cpu_kernel.segments_of(counts), packed, bias, out, "none", aux)
        start = 0
        for e, c in enumerate(counts):
            if c:
                want = w8a8_linear(x[start:start + c].numpy(), w[e], bias[e].numpy())
                got = out[start:start + c].double().numpy()
                assert np.abs(got - want).max() <= 1e-6 * max(1.0, np.abs(want).max()), (counts, e)
            start += c
        assert torch.equal(out[0], bias[0])                 # zero row: exactly the bias
    q_tie, _ = int8_rows(np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]], dtype=np.float32))
    assert q_tie.tolist() == [[127, 0, 2, 2, 0, -2]]


def test_w8a8_packing_layout_and_sums():
    """pack_weight_q8: q[k][16 j + c] at [j, k // 4, 4 c + k % 4]; aux = column scales,
    then the column sums of q as int32 bits; K must be a multiple of 16."""
    w = torch.randn(2, 32, 48)
    packed, aux = cpu_kernel.pack_expert_weight(w, "w8a8")
    q, scale = cpu_kernel.quantize_int8(w)
    assert packed.dtype == torch.int8 and packed.shape == (2, 3, 8, 64)
    for e, k, n in ((0, 0, 0), (1, 31, 47), (1, 6, 17), (0, 13, 35)):
        assert packed[e, n // 16, k // 4, 4 * (n % 16) + k % 4] == q[e, k, n]
    assert aux.shape == (2, 96) and torch.equal(aux[:, :48], scale)
    assert torch.equal(aux[:, 48:].contiguous().view(torch.int32), q.sum(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="K % 16 == 0"):
        cpu_kernel.pack_expert_weight(torch.randn(1, 20, 16), "w8a8")
    q_rows, scale_rows = cpu_kernel.quantize_rows(torch.tensor([[0.0, 0.0], [2.0, -0.5]]))
    assert q_rows.tolist() == [[0.0, 0.0], [127.0, -32.0]] and scale_rows[0].item() == 0.0


def test_w8a8_without_vnni_warns_once(monkeypatch, caplog):
    """A kernel built without VNNI runs w8a8 by AVX2 vpmaddwd (or shifts), with one warning."""
    if cpu_kernel.library() is None:
        pytest.skip("no C kernel")
    monkeypatch.setattr(cpu_kernel, "int8_dot_kind", lambda: "avx2")
    monkeypatch.setattr(moe_module, "_PRECISION_WARNED", set())
    warnings = warnings_of_two_calls(make("topk", 2, "relu", "w8a8", packed="kernel"), caplog, "w8a8")
    assert len(warnings) == 1 and "without VNNI" in warnings[0] and "vpmaddwd" in warnings[0]


@needs_kernel
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16a", "int8", "w8a8"])
@pytest.mark.parametrize("activation", ["relu", "swish", "gelu"])
def test_kernel_result_does_not_depend_on_threads(precision, activation):
    """1 and 2 torch threads give bit-equal outputs (each frame sums its k rows in slot
    order; a large expert is split into row blocks, not into partial sums)."""
    layer = make("topk", 2, activation, precision, packed="kernel", n_expert=3)
    x = torch.randn(2, 70, DIM)                       # ~93 rows per expert: several blocks
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = layer(x, EMPTY)
            torch.set_num_threads(2)
            two = layer(x, EMPTY)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    want = reference(layer, x, precision)
    tolerance = {"w8a8": 5e-3, "bf16a": 2 ** -7}.get(precision, 0.0) * want.abs().max().item() or 1e-4
    assert (one.double() - want).abs().max().item() < tolerance


@pytest.mark.parametrize("precision", ["bf16", "bf16a", "int8", "w8a8"])
def test_training_autograd_and_torchscript_keep_fp32(precision):
    """expert_precision only touches eager CPU inference: training mode, autograd and
    the scripted (ONNX) path compute with the fp32 parameters."""
    layer = make("topk", 2, "swish", precision, n_expert=4)
    x = torch.randn(1, 9, DIM)
    want = reference(layer, x, "fp32")
    got_grad = layer(x, EMPTY).double()                               # eval, autograd on
    scripted = torch.jit.script(layer)
    with torch.no_grad():
        got_script = scripted(x, EMPTY).double()
        inference = layer(x, EMPTY).double()
    layer.train()
    layer.dropout.p = 0.0
    got_train = layer(x, EMPTY).double()
    for got in (got_grad, got_script, got_train):
        assert (got - want).abs().max().item() < 1e-5
    assert (inference - want).abs().max().item() > 1e-4             # rounded experts in inference


@pytest.mark.parametrize("conf,message", [
    ({"expert_precision": "fp16"}, r"moe_conf.expert_precision: expected one of fp32, bf16, bf16a, int8, w8a8, got 'fp16'"),
    ({"expert_precision": "bf16", "packed_experts": False}, r"moe_conf.expert_precision: bf16 applies to packed"),
])
def test_bad_expert_precision_names_the_key(conf, message):
    with pytest.raises(ConfigError, match=message):
        MoEFactory(16, 32, 0.0, "relu", 4, 2, conf, False)


def test_quantize_int8_and_bf16_packing():
    """int8: symmetric per output column, |w - q*scale| <= scale/2, q in [-127, 127], the
    column's largest |w| maps to +-127, an all-zero column stays 0; bf16 packing keeps
    the layout of fp32 packing and rounds to nearest even."""
    torch.manual_seed(0)
    w = torch.randn(2, 40, 32)
    w[1, :, 5] = 0.0
    q, scale = cpu_kernel.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (2, 32)
    assert int(q.abs().max()) == 127 and int(q[1, :, 5].abs().max()) == 0
    assert torch.all(q.abs().amax(1)[scale != 1] == 127)
    err = (q.float() * scale.unsqueeze(1) - w).abs()
    assert torch.all(err <= scale.unsqueeze(1) / 2 + 1e-7)
    values = cpu_kernel.expert_weight_values(w, "int8").numpy()     # q * scale in fp32
    assert np.array_equal(values, int8_round(w).astype(np.float32))
    assert np.array_equal(cpu_kernel.expert_weight_values(w, "bf16").double().numpy(), bf16_round(w))
    packed, none = cpu_kernel.pack_expert_weight(w, "bf16")
    assert none is None and packed.dtype == torch.bfloat16 and packed.shape == (2, 2, 40, 16)
    assert packed[1, 1, 7, 3].item() == float(bf16_round(w)[1, 7, 19])
    # ties go to even: 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7
    tie = torch.tensor([[[1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8] + [0.0] * 14]])
    assert cpu_kernel.pack_expert_weight(tie, "bf16")[0][0, 0, 0, :2].tolist() == [1.0, 1.0 + 2 ** -6]
    with pytest.raises(ValueError, match="expert precision"):
        cpu_kernel.pack_expert_weight(w, "fp8")


@needs_kernel
def test_kernel_rejects_mismatched_precision_arguments():
    lib = cpu_kernel.library()
    w = torch.randn(1, 16, 16)
    q, scale = cpu_kernel.pack_expert_weight(w, "int8")
    x, out, seg = torch.randn(2, 16), torch.empty(2, 16), torch.tensor([[0], [2], [0]])
    with pytest.raises(ValueError, match="column scales"):
        cpu_kernel.segment_linear(lib, x, seg, q, torch.zeros(1, 16), out)      # int8 without scale
    with pytest.raises(ValueError, match="float32, bfloat16 or int8"):
        cpu_kernel.segment_linear(lib, x, seg, cpu_kernel.pack_weight(w.double()), torch.zeros(1, 16), out)
    cpu_kernel.segment_linear(lib, x, seg, q, torch.zeros(1, 16), out, "none", scale)
    assert torch.allclose(out, x @ cpu_kernel.expert_weight_values(w, "int8")[0], atol=1e-5)


def test_fallback_without_kernel_warns_once(monkeypatch, caplog):
    """No C kernel: bf16 experts run in fp32 on rounded weights, with one warning."""
    monkeypatch.setattr(cpu_kernel, "library", lambda: None)
    monkeypatch.setattr(cpu_kernel, "disabled_reason", lambda: "no C compiler 'cc' on PATH")
    monkeypatch.setattr(moe_module, "_PRECISION_WARNED", set())
    warnings = warnings_of_two_calls(make("topk", 2, "relu", "bf16"), caplog, "expert_precision")
    assert len(warnings) == 1 and "no C compiler" in warnings[0] and "bf16" in warnings[0]
