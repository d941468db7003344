"""Augmentation: speed perturbation, SpecAugment, spec_sub, spec_trim, noise, reverb."""
import numpy as np
import pytest
import soundfile as sf

from wenet_moe.data import augment


def _peak_hz(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return np.argmax(spec) * rate / x.size


@pytest.mark.parametrize("speed", [0.9, 1.0, 1.1])
def test_speed_perturb_changes_length_and_pitch_by_the_factor(speed):
    rate = 16000
    t = np.arange(rate) / rate
    x = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    y = augment.speed_perturb(x, speed)
    assert abs(y.size - x.size / speed) <= 1
    assert abs(_peak_hz(y, rate) - 1000 * speed) <= 2.0


def _ones(t=200, f=80):
    return np.ones((t, f), np.float32)


def test_spec_aug_masks_within_bounds():
    saw_t = saw_f = False
    for seed in range(50):
        rng = np.random.default_rng(seed)
        x = _ones()
        y = augment.spec_aug(x, rng, num_t_mask=2, num_f_mask=3, max_t=12, max_f=7)
        assert x.min() == 1  # input untouched
        zero_rows = np.all(y == 0, axis=1)
        zero_cols = np.all(y == 0, axis=0)
        assert zero_rows.sum() <= 2 * 12
        assert zero_cols.sum() <= 3 * 7
        # every zero is inside a full time band or a full frequency band
        covered = zero_rows[:, None] | zero_cols[None, :]
        assert np.all((y == 0) == covered)
        # bands are contiguous runs: at most num masks runs, none longer than the overlap of all
        for mask, n, w in ((zero_rows, 2, 12), (zero_cols, 3, 7)):
            runs = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
            starts, ends = np.where(runs == 1)[0], np.where(runs == -1)[0]
            assert len(starts) <= n
            assert np.all(ends - starts <= n * w)
        saw_t |= zero_rows.any()
        saw_f |= zero_cols.any()
    assert saw_t and saw_f


def test_spec_sub_copies_earlier_frames_only():
    x = np.repeat(np.arange(100, dtype=np.float32)[:, None], 4, axis=1)
    changed_any = False
    for seed in range(30):
        y = augment.spec_sub(x, np.random.default_rng(seed), max_t=10, num_t_sub=3)
        assert y.shape == x.shape
        src = y[:, 0]
        assert np.all(src <= np.arange(100))  # a frame is itself or an earlier one
        assert np.all(y == y[:, :1])  # whole frames copied
        assert np.sum(src != np.arange(100)) <= 3 * 10
        changed_any |= bool(np.any(src != np.arange(100)))
    assert changed_any


def test_spec_trim_drops_a_short_tail():
    x = np.repeat(np.arange(100, dtype=np.float32)[:, None], 3, axis=1)
    lengths = set()
    for seed in range(40):
        y = augment.spec_trim(x, np.random.default_rng(seed), max_t=20)
        assert 80 <= y.shape[0] <= 99
        np.testing.assert_array_equal(y, x[:y.shape[0]])
        lengths.add(y.shape[0])
    assert len(lengths) > 5
    short = np.ones((10, 3), np.float32)  # 1..20 is never under half of 10 frames... except 1..4
    for seed in range(40):
        assert augment.spec_trim(short, np.random.default_rng(seed), max_t=20).shape[0] >= 6


@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
def test_mix_at_snr(snr):
    rng = np.random.default_rng(0)
    s = np.sin(np.arange(16000) * 0.05).astype(np.float32)
    n = rng.standard_normal(16000).astype(np.float32) * 3
    y = augment.mix_at_snr(s, n, snr)
    added = y.astype(np.float64) - s
    got = 10 * np.log10(np.mean(s.astype(np.float64) ** 2) / np.mean(added ** 2))
    assert abs(got - snr) < 1e-3


def test_noise_source_uses_noise_list_and_snr_range(tmp_path):
    rate = 16000
    noise = (0.1 * np.sign(np.sin(np.arange(800) * 0.3))).astype(np.float32)  # a square wave, 0.05 s
    sf.write(str(tmp_path / "n.wav"), noise, 8000, subtype="PCM_16")  # resampled to 16 kHz
    lst = tmp_path / "noise.list"
    lst.write_text(str(tmp_path / "n.wav") + "\n")
    src = augment.NoiseSource(str(lst), rate, (5.0, 10.0))
    s = np.sin(np.arange(8000) * 0.02).astype(np.float32)
    for seed in range(5):
        y = src(s, np.random.default_rng(seed))
        added = y.astype(np.float64) - s
        snr = 10 * np.log10(np.mean(s.astype(np.float64) ** 2) / np.mean(added ** 2))
        assert 5.0 - 1e-3 <= snr <= 10.0 + 1e-3
        # the noise is the (tiled) clip, not white noise: few distinct levels
        assert len(np.unique(np.round(added / np.max(np.abs(added)), 2))) < 60
    white = augment.NoiseSource(None, rate, (5.0, 5.0))
    y = white(s, np.random.default_rng(0))
    assert len(np.unique(np.round(y - s, 4))) > 1000
    empty = tmp_path / "empty.list"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.list: noise list is empty"):
        augment.NoiseSource(str(empty), rate)


def test_rir_bank_reverberates_without_delay():
    bank = augment.RirBank(16000, num_rirs=2, room_dim=((3.0, 4.0), (3.0, 4.0), (2.5, 3.0)),
                           rt60=(0.2, 0.3), seed=1, max_rir_seconds=0.3)
    assert len(bank.rirs) == 2
    for h in bank.rirs:
        assert np.argmax(np.abs(h)) == 0 and h.size > 100  # direct path first, then a tail
    rng = np.random.default_rng(0)
    x = np.zeros(8000, np.float32)
    x[1000:1100] = rng.standard_normal(100).astype(np.float32)
    y = bank(x, np.random.default_rng(0))
    assert y.shape == x.shape
    assert abs(np.sqrt(np.mean(y ** 2)) - np.sqrt(np.mean(x ** 2))) < 1e-4
    assert np.sum(y[1100:] ** 2) > 0.05 * np.sum(y ** 2)  # energy after the burst: the tail
    assert np.allclose(y[:1000], 0, atol=1e-5)  # nothing before the source sound (no shift earlier)
    lag = np.argmax(np.correlate(y, x, "full")) - (x.size - 1)
    assert lag == 0
