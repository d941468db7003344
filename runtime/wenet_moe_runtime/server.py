"""WebSocket ASR server speaking WeNet's protocol (torch-free).

    wenet-moe-server --model_dir DIR --port 10086

Client -> server: text `{"signal":"start","nbest":1,"continuous_decoding":false}`
(optionally `"context": ["phrase", ...]`, hotwords for this connection only),
binary 16 kHz 16-bit mono PCM, text `{"signal":"end"}`. Server -> client:
`{"status":"ok","type":"server_ready"|"partial_result"|"final_result"|"speech_end"}`
(results carry `nbest`, a JSON string) or `{"status":"failed","message":...}`.
HTTP on the same port: `GET /health` (JSON) and the microphone page at `GET /`.

No client can crash, stall or starve the server: `nbest` is capped (`--max_nbest`,
never above the beam); text frames are size-checked before parsing and bad JSON
(also nested too deeply) gets a `failed` reply; audio is decoded in slices of
`--max_chunks_per_job` chunks that the workers serve round robin; a stream may send
at most `--max_audio_rate` x real time on average (beyond a burst of
`--audio_burst_s`), after which its socket is not read (TCP back-pressure); a
connection slot is bounded by keepalive pings, a send timeout, an idle timeout that
only messages doing work reset, `--max_session_s` and `--max_connections_per_ip`.
"""
from __future__ import annotations

import argparse
import asyncio
import http
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import encoder_choice
from .batching import InferenceWorkers
from .context import (ContextError, ContextLimits, add_context_arguments,
                      build_context_graph, context_from_args)
from .decoder import MODES, DecodeOptions, Event, StreamingDecoder
from .endpoint import EndpointConfig
from .model import ModelError, OnnxAsrModel

LOG = logging.getLogger("wenet_moe_runtime.server")
WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
TYPE_NAMES = {"partial": "partial_result", "final": "final_result", "speech_end": "speech_end"}
DEFAULT_BATCHED_MAX_BATCH = 16   # --max_batch 0 with encoder_batch.onnx loaded
# --batch_wait_ms -1 with encoder_batch.onnx loaded: batch only the jobs already queued
# (lowest latency). Measured (bench/server_load.py --compare, 16 real-time streams, 2
# cores, paper Dense-S vs MoE): 150 ms cut MoE/Dense-S CPU per audio second from
# 1.16-1.19 to 1.07 and p95 final latency rose from 130 / 180-290 ms to 250 / 367 ms.
# With the MoE FFNs in the C kernel and outputs of equal length (--calibrate_blank 0.7)
# 0 ms gives 1.06-1.11 (README, "Many streams"; runtime/README.md).
DEFAULT_BATCH_WAIT_MS = 0.0


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 10086
    max_connections: int = 64
    max_message_bytes: int = 4 * 1024 * 1024
    idle_timeout: float = 60.0
    num_workers: int = 2
    max_batch: int = 0                    # 0: 16 with the batched encoder, else 1
    max_text_bytes: int = 64 * 1024       # text frames above this are refused unparsed
    max_nbest: int = 0                    # 0: the beam size
    max_session_s: float = 0.0            # 0: unlimited
    max_connections_per_ip: int = 0       # 0: only max_connections (e.g. behind a proxy)
    ping_interval: float = 20.0           # keepalive pings (0: off)
    ping_timeout: float = 20.0
    send_timeout: float = 10.0            # a reply that cannot be written in time drops the client
    max_audio_rate: float = 10.0          # audio s per s a stream may send on average (0: no limit)
    audio_burst_s: float = 20.0           # audio a stream may send ahead of that rate
    max_chunks_per_job: int = 2           # encoder chunks of one stream per worker job (0: no limit)
    batch_wait_ms: float = -1.0           # < 0: DEFAULT_BATCH_WAIT_MS with the batched encoder, else 0


class ClientGone(Exception):
    """A reply could not be written within the send timeout; the connection was aborted."""


