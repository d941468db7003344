"""Speak Mandarin text with espeak-ng from the `espeakng-loader` wheel (ctypes).

`EspeakTTS().synth(text, variant, rate, pitch)` -> float32 samples in [-1, 1] at
`EspeakTTS.sample_rate` Hz (22050 for espeak-ng 1.52). Output depends only on
(text, variant, rate, pitch): synthesis state is reset for every call.
"""
from __future__ import annotations

import ctypes
import os
from typing import List

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
PARAM_RATE, PARAM_VOLUME, PARAM_PITCH, PARAM_RANGE = 1, 2, 3, 4
# Variants whose speech is too degraded to be a useful training voice.
EXCLUDED_VARIANTS = {"whisper", "whisperf", "Demonic", "croak"}

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def data_path() -> str:
    import espeakng_loader

    return espeakng_loader.get_data_path()


def list_variants() -> List[str]:
    """Sorted espeak-ng voice variant names (files of espeak-ng-data/voices/!v)."""
    vdir = os.path.join(data_path(), "voices", "!v")
    names = [n for n in os.listdir(vdir) if os.path.isfile(os.path.join(vdir, n))]
    return sorted(n for n in names if n not in EXCLUDED_VARIANTS)


class EspeakTTS:
    """One espeak-ng engine per process (the library keeps global state)."""

    def __init__(self, voice: str = "cmn"):
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib = self.lib
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self._libc = ctypes.CDLL(None)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak-ng initialisation failed (data path {data_path()})")
        self.sample_rate = int(rate)
        self.voice = voice
        self._chunks: List[np.ndarray] = []

        def on_audio(wav, numsamples, events):
            if numsamples > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
            return 0

        self._callback = _CALLBACK(on_audio)  # keep a reference alive
        lib.espeak_SetSynthCallback(self._callback)
        self._current_voice = ""

    def _set_voice(self, name: str) -> None:
        if name != self._current_voice:
            if self.lib.espeak_SetVoiceByName(name.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice '{name}'")
            self._current_voice = name

    def synth(self, text: str, variant: str = "", rate: int = 175, pitch: int = 50,
              pitch_range: int = 50, seed: int = 0) -> np.ndarray:
        """Speak `text`; rate in words per minute (80..450), pitch/range 0..100.

        `seed` seeds espeak's noise generator, so output is reproducible.
        Returns float32 (N,) samples in [-1, 1] at `self.sample_rate`.
        """
        self._set_voice(self.voice + ("+" + variant if variant else ""))
        for param, value in ((PARAM_RATE, rate), (PARAM_PITCH, pitch), (PARAM_RANGE, pitch_range),
                             (PARAM_VOLUME, 100)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        data = text.encode("utf-8") + b"\0"
        buf = ctypes.create_string_buffer(data)
        self._chunks = []
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        self._libc.srand(ctypes.c_uint(seed))
        err = self.lib.espeak_Synth(buf, len(data), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with code {err} for text {text!r}")
        self.lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return (np.concatenate(self._chunks).astype(np.float32) / 32768.0)
