"""WebSocket client for wenet-moe-server (and WeNet's server).

    wenet-moe-client --server ws://127.0.0.1:10086 a.wav b.wav [--realtime]

Streams each wav as `--chunk_ms` binary frames of 16-bit PCM (paced in real time
with `--realtime`, otherwise as fast as possible) and prints partial and final
results: `key<TAB>partial<TAB>text` and `key<TAB>final<TAB>text`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidURI, InvalidHandshake

from .wavio import read_wav


@dataclass
class StreamResult:
    """What the server answered for one stream (times in seconds since start)."""
    partials: List[str] = field(default_factory=list)
    finals: List[list] = field(default_factory=list)   # decoded nbest lists
    failures: List[str] = field(default_factory=list)
    first_partial_s: Optional[float] = None
    final_s: Optional[float] = None       # last final result
    audio_end_s: Optional[float] = None   # when the last audio frame was sent
    speech_end: bool = False

    @property
    def text(self) -> str:
        """Concatenated best sentences of all final results."""
        return "".join(f[0]["sentence"] for f in self.finals if f)


async def stream_samples(uri: str, samples: np.ndarray, sample_rate: int = 16000,
                         chunk_ms: int = 500, realtime: bool = False, nbest: int = 1,
                         continuous_decoding: bool = False, on_message=None,
                         timeout: float = 120.0) -> StreamResult:
    """Send one utterance over a new connection and collect the replies.

    Args:
        samples: int16 PCM (N,).
        on_message: optional callback(dict) for every JSON reply.
    """
    result = StreamResult()
    step = max(1, int(sample_rate * chunk_ms / 1000))
    async with connect(uri, max_size=None, open_timeout=timeout, close_timeout=5,
                       ping_interval=None) as ws:
        t0 = time.monotonic()
        await ws.send(json.dumps({"signal": "start", "nbest": nbest,
                                  "continuous_decoding": continuous_decoding}))

        async def sender() -> None:
            pcm = np.asarray(samples, dtype="<i2")
            for i, start in enumerate(range(0, pcm.shape[0], step)):
                if realtime:
                    delay = t0 + i * chunk_ms / 1000.0 - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await ws.send(pcm[start: start + step].tobytes())
            if realtime:  # the last frame's audio has "happened" one chunk later
                delay = t0 + pcm.shape[0] / sample_rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            result.audio_end_s = time.monotonic() - t0
            await ws.send(json.dumps({"signal": "end"}))

        async def receiver() -> None:
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    now = time.monotonic() - t0
                    if on_message is not None:
                        on_message(msg)
                    if msg.get("status") != "ok":
                        result.failures.append(str(msg.get("message")))
                        continue
                    kind = msg.get("type")
                    if kind == "partial_result":
                        if result.first_partial_s is None:
                            result.first_partial_s = now
                        result.partials.append(json.loads(msg["nbest"])[0]["sentence"])
                    elif kind == "final_result":
                        result.finals.append(json.loads(msg["nbest"]))
                        result.final_s = now
                    elif kind == "speech_end":
                        result.speech_end = True
            except ConnectionClosed:
                pass

        recv_task = asyncio.ensure_future(receiver())
        try:
            await asyncio.wait_for(sender(), timeout)
        except ConnectionClosed:
            pass
        await asyncio.wait_for(recv_task, timeout)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wenet-moe-client", description=__doc__.splitlines()[0])
    p.add_argument("--server", default="ws://127.0.0.1:10086", help="ws://host:port")
    p.add_argument("wavs", nargs="+", help="16 kHz 16-bit mono wav files")
    p.add_argument("--realtime", action="store_true", help="pace the audio in real time")
    p.add_argument("--chunk_ms", type=int, default=500, help="audio per binary frame")
    p.add_argument("--nbest", type=int, default=1)
    p.add_argument("--continuous_decoding", action="store_true")
    p.add_argument("--quiet_partial", action="store_true", help="print final results only")
    return p


async def _run(args: argparse.Namespace) -> int:
    status = 0
    for path in args.wavs:
        key = os.path.splitext(os.path.basename(path))[0]
        samples, rate = read_wav(path)
        if rate != 16000:
            raise ValueError(f"{path}: sample rate {rate} Hz, the server expects 16000 Hz")

        def show(msg: dict, key: str = key) -> None:
            if msg.get("status") != "ok":
                print(f"{key}\tfailed\t{msg.get('message')}", flush=True)
            elif msg.get("type") == "partial_result" and not args.quiet_partial:
                print(f"{key}\tpartial\t{json.loads(msg['nbest'])[0]['sentence']}", flush=True)
            elif msg.get("type") == "final_result":
                nbest = json.loads(msg["nbest"])
                if args.nbest > 1:
                    print(f"{key}\tfinal\t{json.dumps(nbest, ensure_ascii=False)}", flush=True)
                else:
                    print(f"{key}\tfinal\t{nbest[0]['sentence'] if nbest else ''}", flush=True)

        res = await stream_samples(args.server, samples, rate, args.chunk_ms, args.realtime,
                                   args.nbest, args.continuous_decoding, on_message=show)
        if res.failures or not res.finals:
            status = 1
    return status


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except (OSError, ValueError, InvalidURI, InvalidHandshake, asyncio.TimeoutError) as exc:
        print(f"wenet-moe-client: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
