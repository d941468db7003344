"""Independent numpy references of the packed experts' roundings (bf16 and int8 weights,
int8 rows of w8a8), for the kernel and layer tests: written from the definitions in
`wenet_moe/layers/cpu_kernel.py`, not from its code."""
import numpy as np
import torch


def bf16_round(w: torch.Tensor) -> np.ndarray:
    """fp32 -> the nearest bf16 value (ties to even), by integer arithmetic on the bits
    (independent of torch's conversion), as float64."""
    bits = w.detach().float().numpy().view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).astype(np.uint32)
    return rounded.view(np.float32).astype(np.float64)


def int8_weights(w: torch.Tensor):
    """fp32 (E, K, N) -> (q int64, scale float32 (E, 1, N)): q = rint(w / scale) in
    [-127, 127], scale = max_k |w| / 127 per output column (1 for an all-zero column),
    in IEEE float32 arithmetic (numpy)."""
    w32 = w.detach().float().numpy()
    scale = (np.abs(w32).max(axis=1, keepdims=True) / np.float32(127.0)).astype(np.float32)
    scale[scale == 0] = 1
    q = np.clip(np.rint(w32 / scale), -127, 127)
    assert np.all(q == np.round(q))
    return q.astype(np.int64), scale


def int8_round(w: torch.Tensor) -> np.ndarray:
    """fp32 (E, K, N) -> q * scale of `int8_weights` as float64."""
    q, scale = int8_weights(w)
    return q.astype(np.float64) * scale.astype(np.float64)


def int8_rows(x) -> tuple:
    """(R, K) rows -> (q int64, scale float32 (R, 1)) as w8a8 rounds an expert input: in
    float32, a = max_k |x|, q = rint(x * (127 / a)) (ties to even) in [-127, 127],
    scale = a / 127; an all-zero row gives q = 0, scale 0."""
    x32 = np.asarray(x, dtype=np.float32)
    amax = np.abs(x32).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.clip(np.rint(x32 * inv), -127, 127)
    return q.astype(np.int64), (amax / np.float32(127.0)).astype(np.float32)


def w8a8_linear(x, w: torch.Tensor, bias) -> np.ndarray:
    """float64 y = dequant(int8 rows of x @ int8 w) + bias for one expert's (K, N) weights:
    the products summed exactly as integers, then times row scale x column scale."""
    q, scale = int8_weights(w.unsqueeze(0))
    qx, sx = int8_rows(x)
    acc = qx @ q[0]
    return acc.astype(np.float64) * (sx.astype(np.float64) * scale[0].astype(np.float64)) \
        + np.asarray(bias, dtype=np.float64)
