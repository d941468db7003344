"""Helpers of the runtime tests (a uniquely named module, so that it cannot be
confused with another directory's conftest): the training set of the tiny model,
its fbank, and a server subprocess on 127.0.0.1."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# (token ids, seed, trailing silence in s): the utterances the tiny model overfits.
TRAIN_SET = [([2, 3, 4, 5], 0, 0.3), ([6, 7, 2], 1, 0.3), ([3, 5, 7, 4, 2], 2, 0.3),
             ([4, 4, 6], 3, 0.3), ([7, 6, 5, 3], 4, 0.3), ([2, 6, 3], 5, 0.3),
             ([5, 2, 7], 6, 1.3), ([2, 3, 4, 5], 7, 1.3)]
CHUNK = 4
PAUSE_SAMPLES = 24000           # 1.5 s of digital silence between the two sentences


def two_sentences():
    """The 'two' test wav (sentences [2,3,4,5] and [6,7,2], 1.5 s of digital
    silence between them) and its tone spans (see rt_tiny_model.tone_spans)."""
    import rt_tiny_model as T
    first = T.synth([2, 3, 4, 5], seed=0)
    wav = np.concatenate([first, np.zeros(PAUSE_SAMPLES, np.int16), T.synth([6, 7, 2], seed=1)])
    return wav, T.tone_spans([2, 3, 4, 5]) + T.tone_spans([6, 7, 2], start=len(first) + PAUSE_SAMPLES)


def fbank_fn():
    from wenet_moe_runtime.features import FbankOptions, compute_fbank
    opts = FbankOptions()
    return opts, (lambda w: compute_fbank(w.astype(np.float32) / 32768.0, 16000, opts))


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


def tiny_moe_conf(units_path: str, vocab: int, reverse_weight: float = 0.3,
                  decoder_moe: bool = False, cmvn_file: str = "",
                  fbank_conf: dict = None) -> dict:
    """Config of the tiny streaming MoE Conformer the runtime tests export (d=32, 2
    blocks, 4 experts top-2, causal conv, kernel 3; bidirectional decoder, MoE FFNs
    too when `decoder_moe`); `<sos/eos>` is the last unit; global CMVN when
    `cmvn_file` is given."""
    moe = {"mlp_type": "moe", "n_expert": 4, "n_expert_activated": 2}
    conf = {
        "input_dim": 80, "output_dim": vocab, "encoder": "conformer",
        "encoder_conf": {"output_size": 32, "attention_heads": 2, "linear_units": 48,
                         "num_blocks": 2, "cnn_module_kernel": 3, "causal": True,
                         "use_dynamic_chunk": True, "cnn_module_norm": "layer_norm",
                         "input_layer": "conv2d", "dropout_rate": 0.0,
                         "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0, **moe},
        "decoder": "bitransformer",
        "decoder_conf": {"attention_heads": 2, "linear_units": 48, "num_blocks": 1,
                         "r_num_blocks": 1, "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
                         "self_attention_dropout_rate": 0.0, "src_attention_dropout_rate": 0.0,
                         **(moe if decoder_moe else {})},
        "ctc": "ctc", "ctc_conf": {"ctc_blank_id": 0}, "model": "asr_model",
        "model_conf": {"ctc_weight": 0.3, "reverse_weight": reverse_weight, "lsm_weight": 0.0,
                       "length_normalized_loss": False},
        "moe_conf": {"router": "topk"}, "tokenizer": "char",
        "tokenizer_conf": {"symbol_table_path": units_path, "split_with_space": False,
                           "special_tokens": {"<blank>": 0, "<unk>": 1, "<sos>": vocab - 1,
                                              "<eos>": vocab - 1}},
        "dataset_conf": {"fbank_conf": fbank_conf or {"num_mel_bins": 80, "frame_shift": 10,
                                                      "frame_length": 25, "dither": 0.0}},
    }
    if cmvn_file:
        conf["cmvn"] = "global_cmvn"
        conf["cmvn_conf"] = {"cmvn_file": cmvn_file, "is_json_cmvn": True}
    return conf


# ------------------------------------------------------------ shared test helpers
def stream_decode(model, samples, opts, step=1600, decoder_class=None):
    """Feed `samples` in `step`-sample pieces to a new StreamingDecoder (or
    `decoder_class`), then end the input; returns (decoder, [(kind, payload), ...] events)."""
    from wenet_moe_runtime.decoder import StreamingDecoder
    dec = (decoder_class or StreamingDecoder)(model, opts)
    events = []
    for k in range(0, len(samples), step):
        dec.accept_waveform(samples[k: k + step])
        events += dec.advance()
    dec.input_finished()
    events += dec.advance()
    return dec, events


def run_async(coro, timeout: float = 60.0):
    """Runs a coroutine to completion, failing after `timeout` seconds."""
    import asyncio
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def recv_json(ws, timeout: float = 20.0):
    import asyncio
    import json
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def start_stream(ws, **kw):
    """Sends WeNet's start signal (nbest 1, no continuous decoding unless given)."""
    import json
    await ws.send(json.dumps({"signal": "start", "nbest": 1, "continuous_decoding": False, **kw}))
    assert await recv_json(ws) == {"status": "ok", "type": "server_ready"}
