"""Audio input: decoding through soundfile, channel selection and resampling.

All samples are float32 in [-1, 1], shape (N,) (first channel of multi-channel
audio). Errors are `AudioError` with a message naming the source.
"""
from __future__ import annotations

import io
from fractions import Fraction
from typing import Optional, Tuple, Union

import numpy as np


class AudioError(ValueError):
    """Audio that cannot be used; `kind` is the skip counter it belongs to."""

    def __init__(self, message: str, kind: str = "corrupt_wav"):
        super().__init__(message)
        self.kind = kind


def load_audio(source: Union[str, bytes], start: Optional[float] = None, end: Optional[float] = None,
               name: Optional[str] = None) -> Tuple[np.ndarray, int]:
    """Decode wav/flac (anything libsndfile reads).

    Args:
        source: a file path, or the encoded bytes (tar shard member).
        start, end: optional segment bounds in seconds (`end` None = to the end).
        name: how errors name the source (defaults to the path).
    Returns:
        (samples float32 (N,), sample_rate Hz).
    Raises:
        AudioError with kind `missing_wav`, `corrupt_wav`, `empty_wav` or `bad_segment`.
    """
    import soundfile as sf

    label = name or (source if isinstance(source, str) else "<bytes>")
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise AudioError(f"{label}: empty audio data", "empty_wav")
        handle = io.BytesIO(source)
    else:
        import os

        if not os.path.exists(source):
            raise AudioError(f"{label}: no such file", "missing_wav")
        if os.path.isfile(source) and os.path.getsize(source) == 0:
            raise AudioError(f"{label}: file is empty (0 bytes)", "empty_wav")
        handle = source
    try:
        with sf.SoundFile(handle) as f:
            rate = int(f.samplerate)
            total = f.frames
            first = 0 if start is None else int(round(float(start) * rate))
            last = total if end is None else min(total, int(round(float(end) * rate)))
            if first < 0 or first > total or (end is not None and last <= first):
                raise AudioError(f"{label}: segment [{start}, {end}] s is outside the audio "
                                 f"(0..{total / rate:.3f} s)", "bad_segment")
            f.seek(first)
            data = f.read(last - first, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (RuntimeError, sf.LibsndfileError, ValueError, TypeError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioError(f"{label}: cannot decode audio: {msg}", "corrupt_wav") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioError(f"{label}: audio has no samples", "empty_wav")
    samples = np.ascontiguousarray(data[:, 0], dtype=np.float32)
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{label}: audio holds NaN or infinite samples", "corrupt_wav")
    return samples, rate


def resample(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase windowed-sinc resampling (scipy.signal.resample_poly, Kaiser window).

    Args:
        samples: float32 (N,).
    Returns:
        float32 (ceil(N * target_rate / orig_rate),).
    """
    if int(orig_rate) == int(target_rate):
        return samples
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"resample: rates must be positive, got {orig_rate} -> {target_rate}")
    from scipy.signal import resample_poly

    ratio = Fraction(int(target_rate), int(orig_rate))
    out = resample_poly(samples.astype(np.float32), ratio.numerator, ratio.denominator)
    return out.astype(np.float32)


def write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    """Write 16-bit PCM wav atomically (temporary name, then rename)."""
    import os
    import tempfile

    import soundfile as sf

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", suffix=".wav", dir=d)
    os.close(fd)
    try:
        sf.write(tmp, np.asarray(samples, dtype=np.float32), int(sample_rate), subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
