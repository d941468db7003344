"""The verification tolerance rule: isolated rounding outliers pass, real
disagreements fail with the largest difference in the message."""
import numpy as np
import pytest

from wenet_moe.export.verify import ParityError, chunk_windows, compare


def test_equal_and_close_arrays_pass():
    ref = np.random.default_rng(0).standard_normal((3, 50, 7)).astype(np.float32)
    assert compare("x", ref.copy(), ref) == 0.0
    assert compare("x", ref + 5e-5, ref) == pytest.approx(5e-5, rel=1e-2)


def test_single_near_miss_outlier_passes_but_not_a_gross_one():
    ref = np.zeros((1000,), np.float32)
    got = ref.copy()
    got[123] = 3e-4          # 3x the tolerance: rounding outlier (WeNet #1827)
    assert compare("x", got, ref) == pytest.approx(3e-4)
    got[123] = 5e-3          # 50x: a real bug, even if only one element
    with pytest.raises(ParityError, match=r"x: max \|diff\| 0.005 at \(123,\)"):
        compare("x", got, ref)


def test_many_small_misses_fail():
    ref = np.ones((10, 10), np.float32)
    got = ref + 2e-4
    with pytest.raises(ParityError, match="100/100 elements"):
        compare("probs", got, ref)


def test_relative_tolerance_for_large_values():
    ref = np.full((4,), -300.0, np.float32)
    assert compare("logp", ref + 0.02, ref) == pytest.approx(0.02, rel=1e-3)
    with pytest.raises(ParityError):
        compare("logp", ref + 1.0, ref)


def test_shape_nan_and_integer_mismatches():
    with pytest.raises(ParityError, match=r"shape \(2,\) != PyTorch \(3,\)"):
        compare("x", np.zeros(2), np.zeros(3))
    with pytest.raises(ParityError):
        compare("x", np.array([np.nan, 0.0]), np.zeros(2))
    with pytest.raises(ParityError, match="1/3 elements differ"):
        compare("lens", np.array([3, 4, 5]), np.array([3, 4, 6]))


def test_chunk_windows_overlap_like_wenet():
    # chunk 16, conv2d: window 67 frames, stride 64; the last window may be shorter
    wins = chunk_windows(200, 16, 4, 6)
    assert wins == [(0, 67), (64, 131), (128, 195), (192, 200)]
    assert chunk_windows(6, 1, 4, 6) == []
    assert chunk_windows(7, 1, 4, 6) == [(0, 7)]
