"""The C kernel's code paths for other x86-64 CPUs, built on this one: `-march=haswell`
(AVX2 + FMA: the narrow 6 x 16 tile; w8a8 by `vpmaddwd`), `-march=skylake-avx512`
(AVX-512 without VNNI: w8a8 by `vpmaddwd` in 12-row tiles) and `-march=x86-64` (SSE2:
generic vector code), against a float64 reference for every weight precision, 1 to 14 rows (every narrow
tile size, and several tiles) and an odd number of 16-column blocks."""
import os
import shutil
import subprocess

import pytest
import torch

from wenet_moe.layers import cpu_kernel
from quantized_reference import bf16_round, w8a8_linear

_CC = os.environ.get("CC") or "cc"


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


pytestmark = [
    pytest.mark.skipif(shutil.which(_CC) is None, reason=f"no C compiler '{_CC}'"),
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 builds"),
]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = {}
    tmp = tmp_path_factory.mktemp("kernels")
    needs = {"haswell": {"avx2", "fma"}, "x86-64": set(),
             "skylake-avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}}
    for march, flags_needed in needs.items():
        if not flags_needed <= set(_cpu_flags()):
            continue
        path = tmp / f"moe_cpu_{march}.so"
        flags = cpu_kernel.FLAGS + [f"-march={march}"]
        done = subprocess.run([_CC, *flags, "-o", str(path), str(cpu_kernel.SOURCE)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        out[march] = cpu_kernel.load(path)
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "w8a8"])
@pytest.mark.parametrize("march", ["haswell", "x86-64", "skylake-avx512"])
def test_other_targets_compute_the_reference(builds, march, precision):
    if march not in builds:
        pytest.skip(f"this CPU cannot run a -march={march} build")
    lib = builds[march]
    gen = torch.Generator().manual_seed(1)
    n_expert, k_dim, n_dim = 4, 48, 48              # N: 3 blocks of 16 (odd)
    w = torch.randn(n_expert, k_dim, n_dim, generator=gen) * 0.2
    bias = torch.randn(n_expert, n_dim, generator=gen)
    packed, scale = cpu_kernel.pack_expert_weight(w, precision)
    values = cpu_kernel.expert_weight_values(w, precision).double()
    counts = [1, 6, 14, 12]                        # 1 row, one full tile, several tiles
    rows = sum(counts)
    x = torch.randn(rows, k_dim, generator=gen)
    segments = cpu_kernel.segments_of(counts)
    for activation in ("none", "relu", "swish"):
        out = torch.full((rows, n_dim), float("nan"))
        cpu_kernel.segment_linear(lib, x, segments, packed, bias, out, activation, scale)
        want, start = [], 0
        for e, c in enumerate(counts):
            if precision == "w8a8":      # int8 rows x int8 weights, exact integer sums
                y = torch.from_numpy(w8a8_linear(x[start:start + c].numpy(), w[e], bias[e].numpy()))
            else:
                y = x[start:start + c].double() @ values[e] + bias[e].double()
            if activation == "relu":
                y = y.clamp_min(0)
            elif activation == "swish":
                y = y * torch.sigmoid(y)
            want.append(y)
            start += c
        err = (out.double() - torch.cat(want)).abs().max().item()
        assert err <= 1e-4, (march, precision, activation, err)


@pytest.mark.parametrize("march", ["haswell", "x86-64", "skylake-avx512"])
def test_other_targets_round_bf16a_activations_to_nearest_even(builds, march):
    """`moe_forward`'s bf16a rounding (ACT_BF16) on each build: through one expert whose
    weights are the identity (bf16-exact), the output is each input rounded to bf16 by
    the definition (`bf16_round`: ties to even, e.g. 1 + 2^-8 -> 1, 1 + 3 * 2^-8 ->
    1 + 2^-6), bit for bit; without the flag it is the input itself."""
    if march not in builds:
        pytest.skip(f"this CPU cannot run a -march={march} build")
    lib = builds[march]
    dim = 32
    eye = torch.eye(dim).unsqueeze(0)
    packs = (cpu_kernel.pack_weight(eye), torch.zeros(1, dim), cpu_kernel.pack_weight(eye), torch.zeros(1, dim))
    x = torch.randn(5, dim, generator=torch.Generator().manual_seed(2)) * 100
    x[0, :6] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.0e38, 1e-30, 0.0])
    top_idx, gates = torch.zeros(5, 1, dtype=torch.int64), torch.ones(5, 1)
    rounded = cpu_kernel.moe_forward(lib, x, top_idx, gates, packs, "none", bf16_rows=True)
    assert torch.equal(rounded.double(), torch.from_numpy(bf16_round(x)))
    assert rounded[0, :3].tolist() == [1.0, 1 + 2 ** -6, -1.0]
    assert torch.equal(cpu_kernel.moe_forward(lib, x, top_idx, gates, packs, "none"), x)


def test_target_override_is_checked(monkeypatch):
    monkeypatch.setenv("WENET_MOE_KERNEL_MARCH", "haswell; rm -rf /")
    with pytest.raises(RuntimeError, match="WENET_MOE_KERNEL_MARCH: not a -march value"):
        cpu_kernel.target_arch()
    monkeypatch.setenv("WENET_MOE_KERNEL_MARCH", "")
    assert cpu_kernel.target_arch() == "native"


def test_builds_report_their_int8_dot_path(builds):
    """w8a8's dot products: vpmaddwd on AVX2 and AVX-512 without VNNI, shifts on SSE2;
    the native build names its own (vnni where /proc/cpuinfo has avx512_vnni)."""
    want = {"haswell": 1, "skylake-avx512": 1, "x86-64": 0}
    for march, lib in builds.items():
        assert lib.wm_int8_dot_native() == want[march], march
    if cpu_kernel.library() is not None and {"avx512_vnni", "avx512f"} <= set(_cpu_flags()) \
            and cpu_kernel.target_arch() == "native":
        assert cpu_kernel.int8_dot_kind() == "vnni"


def test_native_build_without_avx2_is_not_used(builds, monkeypatch):
    """Each build reports its vector unit (2 AVX-512, 1 AVX2, 0 generic); a native build
    with the generic code on an x86-64 CPU (no AVX2: ~50x slower than AVX2) is refused
    with a reason, unless the target was asked for explicitly."""
    want = {"haswell": 1, "skylake-avx512": 2, "x86-64": 0}
    for march, lib in builds.items():
        assert lib.wm_vector_isa() == want[march], march
    if "x86-64" not in builds:
        pytest.skip("no -march=x86-64 build")
    monkeypatch.delenv("WENET_MOE_KERNEL_MARCH", raising=False)
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: "x86_64")
    assert "without AVX2" in cpu_kernel._slow_target_reason(builds["x86-64"])
    assert cpu_kernel._slow_target_reason(builds["haswell"]) == ""
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: "aarch64")
    assert cpu_kernel._slow_target_reason(builds["x86-64"]) == ""      # NEON: the generic code
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("WENET_MOE_KERNEL_MARCH", "x86-64")
    assert cpu_kernel._slow_target_reason(builds["x86-64"]) == ""      # asked for: measured