class AudioBudget:
    """Token bucket of audio seconds: refills at `rate` per second up to `burst`.

    `spend()` may overdraw it (a frame already read is decoded); `wait_s()` is how
    long to stop reading the socket until the balance is back to zero.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.stamp = self.burst, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + self.rate * (now - self.stamp))
        self.stamp = now

    def spend(self, seconds: float) -> None:
        self._refill()
        self.tokens -= seconds

    def wait_s(self) -> float:
        if self.rate <= 0:
            return 0.0
        self._refill()
        return max(0.0, -self.tokens / self.rate)


def failed(message: str) -> str:
    return json.dumps({"status": "failed", "message": message})


def event_message(event: Event) -> str:
    kind, nbest = event
    msg = {"status": "ok", "type": TYPE_NAMES[kind]}
    if nbest is not None:
        msg["nbest"] = json.dumps(nbest, ensure_ascii=False)
    return json.dumps(msg, ensure_ascii=False)


class AsrServer:
    """Serves one model to many connections; inference runs in `InferenceWorkers`."""

    def __init__(self, model: OnnxAsrModel, config: ServerConfig, opts: DecodeOptions,
                 context_limits: Optional[ContextLimits] = None) -> None:
        self.model = model
        self.config = config
        self.opts = opts
        self.context_limits = context_limits or ContextLimits()
        info = model.info
        chunk = opts.chunk_size or info.chunk_size
        chunk_samples = (chunk * info.subsampling_rate * info.fbank.frame_shift_samples
                         if chunk > 0 else 0)
        max_batch = config.max_batch if config.max_batch > 0 else (
            DEFAULT_BATCHED_MAX_BATCH if model.batched else 1)
        # a worker's batch of streams is also the most the batched encoder runs at once
        model.max_encoder_batch = max_batch
        wait_ms = config.batch_wait_ms if config.batch_wait_ms >= 0 else (
            DEFAULT_BATCH_WAIT_MS if model.batched else 0.0)
        self.workers = InferenceWorkers(config.num_workers, max_batch,
                                        config.max_chunks_per_job * chunk_samples,
                                        wait_ms / 1000.0)
        self.max_nbest = config.max_nbest or opts.beam_size
        if self.max_nbest > opts.beam_size:
            raise ValueError(f"--max_nbest {self.max_nbest} is more than --beam_size "
                             f"{opts.beam_size}: the beam is what the n-best comes from")
        self.active = 0
        self.per_ip: Dict[str, int] = {}
        self.total_connections = 0
        self.dropped_clients = 0          # aborted by the send timeout
        self.throttle_pauses = 0          # times a stream's socket was left unread (rate limit)
        self.shutting_down: Optional[asyncio.Event] = None
        self._server = None

    # ------------------------------------------------------------------ HTTP
    def process_request(self, connection: ServerConnection, request: Request) -> Optional[Response]:
        """Plain HTTP requests on the WebSocket port: /health and the web page."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        path = request.path.split("?", 1)[0]
        if path == "/health":
            body = json.dumps({"status": "ok", "active_connections": self.active,
                               "max_connections": self.config.max_connections,
                               "total_connections": self.total_connections,
                               "dropped_clients": self.dropped_clients,
                               "throttle_pauses": self.throttle_pauses,
                               "chunk_size": self.model.info.chunk_size,
                               "sample_rate": 16000,
                               "batched_encoder": self.model.batched,
                               "kernel_experts": self.model.kernel_experts,
                               "kernel_graph": self.model.kernel_graph,
                               "encoder_choice": self.model.encoder_choice,
                               "max_batch": self.workers.max_batch,
                               "batch_wait_ms": 1000.0 * self.workers.batch_wait_s,
                               "held_batches": self.workers.held_batches,
                               "encoder_batched_calls": self.model.batched_calls,
                               "encoder_batched_streams": self.model.batched_streams,
                               "encoder_single_calls": self.model.single_calls,
                               "session_cpu_s": {k: round(v, 3) for k, v in
                                                 self.model.session_cpu_s.items()}})
            return _response(http.HTTPStatus.OK, body, "application/json")
        name = "index.html" if path in ("/", "/index.html") else path.lstrip("/")
        full = os.path.join(WEB_DIR, name)
        if "/" in name or ".." in name or not os.path.isfile(full):
            return _response(http.HTTPStatus.NOT_FOUND, "not found\n", "text/plain; charset=utf-8")
        with open(full, "rb") as f:
            data = f.read()
        ctype = CONTENT_TYPES.get(os.path.splitext(name)[1], "application/octet-stream")
        return _response(http.HTTPStatus.OK, data, ctype)

    # ------------------------------------------------------------- WebSocket
    async def handler(self, ws: ServerConnection) -> None:
        self.total_connections += 1
        cfg = self.config
        ip = str(ws.remote_address[0]) if ws.remote_address else "?"
        try:
            if self.active >= cfg.max_connections:
                await self._send(ws, failed(f"Too many connections: limit is {cfg.max_connections}"))
                await ws.close(1013, "too many connections")
                return
            if 0 < cfg.max_connections_per_ip <= self.per_ip.get(ip, 0):
                await self._send(ws, failed(f"Too many connections from {ip}: limit is "
                                            f"{cfg.max_connections_per_ip}"))
                await ws.close(1013, "too many connections from this address")
                return
        except ClientGone:
            return
        self.active += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        try:
            await self._serve_connection(ws)
        except ConnectionClosed:
            pass
        except ClientGone:
            self.dropped_clients += 1
            LOG.warning("%s: reply not read within %g s: connection aborted", ip, cfg.send_timeout)
        finally:
            self.active -= 1
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]

    async def _recv(self, ws: ServerConnection, timeout: float):
        """Next message, or None after `timeout` s; raises ConnectionClosed. Returns
        the `_SHUTDOWN` sentinel object on server shutdown."""
        recv = asyncio.ensure_future(ws.recv())
        stop = asyncio.ensure_future(self.shutting_down.wait())
        done, _ = await asyncio.wait({recv, stop}, timeout=max(timeout, 0.0),
                                     return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if recv in done:
            return recv.result()
        recv.cancel()
        try:
            await recv
        except (asyncio.CancelledError, ConnectionClosed):
            pass
        return _SHUTDOWN if stop in done else None

    async def _serve_connection(self, ws: ServerConnection) -> None:
        cfg = self.config
        decoder: Optional[StreamingDecoder] = None
        carry = b""  # odd trailing byte of a binary frame
        opened = last_work = started = time.monotonic()
        budget = AudioBudget(cfg.max_audio_rate, cfg.audio_burst_s)
        bytes_per_s = 2.0 * self.model.info.fbank.sample_rate
        while True:
            if not self.shutting_down.is_set():
                pause = budget.wait_s()
                if pause > 0:   # over its audio rate: leave its frames unread (back-pressure)
                    self.throttle_pauses += 1
                    try:
                        await asyncio.wait_for(self.shutting_down.wait(), pause)
                    except asyncio.TimeoutError:
                        pass
                    last_work = time.monotonic()
            now = time.monotonic()
            idle_end = last_work + cfg.idle_timeout
            session_end = opened + cfg.max_session_s if cfg.max_session_s > 0 else float("inf")
            msg = (_SHUTDOWN if self.shutting_down.is_set()
                   else await self._recv(ws, min(idle_end, session_end) - now))
            if msg is None or msg is _SHUTDOWN:
                ended = msg is _SHUTDOWN or time.monotonic() >= session_end
                if ended and decoder is not None and not decoder.stopped:   # final results first
                    await self._decode(ws, decoder, None, True, started)
                if msg is _SHUTDOWN:
                    await ws.close(1001, "server shutting down")
                elif time.monotonic() >= session_end:
                    await self._send(ws, failed(f"Session too long: limit is {cfg.max_session_s:g} s"))
                    await ws.close(1008, "session too long")
                else:
                    await self._send(ws, failed(f"Idle timeout: no message for {cfg.idle_timeout:g} s"))
                    await ws.close(1000, "idle timeout")
                return
            if isinstance(msg, bytes):
                budget.spend(len(msg) / bytes_per_s)
                if len(msg) > cfg.max_message_bytes:
                    await self._send(ws, failed(f"Message too large: {len(msg)} bytes, limit is "
                                                f"{cfg.max_message_bytes}"))
                    await ws.close(1009, "message too large")
                    return
                if decoder is None:
                    await self._send(ws, failed("Start signal is expected before binary data"))
                    continue
                if decoder.stopped or decoder.input_done:
                    continue  # speech already ended: WeNet ignores the rest (no work: idle)
                data = carry + msg
                carry = data[len(data) - (len(data) % 2):]
                pcm = np.frombuffer(data[: len(data) - len(carry)], dtype="<i2")
                if pcm.size:
                    if not await self._decode(ws, decoder, pcm, False, started):
                        return
                    last_work = time.monotonic()
                continue
            if len(msg) > cfg.max_text_bytes:   # checked before parsing
                await self._send(ws, failed(f"Message too large: text of {len(msg)} characters, "
                                            f"limit is {cfg.max_text_bytes}"))
                continue
            try:
                obj = json.loads(msg)
            except ValueError as exc:
                await self._send(ws, failed(f"Wrong message header: malformed JSON ({exc})"))
                continue
            except RecursionError:
                await self._send(ws, failed("Wrong message header: malformed JSON (nested too deeply)"))
                continue
            sig = obj.get("signal") if isinstance(obj, dict) else None
            if sig == "start":
                if decoder is not None and not decoder.stopped:
                    await self._send(ws, failed("Start signal received twice"))
                    continue
                opts, error = self._start_options(obj)
                if error:
                    await self._send(ws, failed(error))
                    continue
                decoder, carry = StreamingDecoder(self.model, opts), b""
                last_work = started = time.monotonic()
                await self._send(ws, json.dumps({"status": "ok", "type": "server_ready"}))
            elif sig == "end":
                if decoder is None:
                    await self._send(ws, failed("End signal before start signal"))
                    continue
                if not decoder.stopped and not await self._decode(ws, decoder, None, True, started):
                    return
                await ws.close(1000, "done")
                return
            else:
                await self._send(ws, failed(f"Unexpected signal type: {sig!r}" if sig is not None
                                            else "Wrong message header: no 'signal' field"))

    def _start_options(self, obj: dict):
        nbest = obj.get("nbest", 1)
        cont = obj.get("continuous_decoding", False)
        if not isinstance(nbest, int) or isinstance(nbest, bool) or nbest < 1:
            return None, f"Wrong message header: nbest must be a positive integer, got {nbest!r}"
        if nbest > self.max_nbest:
            return None, (f"Wrong message header: nbest {nbest} is more than the server's "
                          f"limit {self.max_nbest}")
        if not isinstance(cont, bool):
            return None, f"Wrong message header: continuous_decoding must be a boolean, got {cont!r}"
        base = self.opts
        context = base.context
        if "context" in obj:  # this connection's hotwords replace the server's
            phrases, lim = obj["context"], self.context_limits
            if not isinstance(phrases, list):
                return None, f"Wrong message header: context must be a list of strings, got {phrases!r:.80}"
            if base.mode == "ctc_greedy":
                return None, "Wrong message header: context needs a beam search mode (server runs ctc_greedy)"
            try:
                context = (build_context_graph(self.model.symbols, phrases, lim.score,
                                               lim.max_phrases, lim.max_len) if phrases else None)
            except ContextError as exc:
                return None, f"Wrong message header: {exc}"
            states = base.wfst.base.graph.num_states if base.wfst is not None else 0
            if context is not None and states > lim.max_graph_states:
                return None, ("Wrong message header: context: this server's LM graph has "
                              f"{states} states, more than --max_context_graph_states "
                              f"{lim.max_graph_states} for per-connection hotwords")
        try:
            opts = DecodeOptions(chunk_size=base.chunk_size, beam_size=base.beam_size,
                                 nbest=nbest, mode=base.mode, ctc_weight=base.ctc_weight,
                                 rescoring_weight=base.rescoring_weight,
                                 reverse_weight=base.reverse_weight, continuous_decoding=cont,
                                 endpoint=base.endpoint, context=context, wfst=base.wfst,
                                 max_left_chunks=base.max_left_chunks)
        except ValueError as exc:
            return None, f"Wrong message header: {exc}"
        return opts, None

    async def _decode(self, ws: ServerConnection, decoder: StreamingDecoder,
                      pcm: Optional[np.ndarray], finish: bool, started: float) -> bool:
        """Decode in slices (round robin with other streams), sending each slice's
        events; on an engine error reply `failed`, close with 1011 and return False.
        A stream not ahead of real time (by more than 1 s) since `started` (monotonic
        time of its start signal) goes in the urgent class."""
        ahead = decoder.samples_received / decoder.sample_rate - (time.monotonic() - started)
        try:
            async for events in self.workers.slices(decoder, pcm, finish=finish, urgent=ahead <= 1.0):
                for event in events:
                    await self._send(ws, event_message(event), quiet=False)
        except (ConnectionClosed, ClientGone):
            raise
        except Exception as exc:  # the engine failed on this stream only
            LOG.exception("decoding failed")
            await self._send(ws, failed(f"Decoding error: {type(exc).__name__}: {exc}"))
            await ws.close(1011, "decoding error")
            return False
        return True

    async def _send(self, ws: ServerConnection, text: str, quiet: bool = True) -> None:
        """Send with `send_timeout`: a client that does not read is aborted (ClientGone).
        `quiet`: a closed connection is ignored (else ConnectionClosed propagates)."""
        try:
            await asyncio.wait_for(ws.send(text), self.config.send_timeout)
        except asyncio.TimeoutError:
            ws.transport.abort()
            raise ClientGone() from None
        except ConnectionClosed:
            if not quiet:
                raise

    # ------------------------------------------------------------ lifecycle
    async def start(self):
        self.shutting_down = asyncio.Event()
        self._server = await serve(
            self.handler, self.config.host, self.config.port,
            process_request=self.process_request,
            max_size=max(2 * self.config.max_message_bytes, self.config.max_text_bytes + 1),
            max_queue=4, compression=None,
            ping_interval=self.config.ping_interval or None,
            ping_timeout=self.config.ping_timeout or None,
            close_timeout=self.config.send_timeout)
        return self._server

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def shutdown(self) -> None:
        """Stop accepting, finish in-flight streams (final results), close them."""
        self._server.close(close_connections=False)
        self.shutting_down.set()
        await self._server.wait_closed()
        self.workers.shutdown()


_SHUTDOWN = object()


def _response(status: http.HTTPStatus, body, ctype: str) -> Response:
    data = body.encode("utf-8") if isinstance(body, str) else body
    headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(data))),
                       ("Cache-Control", "no-store"), ("Connection", "close")])
    return Response(status.value, status.phrase, headers, data)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wenet-moe-server", description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True, help="directory of the ONNX export")
    p.add_argument("--port", type=int, default=10086, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max_connections", type=int, default=64)
    p.add_argument("--max_message_bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--idle_timeout", type=float, default=60.0,
                   help="seconds without a message that does work (start, audio being decoded, end)")
    p.add_argument("--max_text_bytes", type=int, default=64 * 1024,
                   help="text frames above this are refused before parsing")
    p.add_argument("--max_nbest", type=int, default=0,
                   help="largest nbest a client may ask for (0: --beam_size; never above it)")
    p.add_argument("--max_session_s", type=float, default=0.0,
                   help="longest connection in seconds (0: unlimited)")
    p.add_argument("--max_connections_per_ip", type=int, default=0,
                   help="connections one client address may hold (0: no limit besides "
                        "--max_connections; behind a proxy every client shares one address)")
    p.add_argument("--ping_interval", type=float, default=20.0, help="keepalive pings, s (0: off)")
    p.add_argument("--ping_timeout", type=float, default=20.0, help="s to wait for a pong")
    p.add_argument("--send_timeout", type=float, default=10.0,
                   help="s to write a reply; a client that does not read is dropped")
    p.add_argument("--max_audio_rate", type=float, default=10.0,
                   help="audio seconds per second a stream may send on average; beyond it its "
                        "socket is not read (0: no limit)")
    p.add_argument("--audio_burst_s", type=float, default=20.0,
                   help="audio seconds a stream may send ahead of --max_audio_rate")
    p.add_argument("--max_chunks_per_job", type=int, default=2,
                   help="encoder chunks of one stream per worker job; streams take turns (0: no limit)")
    p.add_argument("--max_left_chunks", type=int, default=-1,
                   help="attention cache kept at serving time, in chunks, for exports with "
                        "unlimited left context (-1: all of the segment)")
    p.add_argument("--num_workers", type=int, default=2, help="inference threads")
    p.add_argument("--max_batch", type=int, default=0,
                   help="most streams a worker advances together: their encoder chunks in one "
                        "call of encoder_batch.onnx (when the export has it, fp32) and their "
                        "CTC heads in one call; 0: 16 with the batched encoder, 1 without "
                        "(measured: no gain from batching the CTC heads alone)")
    p.add_argument("--batch_wait_ms", type=float, default=-1.0,
                   help="longest an urgent job waits in the queue for other open streams' jobs "
                        "to batch with; never for a lone stream or a stream's last audio "
                        "(-1: %g with the batched encoder, else 0)"
                        % DEFAULT_BATCH_WAIT_MS)
    p.add_argument("--no_batch_encoder", action="store_true",
                   help="ignore encoder_batch.onnx: run every stream's chunks through "
                        "encoder.onnx one at a time")
    encoder_choice.add_arguments(p)
    p.add_argument("--num_threads", type=int, default=1, help="ONNX Runtime threads per call")
    p.add_argument("--chunk_size", type=int, default=0, help="0: the export's chunk size")
    p.add_argument("--int8", action="store_true", help="serve the *.int8.onnx models")
    p.add_argument("--mode", default="attention_rescoring", choices=MODES,
                   help="final results: CTC greedy, CTC prefix beam, or rescored n-best")
    p.add_argument("--beam_size", type=int, default=10)
    p.add_argument("--ctc_weight", type=float, default=0.5)
    p.add_argument("--rescoring_weight", type=float, default=1.0)
    p.add_argument("--reverse_weight", type=float, default=None)
    p.add_argument("--blank_threshold", type=float, default=0.8)
    p.add_argument("--rule1_silence_ms", type=int, default=5000)
    p.add_argument("--rule2_silence_ms", type=int, default=1000)
    p.add_argument("--rule3_max_utterance_ms", type=int, default=20000)
    add_context_arguments(p)  # a start message's "context" replaces --context_path's list
    p.add_argument("--max_context_graph_states", type=int,
                   default=ContextLimits.max_graph_states,
                   help="with an LM graph, per-connection hotwords (composed with the graph, "
                        "once per distinct list) only for graphs of at most this many states")
    from .decode import add_lm_arguments
    add_lm_arguments(p)  # final results from TLG.fst + words.txt when the model dir has them
    p.add_argument("--switch_interval_ms", type=float, default=0.2,
                   help="Python's thread switch interval (its default is 5 ms)")
    p.add_argument("--log_level", default="WARNING")
    return p


async def _serve(server: AsrServer) -> None:
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"wenet-moe-server listening on ws://{server.config.host}:{server.port}", flush=True)
    await stop.wait()
    print("wenet-moe-server shutting down", flush=True)
    await server.shutdown()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Inference threads hand the GIL back and forth around every ONNX Runtime call;
    # a short switch interval keeps a real-time stream's job from waiting up to 5 ms
    # per hand-over while a backlog job runs Python search code.
    sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        if args.max_connections < 1 or args.max_message_bytes < 2 or args.idle_timeout <= 0:
            raise ValueError("--max_connections, --max_message_bytes and --idle_timeout must be positive")
        if args.max_text_bytes < 64 or args.send_timeout <= 0 or args.audio_burst_s <= 0:
            raise ValueError("--max_text_bytes (>= 64), --send_timeout and --audio_burst_s must be positive")
        for name in ("max_nbest", "max_session_s", "max_connections_per_ip", "ping_interval",
                     "ping_timeout", "max_audio_rate", "max_chunks_per_job"):
            if getattr(args, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
        if args.max_nbest > args.beam_size:
            raise ValueError(f"--max_nbest {args.max_nbest} is more than --beam_size {args.beam_size}")
        if args.max_batch < 0:
            raise ValueError(f"--max_batch must be >= 0, got {args.max_batch}")
        model = OnnxAsrModel(args.model_dir, int8=args.int8, num_threads=args.num_threads,
                             batch_encoder=not args.no_batch_encoder,
                             kernel_experts=encoder_choice.from_arguments(args))
        endpoint = EndpointConfig(args.blank_threshold, args.rule1_silence_ms,
                                  args.rule2_silence_ms, args.rule3_max_utterance_ms)
        from .decode import lm_from_args
        limits = ContextLimits(args.context_score, args.max_context_phrases, args.max_context_len,
                               args.max_context_graph_states)
        opts = DecodeOptions(chunk_size=args.chunk_size, beam_size=args.beam_size, mode=args.mode,
                             ctc_weight=args.ctc_weight, rescoring_weight=args.rescoring_weight,
                             reverse_weight=args.reverse_weight, endpoint=endpoint,
                             context=context_from_args(args, model.symbols),
                             wfst=lm_from_args(args, args.model_dir, model.symbols, args.mode),
                             max_left_chunks=args.max_left_chunks)
        from .decoder import resolve_chunk_size
        resolve_chunk_size(model, args.chunk_size)
    except (ModelError, ValueError) as exc:
        print(f"wenet-moe-server: error: {exc}", file=sys.stderr)
        return 1
    config = ServerConfig(args.host, args.port, args.max_connections, args.max_message_bytes,
                          args.idle_timeout, args.num_workers, args.max_batch,
                          args.max_text_bytes, args.max_nbest, args.max_session_s,
                          args.max_connections_per_ip, args.ping_interval, args.ping_timeout,
                          args.send_timeout, args.max_audio_rate, args.audio_burst_s,
                          args.max_chunks_per_job, args.batch_wait_ms)
    try:
        asyncio.run(_serve(AsrServer(model, config, opts, limits)))
    except OSError as exc:
        print(f"wenet-moe-server: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
