"""Audio decoding (soundfile), channel selection, segments, errors, resampling."""
import numpy as np
import pytest
import soundfile as sf

from wenet_moe.data.audio import AudioError, load_audio, resample, write_wav


def _peak_hz(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return np.argmax(spec) * rate / x.size


@pytest.mark.parametrize("orig", [8000, 22050, 44100, 48000])
def test_resample_keeps_frequency_and_duration(orig):
    t = np.arange(orig) / orig  # 1 s
    x = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    y = resample(x, orig, 16000)
    assert y.dtype == np.float32
    assert abs(y.size - 16000) <= 1
    assert abs(_peak_hz(y, 16000) - 1000.0) <= 1.0
    # amplitude kept away from the edges (the filter has unit gain in its pass band)
    assert abs(np.max(np.abs(y[2000:-2000])) - 0.5) < 0.01


def test_resample_removes_content_above_new_nyquist():
    rate = 22050
    t = np.arange(rate) / rate
    x = np.sin(2 * np.pi * 10000.0 * t).astype(np.float32)  # above 8 kHz
    y = resample(x, rate, 16000)
    assert np.sqrt(np.mean(y[2000:-2000] ** 2)) < 0.01


def test_resample_identity():
    x = np.arange(10, dtype=np.float32)
    assert resample(x, 16000, 16000) is x


def test_load_wav_flac_first_channel_and_segments(tmp_path):
    rate = 16000
    left = np.linspace(-0.5, 0.5, rate, dtype=np.float32)
    right = np.full(rate, 0.25, np.float32)
    for fmt in ("wav", "flac"):
        p = str(tmp_path / f"st.{fmt}")
        sf.write(p, np.stack([left, right], 1), rate, subtype="PCM_16")
        x, r = load_audio(p)
        assert r == rate and x.shape == (rate,)
        np.testing.assert_allclose(x, left, atol=1 / 32768 + 1e-6)
        seg, _ = load_audio(p, start=0.25, end=0.5)
        np.testing.assert_allclose(seg, left[4000:8000], atol=1 / 32768 + 1e-6)
        with open(p, "rb") as f:
            xb, _ = load_audio(f.read(), name="shard.tar:st")
        np.testing.assert_array_equal(xb, x)


@pytest.mark.parametrize("case,kind", [("missing", "missing_wav"), ("garbage", "corrupt_wav"),
                                       ("empty", "empty_wav"), ("zero_bytes", "empty_wav"),
                                       ("truncated", "corrupt_wav"), ("segment", "bad_segment")])
def test_load_errors_name_the_source(tmp_path, case, kind):
    p = str(tmp_path / f"{case}.wav")
    start = None
    if case == "garbage":
        open(p, "wb").write(b"RIFF not really a wav file" * 10)
    elif case == "empty":
        sf.write(p, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    elif case == "zero_bytes":
        open(p, "wb").close()
    elif case == "truncated":
        sf.write(p, np.zeros(1000, np.float32), 16000, subtype="PCM_16")
        open(p, "r+b").truncate(20)
    elif case == "segment":
        sf.write(p, np.zeros(1600, np.float32), 16000, subtype="PCM_16")
        start = 5.0
    with pytest.raises(AudioError, match=f"{case}.wav") as e:
        load_audio(p, start=start)
    assert e.value.kind == kind
    assert "\n" not in str(e.value)


def test_empty_bytes():
    with pytest.raises(AudioError, match="x.tar:k") as e:
        load_audio(b"", name="x.tar:k")
    assert e.value.kind == "empty_wav"


def test_write_wav_is_atomic_and_readable(tmp_path):
    p = str(tmp_path / "out.wav")
    write_wav(p, np.full(160, 0.5, np.float32), 16000)
    x, r = load_audio(p)
    assert r == 16000 and np.allclose(x, 0.5, atol=1e-4)
    assert [f.name for f in tmp_path.iterdir()] == ["out.wav"]
