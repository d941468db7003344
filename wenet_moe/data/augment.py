"""Data augmentation, all in numpy with an explicit `np.random.Generator`.

Waveform side: speed perturbation (sox `speed`: resampling changes tempo and
pitch together), additive noise at a random SNR, simulated room reverberation
(pyroomacoustics image method, a bank of RIRs computed once per worker).
Feature side: SpecAugment masks, spec_sub (U2++ time substitution), spec_trim
(TrimTail). Waveforms are float32 (N,); features float32 (T, F).
"""
from __future__ import annotations

import logging
from fractions import Fraction
from typing import List, Optional, Sequence

import numpy as np

from wenet_moe.data.audio import AudioError, load_audio, resample


def speed_perturb(samples: np.ndarray, speed: float) -> np.ndarray:
    """Play `samples` `speed` times faster (same rate): length N/speed, pitch x speed."""
    if speed == 1.0:
        return samples
    from scipy.signal import resample_poly

    ratio = Fraction(speed).limit_denominator(100)
    # N samples become N * den / num: speed 1.1 -> shorter, 0.9 -> longer.
    return resample_poly(samples, ratio.denominator, ratio.numerator).astype(np.float32)


def spec_aug(feats: np.ndarray, rng: np.random.Generator, num_t_mask: int = 2, num_f_mask: int = 2,
             max_t: int = 50, max_f: int = 10) -> np.ndarray:
    """SpecAugment: zero `num_t_mask` time bands of 1..max_t frames and
    `num_f_mask` frequency bands of 1..max_f bins (bands clipped at the edges)."""
    y = feats.copy()
    t, f = y.shape
    for _ in range(int(num_t_mask)):
        if t == 0 or max_t < 1:
            break
        start = int(rng.integers(0, t))
        length = int(rng.integers(1, int(max_t) + 1))
        y[start:min(t, start + length), :] = 0
    for _ in range(int(num_f_mask)):
        if f == 0 or max_f < 1:
            break
        start = int(rng.integers(0, f))
        length = int(rng.integers(1, int(max_f) + 1))
        y[:, start:min(f, start + length)] = 0
    return y


def spec_sub(feats: np.ndarray, rng: np.random.Generator, max_t: int = 20, num_t_sub: int = 3) -> np.ndarray:
    """U2++ time substitution: `num_t_sub` times, frames [s, e) (1..max_t long) are
    replaced by the earlier frames [s - p, e - p), 0 <= p <= s, of the original."""
    y = feats.copy()
    t = y.shape[0]
    for _ in range(int(num_t_sub)):
        if t == 0 or max_t < 1:
            break
        start = int(rng.integers(0, t))
        end = min(t, start + int(rng.integers(1, int(max_t) + 1)))
        pos = int(rng.integers(0, start + 1))
        y[start:end, :] = feats[start - pos:end - pos, :]
    return y


def spec_trim(feats: np.ndarray, rng: np.random.Generator, max_t: int = 20) -> np.ndarray:
    """TrimTail: drop the last 1..max_t frames, only when that is under half the utterance."""
    t = feats.shape[0]
    if max_t < 1:
        return feats
    length = int(rng.integers(1, int(max_t) + 1))
    if length < t / 2:
        return feats[:t - length].copy()
    return feats


def mix_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """signal + noise scaled so that 10*log10(P_signal / P_noise) = snr_db (same length)."""
    ps = float(np.mean(signal.astype(np.float64) ** 2))
    pn = float(np.mean(noise.astype(np.float64) ** 2))
    if ps <= 0 or pn <= 0:
        return signal
    gain = np.sqrt(ps / (pn * 10.0 ** (snr_db / 10.0)))
    return (signal + gain * noise).astype(np.float32)


