"""Fixtures of the runtime tests: a tiny model trained in the session and exported
to ONNX (tests may use torch; the runtime package never does), test wavs, and a
server subprocess on 127.0.0.1."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# (token ids, seed, trailing silence in s): the utterances the tiny model overfits.
TRAIN_SET = [([2, 3, 4, 5], 0, 0.3), ([6, 7, 2], 1, 0.3), ([3, 5, 7, 4, 2], 2, 0.3),
             ([4, 4, 6], 3, 0.3), ([7, 6, 5, 3], 4, 0.3), ([2, 6, 3], 5, 0.3),
             ([5, 2, 7], 6, 1.3), ([2, 3, 4, 5], 7, 1.3)]
CHUNK = 4


def fbank_fn():
    from wenet_moe_runtime.features import FbankOptions, compute_fbank
    opts = FbankOptions()
    return opts, (lambda w: compute_fbank(w.astype(np.float32) / 32768.0, 16000, opts))


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> Dict[str, str]:
    """Directories of two exports of one briefly trained model: 'full' (chunk 4,
    all left context) and 'left2' (chunk 4, two left chunks); both fp32 + int8."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    import rt_tiny_model as T
    opts, fbank = fbank_fn()
    utts = [(T.synth(ids, seed=seed, tail_s=tail), ids) for ids, seed, tail in TRAIN_SET]
    model = T.train_tiny(utts, fbank, chunk=CHUNK, epochs=70)
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
    two = np.concatenate([T.synth([2, 3, 4, 5], seed=0), np.zeros(24000, np.int16),
                          T.synth([6, 7, 2], seed=1)])
    out["two"] = str(root / "two.wav")
    write_wav(out["two"], two)
    return out


class ServerProcess:
    """A wenet-moe-server subprocess listening on a free port of 127.0.0.1."""

    def __init__(self, model_dir: str, extra: List[str] = (), timeout: float = 60.0) -> None:
        cmd = [sys.executable, "-m", "wenet_moe_runtime.server", "--model_dir", model_dir,
               "--host", "127.0.0.1", "--port", "0", "--num_workers", "2", *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        deadline = time.monotonic() + timeout
        self.lines: List[str] = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self.url = f"ws://127.0.0.1:{self.port}"
                return
        self.proc.kill()
        raise RuntimeError("server did not start: " + "".join(self.lines))

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rest = self.proc.stdout.read()
        if rest:
            self.lines.append(rest)
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tiny_exports):
    srv = ServerProcess(tiny_exports["full"], ["--idle_timeout", "3",
                                               "--max_message_bytes", "200000",
                                               "--max_connections", "60"])
    yield srv
    srv.stop()
