"""Fbank: an independent numpy computation, torchaudio (when importable), streaming."""
import math

import numpy as np
import pytest

from wenet_moe_runtime.features import FbankOptions, OnlineFbank, compute_fbank


def _window(kind, n):
    i = np.arange(n)
    a = 2 * math.pi / (n - 1)
    if kind == "povey":
        return (0.5 - 0.5 * np.cos(a * i)) ** 0.85
    if kind == "hamming":
        return 0.54 - 0.46 * np.cos(a * i)
    if kind == "hanning":
        return 0.5 - 0.5 * np.cos(a * i)
    raise ValueError(kind)


def reference_fbank(x, opts):
    """Kaldi fbank written from its definition (float64 numpy)."""
    sr = opts.sample_rate
    x = np.asarray(x, np.float64) * opts.scale
    shift = int(sr * opts.frame_shift_ms / 1000)
    length = int(sr * opts.frame_length_ms / 1000)
    n = x.size
    if opts.snip_edges:
        num = 1 + (n - length) // shift
        starts = [i * shift for i in range(num)]
    else:
        num = (n + shift // 2) // shift
        starts = [i * shift + shift // 2 - length // 2 for i in range(num)]
    nfft = 1 << (length - 1).bit_length()
    # mel filterbank, Kaldi's mel scale 1127 ln(1 + f/700), triangles in mel
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    nyq = sr / 2
    high = opts.high_freq if opts.high_freq > 0 else nyq + opts.high_freq
    mlo, mhi = mel(opts.low_freq), mel(high)
    delta = (mhi - mlo) / (opts.num_mel_bins + 1)
    fft_mel = mel(np.arange(nfft // 2) * sr / nfft)
    banks = np.zeros((opts.num_mel_bins, nfft // 2))
    for b in range(opts.num_mel_bins):
        left, center, right = mlo + b * delta, mlo + (b + 1) * delta, mlo + (b + 2) * delta
        up = (fft_mel - left) / (center - left)
        down = (right - fft_mel) / (right - center)
        w = np.where(fft_mel <= center, up, down)
        banks[b] = np.where((fft_mel > left) & (fft_mel < right), w, 0.0)
    win = _window(opts.window_type, length)
    out = np.zeros((num, opts.num_mel_bins))
    for f, s in enumerate(starts):
        idx = np.arange(s, s + length)
        idx = np.where(idx < 0, -idx - 1, idx)
        idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
        fr = x[idx].copy()
        fr -= fr.mean()
        fr[1:] = fr[1:] - opts.preemph_coeff * fr[:-1]
        fr[0] -= opts.preemph_coeff * fr[0]
        fr *= win
        spec = np.abs(np.fft.rfft(fr, nfft)) ** 2
        energies = banks @ spec[: nfft // 2]
        out[f] = np.log(np.maximum(energies, np.finfo(np.float32).eps))
    return out


def _signal(sr=16000, seconds=0.37, seed=0):
    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)
            + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("opts", [
    FbankOptions(),
    FbankOptions(num_mel_bins=23, snip_edges=True, high_freq=0.0, low_freq=64.0, window_type="hamming"),
    FbankOptions(sample_rate=8000, num_mel_bins=40, frame_length_ms=32, frame_shift_ms=16, window_type="hanning"),
])
def test_fbank_matches_independent_numpy(opts):
    x = _signal(sr=opts.sample_rate)
    ours = compute_fbank(x, opts.sample_rate, opts)
    ref = reference_fbank(x, opts)
    assert ours.shape == ref.shape == (opts.num_frames(x.size), opts.num_mel_bins)
    assert ours.dtype == np.float32
    assert np.max(np.abs(ours - ref)) < 5e-4, np.max(np.abs(ours - ref))


def test_fbank_matches_torchaudio_when_importable():
    try:
        import torch
        import torchaudio.compliance.kaldi as kaldi
    except Exception:  # torchaudio absent or not loadable beside the CPU torch
        pytest.skip("torchaudio is not importable")
    opts = FbankOptions()
    x = _signal()
    ours = compute_fbank(x, 16000, opts)
    ta = kaldi.fbank(torch.from_numpy(x * 32768.0).unsqueeze(0), num_mel_bins=80, frame_length=25,
                     frame_shift=10, dither=0.0, energy_floor=0.0, sample_frequency=16000,
                     snip_edges=False, high_freq=-400, low_freq=20, window_type="povey").numpy()
    assert ours.shape == ta.shape
    assert np.mean(np.abs(ours - ta)) < 1e-3


@pytest.mark.parametrize("chunk", [1, 160, 1037, 4000])
def test_online_in_chunks_equals_offline(chunk):
    opts = FbankOptions()
    x = _signal(seconds=0.83, seed=1)
    offline = compute_fbank(x, 16000, opts)
    online = OnlineFbank(opts)
    got = []
    read = 0
    for i in range(0, x.size, chunk):
        online.accept_waveform(16000, x[i:i + chunk])
        ready = online.num_frames_ready
        assert ready <= offline.shape[0]
        if ready > read:
            got.append(online.get_frames(read, ready - read))
            read = ready
    online.input_finished()
    got.append(online.get_frames(read, online.num_frames_ready - read))
    got = np.concatenate(got)
    assert got.shape == offline.shape
    np.testing.assert_allclose(got, offline, atol=1e-4)


def test_online_pop_keeps_absolute_indices():
    opts = FbankOptions()
    x = _signal(seconds=0.5)
    offline = compute_fbank(x, 16000, opts)
    fb = OnlineFbank(opts)
    fb.accept_waveform(16000, x)
    fb.input_finished()
    fb.pop(10)
    np.testing.assert_allclose(fb.get_frames(10, 5), offline[10:15], atol=1e-4)


def test_dither_is_reproducible_with_a_seeded_generator():
    opts = FbankOptions(dither=1.0)
    x = np.zeros(8000, np.float32)
    a = compute_fbank(x, 16000, opts, rng=np.random.default_rng(3))
    b = compute_fbank(x, 16000, opts, rng=np.random.default_rng(3))
    c = compute_fbank(x, 16000, opts, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # silence without dither hits the log floor; with dither it does not
    assert np.all(compute_fbank(x, 16000, FbankOptions()) < -15)
    assert np.all(a > -15)


def test_options_round_trip_and_errors():
    opts = FbankOptions(num_mel_bins=40, dither=0.5, snip_edges=True)
    d = opts.to_dict()
    assert d["num_mel_bins"] == 40 and d["snip_edges"] is True and d["high_freq"] == -400.0
    assert FbankOptions.from_dict(d) == opts
    with pytest.raises(ValueError, match="unknown option 'num_bins'"):
        FbankOptions.from_dict({"num_bins": 80})
    with pytest.raises(ValueError, match="window_type"):
        FbankOptions(window_type="kaiser")
    with pytest.raises(ValueError, match="resample first"):
        compute_fbank(np.zeros(1600, np.float32), 8000, FbankOptions())
    with pytest.raises(ValueError, match="float in \\[-1, 1\\], got int16"):
        compute_fbank(np.zeros(1600, np.int16), 16000, FbankOptions())
    with pytest.raises(ValueError, match="1-D"):
        compute_fbank(np.zeros((2, 1600), np.float32), 16000, FbankOptions())


def test_defaults_match_sherpa_onnx_front_end():
    o = FbankOptions()
    assert (o.sample_rate, o.num_mel_bins, o.frame_length_ms, o.frame_shift_ms) == (16000, 80, 25.0, 10.0)
    assert (o.snip_edges, o.high_freq, o.low_freq, o.dither, o.window_type) == (False, -400.0, 20.0, 0.0, "povey")
    assert o.energy_floor == 0.0 and o.scale == 32768.0
    k = o.to_knf()
    assert k.frame_opts.snip_edges is False and k.mel_opts.num_bins == 80 and k.frame_opts.dither == 0.0


def test_short_input_gives_zero_frames():
    assert compute_fbank(np.zeros(10, np.float32), 16000, FbankOptions(snip_edges=True)).shape == (0, 80)
    assert compute_fbank(np.zeros(0, np.float32), 16000, FbankOptions()).shape == (0, 80)
