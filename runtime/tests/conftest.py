"""Fixtures of the runtime tests: a tiny model constructed in the session (see
rt_tiny_model.py; its margins are checked by test_rt_fixture.py) and exported
to ONNX (tests may use torch; the runtime package never does), test wavs, and a
server subprocess on 127.0.0.1."""
from __future__ import annotations

import os
import sys
from typing import Dict

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from rt_fixtures import CHUNK, TRAIN_SET, ServerProcess, fbank_fn, two_sentences  # noqa: E402


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> Dict[str, str]:
    """Directories of two exports of the constructed stand-in model: 'full' (chunk 4,
    all left context) and 'left2' (chunk 4, two left chunks); both fp32 + int8;
    'torch_model' is the model itself."""
    torch.set_num_threads(1)
    import rt_tiny_model as T
    opts, fbank = fbank_fn()
    model = T.build_tiny(fbank)
    root = tmp_path_factory.mktemp("tiny_export")
    dirs = {"full": str(root / "full"), "left2": str(root / "left2")}
    T.export_onnx(model, dirs["full"], opts.to_dict(), chunk=CHUNK, left_chunks=-1)
    T.export_onnx(model, dirs["left2"], opts.to_dict(), chunk=CHUNK, left_chunks=2)
    dirs["torch_model"] = model
    return dirs


@pytest.fixture(scope="session")
def test_wavs(tmp_path_factory) -> Dict[str, str]:
    """16 kHz wavs: training utterances 'u0'..'u5' and 'two' (two sentences with
    1.5 s of silence between them)."""
    import rt_tiny_model as T
    from wenet_moe_runtime.wavio import write_wav
    root = tmp_path_factory.mktemp("wavs")
    out = {}
    for i, (ids, seed, tail) in enumerate(TRAIN_SET[:6]):
        out[f"u{i}"] = str(root / f"u{i}.wav")
        write_wav(out[f"u{i}"], T.synth(ids, seed=seed, tail_s=tail))
    out["two"] = str(root / "two.wav")
    write_wav(out["two"], two_sentences()[0])
    return out


@pytest.fixture(scope="module")
def server(tiny_exports):
    srv = ServerProcess(tiny_exports["full"], ["--idle_timeout", "3",
                                               "--max_message_bytes", "200000",
                                               "--max_connections", "60",
                                               "--max_batch", "8"])
    yield srv
    srv.stop()
