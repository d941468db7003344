"""WebSocket ASR server speaking WeNet's protocol (torch-free).

    wenet-moe-server --model_dir DIR --port 10086

Client -> server: text `{"signal":"start","nbest":1,"continuous_decoding":false}`
(optionally `"context": ["phrase", ...]`, hotwords for this connection only),
binary 16 kHz 16-bit mono PCM, text `{"signal":"end"}`. Server -> client:
`{"status":"ok","type":"server_ready"|"partial_result"|"final_result"|"speech_end"}`
(results carry `nbest`, a JSON string) or `{"status":"failed","message":...}`.
HTTP on the same port: `GET /health` (JSON) and the microphone page at `GET /`.
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
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

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


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 10086
    max_connections: int = 64
    max_message_bytes: int = 4 * 1024 * 1024
    idle_timeout: float = 60.0
    num_workers: int = 2
    max_batch: int = 1


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
        self.workers = InferenceWorkers(config.num_workers, config.max_batch)
        self.active = 0
        self.total_connections = 0
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
                               "chunk_size": self.model.info.chunk_size,
                               "sample_rate": 16000})
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
        if self.active >= self.config.max_connections:
            await _send(ws, failed(f"Too many connections: limit is {self.config.max_connections}"))
            await ws.close(1013, "too many connections")
            return
        self.active += 1
        try:
            await self._serve_connection(ws)
        except ConnectionClosed:
            pass
        finally:
            self.active -= 1

    async def _recv(self, ws: ServerConnection):
        """Next message, or None on idle timeout; raises ConnectionClosed. Returns
        the string "__shutdown__" sentinel object on server shutdown."""
        recv = asyncio.ensure_future(ws.recv())
        stop = asyncio.ensure_future(self.shutting_down.wait())
        done, _ = await asyncio.wait({recv, stop}, timeout=self.config.idle_timeout,
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
        decoder: Optional[StreamingDecoder] = None
        carry = b""  # odd trailing byte of a binary frame
        while True:
            msg = await self._recv(ws)
            if msg is None:
                await _send(ws, failed(f"Idle timeout: no message for {self.config.idle_timeout:g} s"))
                await ws.close(1000, "idle timeout")
                return
            if msg is _SHUTDOWN:
                if decoder is not None and not decoder.stopped:
                    await self._decode(ws, decoder, None, True)
                await ws.close(1001, "server shutting down")
                return
            if isinstance(msg, bytes):
                if len(msg) > self.config.max_message_bytes:
                    await _send(ws, failed(f"Message too large: {len(msg)} bytes, limit is "
                                           f"{self.config.max_message_bytes}"))
                    await ws.close(1009, "message too large")
                    return
                if decoder is None:
                    await _send(ws, failed("Start signal is expected before binary data"))
                    continue
                if decoder.stopped or decoder.input_done:
                    continue  # speech already ended: WeNet ignores the rest
                data = carry + msg
                carry = data[len(data) - (len(data) % 2):]
                pcm = np.frombuffer(data[: len(data) - len(carry)], dtype="<i2")
                if not await self._decode(ws, decoder, pcm, False):
                    return
                continue
            try:
                obj = json.loads(msg)
            except ValueError as exc:
                await _send(ws, failed(f"Wrong message header: malformed JSON ({exc})"))
                continue
            sig = obj.get("signal") if isinstance(obj, dict) else None
            if sig == "start":
                if decoder is not None and not decoder.stopped:
                    await _send(ws, failed("Start signal received twice"))
                    continue
                opts, error = self._start_options(obj)
                if error:
                    await _send(ws, failed(error))
                    continue
                decoder, carry = StreamingDecoder(self.model, opts), b""
                await _send(ws, json.dumps({"status": "ok", "type": "server_ready"}))
            elif sig == "end":
                if decoder is None:
                    await _send(ws, failed("End signal before start signal"))
                    continue
                if not decoder.stopped and not await self._decode(ws, decoder, None, True):
                    return
                await ws.close(1000, "done")
                return
            else:
                await _send(ws, failed(f"Unexpected signal type: {sig!r}" if sig is not None
                                       else "Wrong message header: no 'signal' field"))

    def _start_options(self, obj: dict):
        nbest = obj.get("nbest", 1)
        cont = obj.get("continuous_decoding", False)
        if not isinstance(nbest, int) or isinstance(nbest, bool) or nbest < 1:
            return None, f"Wrong message header: nbest must be a positive integer, got {nbest!r}"
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
        try:
            opts = DecodeOptions(chunk_size=base.chunk_size, beam_size=max(base.beam_size, nbest),
                                 nbest=nbest, mode=base.mode, ctc_weight=base.ctc_weight,
                                 rescoring_weight=base.rescoring_weight,
                                 reverse_weight=base.reverse_weight, continuous_decoding=cont,
                                 endpoint=base.endpoint, context=context, wfst=base.wfst)
        except ValueError as exc:
            return None, f"Wrong message header: {exc}"
        return opts, None

    async def _decode(self, ws: ServerConnection, decoder: StreamingDecoder,
                      pcm: Optional[np.ndarray], finish: bool) -> bool:
        """Run one decoding job and send its events; on an engine error reply
        `failed`, close with 1011 and return False."""
        try:
            events = await self.workers.submit(decoder, pcm, finish=finish)
        except Exception as exc:  # the engine failed on this stream only
            LOG.exception("decoding failed")
            await _send(ws, failed(f"Decoding error: {type(exc).__name__}: {exc}"))
            await ws.close(1011, "decoding error")
            return False
        await self._send_events(ws, events)
        return True

    async def _send_events(self, ws: ServerConnection, events: List[Event]) -> None:
        for event in events:
            await ws.send(event_message(event))

    # ------------------------------------------------------------ lifecycle
    async def start(self):
        self.shutting_down = asyncio.Event()
        self._server = await serve(
            self.handler, self.config.host, self.config.port,
            process_request=self.process_request,
            max_size=2 * self.config.max_message_bytes, compression=None,
            ping_interval=None)
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


async def _send(ws: ServerConnection, text: str) -> None:
    try:
        await ws.send(text)
    except ConnectionClosed:
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wenet-moe-server", description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True, help="directory of the ONNX export")
    p.add_argument("--port", type=int, default=10086, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max_connections", type=int, default=64)
    p.add_argument("--max_message_bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--idle_timeout", type=float, default=60.0, help="seconds")
    p.add_argument("--num_workers", type=int, default=2, help="inference threads")
    p.add_argument("--max_batch", type=int, default=1,
                   help="streams advanced together, their CTC heads in one call (measured: "
                        "no gain with WeNet's batch-1 encoder export, so off by default)")
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
    from .decode import add_lm_arguments
    add_lm_arguments(p)  # final results from TLG.fst + words.txt when the model dir has them
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
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        if args.max_connections < 1 or args.max_message_bytes < 2 or args.idle_timeout <= 0:
            raise ValueError("--max_connections, --max_message_bytes and --idle_timeout must be positive")
        model = OnnxAsrModel(args.model_dir, int8=args.int8, num_threads=args.num_threads)
        endpoint = EndpointConfig(args.blank_threshold, args.rule1_silence_ms,
                                  args.rule2_silence_ms, args.rule3_max_utterance_ms)
        from .decode import lm_from_args
        limits = ContextLimits(args.context_score, args.max_context_phrases, args.max_context_len)
        opts = DecodeOptions(chunk_size=args.chunk_size, beam_size=args.beam_size, mode=args.mode,
                             ctc_weight=args.ctc_weight, rescoring_weight=args.rescoring_weight,
                             reverse_weight=args.reverse_weight, endpoint=endpoint,
                             context=context_from_args(args, model.symbols),
                             wfst=lm_from_args(args, args.model_dir, model.symbols, args.mode))
        from .decoder import resolve_chunk_size
        resolve_chunk_size(model, args.chunk_size)
    except (ModelError, ValueError) as exc:
        print(f"wenet-moe-server: error: {exc}", file=sys.stderr)
        return 1
    config = ServerConfig(args.host, args.port, args.max_connections, args.max_message_bytes,
                          args.idle_timeout, args.num_workers, args.max_batch)
    try:
        asyncio.run(_serve(AsrServer(model, config, opts, limits)))
    except OSError as exc:
        print(f"wenet-moe-server: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
