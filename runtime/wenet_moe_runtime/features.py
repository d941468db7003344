"""Kaldi-compatible log-mel filterbank features, shared by training and serving.

Torch-free: numpy + kaldi-native-fbank. The toolkit builds its features through
this module, and every exported model carries `FbankOptions.to_dict()` in its
metadata, so training and serving compute identical features.

Samples are float32 in [-1, 1]; they are scaled by `FbankOptions.scale` (32768,
the int16 range, as Kaldi and WeNet expect) before the filterbank.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

WINDOW_TYPES = ("povey", "hamming", "hanning", "rectangular", "blackman", "sine")


@dataclass
class FbankOptions:
    """Feature options. Defaults match sherpa-onnx's WeNet CTC front end.

    Times are in milliseconds, frequencies in Hz (`high_freq <= 0` is an offset
    from Nyquist, as in Kaldi). `dither` is the standard deviation of Gaussian
    noise added to the int16-scaled samples (0 at evaluation).
    """

    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    dither: float = 0.0
    snip_edges: bool = False
    low_freq: float = 20.0
    high_freq: float = -400.0
    window_type: str = "povey"
    preemph_coeff: float = 0.97
    remove_dc_offset: bool = True
    energy_floor: float = 0.0
    scale: float = 32768.0

    def __post_init__(self) -> None:
        if self.window_type not in WINDOW_TYPES:
            raise ValueError(f"FbankOptions.window_type: '{self.window_type}' is not one of {list(WINDOW_TYPES)}")
        if int(self.num_mel_bins) <= 0:
            raise ValueError(f"FbankOptions.num_mel_bins must be positive, got {self.num_mel_bins}")
        if not 0 < self.frame_shift_ms <= self.frame_length_ms:
            raise ValueError("FbankOptions: need 0 < frame_shift_ms <= frame_length_ms, got "
                             f"{self.frame_shift_ms} and {self.frame_length_ms}")
        if int(self.sample_rate) <= 0:
            raise ValueError(f"FbankOptions.sample_rate must be positive, got {self.sample_rate}")
        if self.dither < 0:
            raise ValueError(f"FbankOptions.dither must be >= 0, got {self.dither}")

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict of every option."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "FbankOptions":
        """Inverse of `to_dict`; an unknown key raises ValueError naming it."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        for k in d:
            if k not in names:
                raise ValueError(f"FbankOptions: unknown option '{k}'")
        kwargs = {}
        for k, v in d.items():
            typ = names[k].type
            if typ in ("int", int):
                v = int(v)
            elif typ in ("float", float):
                v = float(v)
            elif typ in ("bool", bool):
                v = bool(v)
            kwargs[k] = v
        return cls(**kwargs)

    @property
    def frame_shift_samples(self) -> int:
        return int(round(self.sample_rate * self.frame_shift_ms / 1000.0))

    @property
    def frame_length_samples(self) -> int:
        return int(round(self.sample_rate * self.frame_length_ms / 1000.0))

    def num_frames(self, num_samples: int) -> int:
        """Frames Kaldi produces from `num_samples` samples (with these options)."""
        shift, length = self.frame_shift_samples, self.frame_length_samples
        if self.snip_edges:
            return 0 if num_samples < length else 1 + (num_samples - length) // shift
        return (num_samples + shift // 2) // shift

    def to_knf(self, dither: Optional[float] = None):
        """The equivalent `kaldi_native_fbank.FbankOptions`."""
        import kaldi_native_fbank as knf

        o = knf.FbankOptions()
        fo = o.frame_opts
        fo.samp_freq = float(self.sample_rate)
        fo.frame_length_ms = float(self.frame_length_ms)
        fo.frame_shift_ms = float(self.frame_shift_ms)
        fo.dither = float(self.dither if dither is None else dither)
        fo.snip_edges = bool(self.snip_edges)
        fo.window_type = self.window_type
        fo.preemph_coeff = float(self.preemph_coeff)
        fo.remove_dc_offset = bool(self.remove_dc_offset)
        o.mel_opts.num_bins = int(self.num_mel_bins)
        o.mel_opts.low_freq = float(self.low_freq)
        o.mel_opts.high_freq = float(self.high_freq)
        o.energy_floor = float(self.energy_floor)
        o.use_energy = False
        return o


def _as_samples(samples: Any) -> np.ndarray:
    raw = np.asarray(samples)
    if raw.dtype.kind in "iub":
        raise ValueError(f"fbank: samples must be float in [-1, 1], got {raw.dtype} "
                         "(divide int16 PCM by 32768)")
    x = raw.astype(np.float32, copy=False)
    if x.ndim != 1:
        raise ValueError(f"fbank: samples must be 1-D (N,), got shape {x.shape}")
    return x


def compute_fbank(samples: Any, sample_rate: int, opts: Optional[FbankOptions] = None,
                  rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Log-mel filterbank of a whole utterance.

    Args:
        samples: float32 (N,) in [-1, 1].
        sample_rate: Hz; must equal `opts.sample_rate` (resample first).
        opts: options (defaults if None).
        rng: source of the dither noise when `opts.dither > 0` (a fresh
            generator if None); dither is added here, so it is reproducible.
    Returns:
        float32 (T, num_mel_bins); T = opts.num_frames(N) (0 rows if too short).
    """
    opts = opts or FbankOptions()
    if int(sample_rate) != int(opts.sample_rate):
        raise ValueError(f"fbank: sample rate {sample_rate} Hz differs from the configured "
                         f"{opts.sample_rate} Hz; resample first")
    x = _as_samples(samples) * np.float32(opts.scale)
    if opts.dither > 0:
        rng = rng if rng is not None else np.random.default_rng()
        x = x + rng.standard_normal(x.shape[0]).astype(np.float32) * np.float32(opts.dither)
    if opts.num_frames(x.shape[0]) == 0:
        return np.zeros((0, opts.num_mel_bins), dtype=np.float32)
    import kaldi_native_fbank as knf

    fb = knf.OnlineFbank(opts.to_knf(dither=0.0))
    fb.accept_waveform(float(opts.sample_rate), x)
    fb.input_finished()
    n = fb.num_frames_ready
    out = np.empty((n, opts.num_mel_bins), dtype=np.float32)
    for i in range(n):
        out[i] = fb.get_frame(i)
    return out


class OnlineFbank:
    """Streaming fbank: feed samples in pieces, read frames as they become ready.

    After `input_finished()`, the frames equal `compute_fbank` of the whole signal
    (with dither 0). Frame indices are absolute (counted from the first sample).
    """

    def __init__(self, opts: Optional[FbankOptions] = None):
        import kaldi_native_fbank as knf

        self.opts = opts or FbankOptions()
        self._fb = knf.OnlineFbank(self.opts.to_knf())
        self._finished = False

    def accept_waveform(self, sample_rate: int, samples: Any) -> None:
        """Append float32 samples in [-1, 1] at `sample_rate` Hz (= opts.sample_rate)."""
        if self._finished:
            raise RuntimeError("OnlineFbank: accept_waveform after input_finished")
        if int(sample_rate) != int(self.opts.sample_rate):
            raise ValueError(f"OnlineFbank: sample rate {sample_rate} Hz differs from the configured "
                             f"{self.opts.sample_rate} Hz")
        x = _as_samples(samples)
        if x.size:
            self._fb.accept_waveform(float(sample_rate), x * np.float32(self.opts.scale))

    def input_finished(self) -> None:
        """No more samples: flush the last frames."""
        if not self._finished:
            self._fb.input_finished()
            self._finished = True

    @property
    def num_frames_ready(self) -> int:
        return int(self._fb.num_frames_ready)

    def get_frames(self, start: int, n: int) -> np.ndarray:
        """Frames [start, start + n) as float32 (n, num_mel_bins)."""
        if start < 0 or n < 0 or start + n > self.num_frames_ready:
            raise IndexError(f"OnlineFbank: frames [{start}, {start + n}) not ready "
                             f"({self.num_frames_ready} ready)")
        out = np.empty((n, self.opts.num_mel_bins), dtype=np.float32)
        for i in range(n):
            out[i] = self._fb.get_frame(start + i)
        return out

    def pop(self, n: int) -> None:
        """Free the first `n` stored frames (indices stay absolute)."""
        self._fb.pop(int(n))