class NoiseSource:
    """Additive noise: clips from a noise list (one audio path per line), else white noise.

    Clips are loaded lazily (at most `max_cached` kept) and resampled to `sample_rate`.
    """

    def __init__(self, noise_list: Optional[str], sample_rate: int, snr_db: Sequence[float] = (5.0, 20.0),
                 max_cached: int = 64):
        self.sample_rate = int(sample_rate)
        self.snr_db = (float(snr_db[0]), float(snr_db[1]))
        if self.snr_db[0] > self.snr_db[1]:
            raise ValueError(f"noise_conf.snr_db: min {self.snr_db[0]} > max {self.snr_db[1]}")
        self.paths: List[str] = []
        if noise_list:
            try:
                with open(noise_list, "r", encoding="utf-8") as f:
                    self.paths = [line.strip() for line in f if line.strip()]
            except OSError as e:
                raise ValueError(f"{noise_list}: cannot read noise list: {e.strerror}") from None
            if not self.paths:
                raise ValueError(f"{noise_list}: noise list is empty")
        self.max_cached = max_cached
        self._cache: dict = {}

    def _clip(self, idx: int) -> Optional[np.ndarray]:
        if idx in self._cache:
            return self._cache[idx]
        try:
            x, sr = load_audio(self.paths[idx])
            x = resample(x, sr, self.sample_rate)
        except AudioError as e:
            logging.warning("noise clip skipped: %s", e)
            x = None
        if len(self._cache) >= self.max_cached:
            self._cache.pop(next(iter(self._cache)))
        self._cache[idx] = x
        return x

    def noise_like(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n noise samples: a random stretch of a random clip (tiled if short), or white."""
        if self.paths:
            clip = self._clip(int(rng.integers(0, len(self.paths))))
            if clip is not None and clip.size and np.any(clip):
                reps = -(-n // clip.size) + 1
                tiled = np.tile(clip, reps)
                off = int(rng.integers(0, clip.size))
                return tiled[off:off + n]
        return rng.standard_normal(n).astype(np.float32)

    def __call__(self, samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        snr = float(rng.uniform(self.snr_db[0], self.snr_db[1]))
        return mix_at_snr(samples, self.noise_like(samples.size, rng), snr)


class RirBank:
    """Simulated room impulse responses (shoebox rooms, image method), made once.

    Each RIR: room sides uniform in `room_dim` (m), RT60 uniform in `rt60` (s),
    source and microphone at random positions at least 0.5 m from the walls.
    `__call__` convolves with a random RIR, aligned on its direct path so that
    timings do not move, and keeps the input's RMS level.
    """

    def __init__(self, sample_rate: int, num_rirs: int = 16, room_dim=((3.0, 10.0), (3.0, 10.0), (2.5, 4.0)),
                 rt60=(0.2, 0.8), seed: int = 0, max_rir_seconds: float = 1.0):
        import pyroomacoustics as pra

        self.sample_rate = int(sample_rate)
        rng = np.random.default_rng(seed)
        self.rirs: List[np.ndarray] = []
        for _ in range(int(num_rirs)):
            dims = np.array([rng.uniform(lo, hi) for lo, hi in room_dim])
            target_rt60 = float(rng.uniform(*rt60))
            try:
                absorption, max_order = pra.inverse_sabine(target_rt60, dims)
            except ValueError:  # RT60 impossible for this room: use a damped room
                absorption, max_order = 0.9, 3
            room = pra.ShoeBox(dims, fs=self.sample_rate, materials=pra.Material(absorption),
                               max_order=min(int(max_order), 20))
            src = [rng.uniform(0.5, d - 0.5) for d in dims]
            mic = [rng.uniform(0.5, d - 0.5) for d in dims]
            room.add_source(src)
            room.add_microphone(mic)
            room.compute_rir()
            h = np.asarray(room.rir[0][0], dtype=np.float64)
            h = h[: int(max_rir_seconds * self.sample_rate)]
            peak = int(np.argmax(np.abs(h)))
            h = h[peak:]  # direct path first: no added delay
            self.rirs.append((h / (np.abs(h[0]) + 1e-12)).astype(np.float32))

    def __call__(self, samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from scipy.signal import fftconvolve

        h = self.rirs[int(rng.integers(0, len(self.rirs)))]
        y = fftconvolve(samples, h)[: samples.size]
        rms_in = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
        rms_out = float(np.sqrt(np.mean(y.astype(np.float64) ** 2)))
        if rms_out > 0:
            y = y * (rms_in / rms_out)
        return y.astype(np.float32)
