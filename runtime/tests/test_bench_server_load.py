"""bench/server_load.py's `--calibrate_blank`: the served copy of an export has its CTC
blank bias moved so that the asked fraction of the test wavs' frames is blank-best,
and shares every other file with the export."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import rt_tiny_model as T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
server_load = pytest.importorskip("server_load")

from wenet_moe_runtime.decoder import resolve_chunk_size  # noqa: E402
from wenet_moe_runtime.features import FbankOptions  # noqa: E402
from wenet_moe_runtime.model import OnnxAsrModel  # noqa: E402
from wenet_moe_runtime.offline import encode_chunks, utterance_fbank  # noqa: E402


def blank_fraction(model_dir: str, wavs) -> float:
    """Share of the frames whose best CTC class is blank, computed here from the log-posteriors."""
    model = OnnxAsrModel(model_dir)
    chunk = resolve_chunk_size(model, 0)
    best = [model.ctc_log_probs(np.concatenate(encode_chunks(model, utterance_fbank(model, w), chunk)))
            .argmax(axis=1) for _, w in wavs]
    return float(np.mean(np.concatenate(best) == 0))


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_calibrated_copy_has_the_asked_blank_fraction(tmp_path, fraction):
    export = str(tmp_path / "export")
    T.make_standin_export(export, FbankOptions().to_dict(), 32, 2, 2, 40)
    wavs = server_load.synthetic_wavs()
    out = server_load.blank_calibrated(export, wavs, fraction)
    assert out == export + f".blank{round(100 * fraction)}"
    assert abs(blank_fraction(out, wavs) - fraction) < 0.03
    # everything but the CTC graphs is the export's own file
    for name in os.listdir(export):
        same = os.path.samefile(os.path.join(export, name), os.path.join(out, name))
        assert same == (name not in server_load.CTC_GRAPHS), name
    # calibrated again from the export, not from the copy: the same graphs
    before = open(os.path.join(out, "ctc.onnx"), "rb").read()
    server_load.blank_calibrated(export, wavs, fraction)
    assert open(os.path.join(out, "ctc.onnx"), "rb").read() == before
