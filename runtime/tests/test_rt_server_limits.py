"""Server limits over loopback (issue 12): nbest capped by the beam, text frames
size-checked before parsing, nested JSON, per-IP limit, idle timer that ignored audio
does not reset, session limit, keepalive pings, rate limit with back-pressure, send
timeout (also during graceful shutdown), greedy mode. Every connection is on
127.0.0.1 and bounded in time; no assertion is on timing."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rt_fixtures import ServerProcess, recv_json, run_async, start_stream
from wenet_moe_runtime.client import stream_samples
from wenet_moe_runtime.decoder import DecodeOptions, StreamingDecoder
from wenet_moe_runtime.model import OnnxAsrModel
from wenet_moe_runtime.offline import decode_samples
from wenet_moe_runtime.wavio import read_wav

T_OUT = 90
start = start_stream


def run(coro):
    return run_async(coro, T_OUT)


async def drain(ws):
    msgs = []
    try:
        async for raw in ws:
            msgs.append(json.loads(raw))
    except ConnectionClosed:
        pass
    return msgs


def health(url):
    with urllib.request.urlopen(url.replace("ws:", "http:") + "/health", timeout=10) as r:
        return json.loads(r.read())


def wait_idle(url, limit=20.0):
    """Wait until the server holds no connection (bounded)."""
    end = time.monotonic() + limit
    while health(url)["active_connections"] and time.monotonic() < end:
        time.sleep(0.1)
    return health(url)


@pytest.fixture(scope="module")
def limits_server(tiny_exports):
    srv = ServerProcess(tiny_exports["full"], [
        "--mode", "ctc_greedy", "--idle_timeout", "2", "--max_connections_per_ip", "3",
        "--max_audio_rate", "4", "--audio_burst_s", "1", "--max_text_bytes", "65536"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ping_server(tiny_exports):
    srv = ServerProcess(tiny_exports["full"], [
        "--mode", "ctc_prefix_beam", "--idle_timeout", "30", "--ping_interval", "1",
        "--ping_timeout", "1", "--max_session_s", "5"])
    yield srv
    srv.stop()


def test_nbest_text_size_and_nesting_get_failed_replies(tiny_exports, test_wavs, limits_server):
    samples, _ = read_wav(test_wavs["u0"])
    url = limits_server.url

    async def go():
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"signal": "start", "nbest": 100000}))
            m1 = await recv_json(ws)
            await ws.send("x" * 70000)
            m2 = await recv_json(ws)
            await ws.send("[" * 30000 + "]" * 30000)        # under the size limit
            m3 = await recv_json(ws)
            await start(ws, nbest=10)                        # the beam: allowed
            for k in range(0, len(samples), 8000):
                await ws.send(samples[k: k + 8000].tobytes())
            await ws.send(json.dumps({"signal": "end"}))
            msgs = await drain(ws)
        ws = await connect(url, max_size=None)               # over the frame limit itself
        try:
            await ws.send(json.dumps({"signal": "start", "pad": "x" * (10 * 2 ** 20)}))
        except ConnectionClosed:
            pass
        await drain(ws)                                      # the server closed it
        big_code = ws.close_code
        alive = await stream_samples(url, samples, chunk_ms=300)
        return m1, m2, m3, msgs, big_code, alive
    m1, m2, m3, msgs, big_code, alive = run(go())
    assert m1 == {"status": "failed", "message":
                  "Wrong message header: nbest 100000 is more than the server's limit 10"}
    assert m2 == {"status": "failed", "message":
                  "Message too large: text of 70000 characters, limit is 65536"}
    assert m3 == {"status": "failed", "message":
                  "Wrong message header: malformed JSON (nested too deeply)"}
    finals = [json.loads(m["nbest"]) for m in msgs if m.get("type") == "final_result"]
    offline = decode_samples(OnnxAsrModel(tiny_exports["full"]), samples,
                             DecodeOptions(mode="ctc_greedy", nbest=10))
    assert finals == [offline] and offline[0]["sentence"] == "你好世界"   # greedy: one path
    assert big_code == 1009
    assert alive.text == "你好世界" and not alive.failures
    assert limits_server.proc.poll() is None


def test_per_ip_connection_limit(limits_server):
    url = limits_server.url
    wait_idle(url)

    async def go():
        held = [await connect(url) for _ in range(3)]
        for ws in held:
            await start(ws)
        async with connect(url) as extra:
            refused = await recv_json(extra)
            await drain(extra)
            code = extra.close_code
        await held[0].close()
        await asyncio.sleep(0.3)
        async with connect(url) as again:                    # a slot of this address is free
            await start(again)
        for ws in held[1:]:
            await ws.close()
        return refused, code
    refused, code = run(go())
    assert refused == {"status": "failed", "message":
                       "Too many connections from 127.0.0.1: limit is 3"}
    assert code == 1013


def test_audio_after_speech_end_does_not_reset_idle_timer(test_wavs, limits_server):
    samples, _ = read_wav(test_wavs["two"])                  # sentence, 1.5 s silence, sentence

    async def go():
        async with connect(limits_server.url) as ws:
            await start(ws)
            received = []
            reader = asyncio.ensure_future(drain(ws))
            for k in range(0, len(samples), 4000):
                await ws.send(samples[k: k + 4000].tobytes())
                await asyncio.sleep(0.05)
            sent_after = 0
            try:                                             # then 0.25 s of audio every 0.25 s
                while not reader.done() and sent_after < 60:
                    await ws.send(np.zeros(4000, np.int16).tobytes())
                    sent_after += 1
                    await asyncio.sleep(0.25)
            except ConnectionClosed:
                pass
            received = await asyncio.wait_for(reader, 20)
            return received, ws.close_code, sent_after
    msgs, code, sent_after = run(go())
    types = [m.get("type") for m in msgs]
    assert "speech_end" in types
    assert msgs[-1] == {"status": "failed", "message": "Idle timeout: no message for 2 s"}
    assert code == 1000 and sent_after < 60                 # closed while audio kept coming


def test_rate_limit_back_pressure_keeps_results(tiny_exports, test_wavs, limits_server):
    """Six seconds of audio sent as fast as possible to a server allowing 4x real time
    after a 1 s burst: the socket is left unread for a while, results are unchanged."""
    speech = np.concatenate([read_wav(test_wavs[f"u{i}"])[0] for i in (0, 1, 2)])
    before = health(limits_server.url)["throttle_pauses"]
    res = run(stream_samples(limits_server.url, speech, chunk_ms=100, continuous_decoding=True))
    model = OnnxAsrModel(tiny_exports["full"])
    dec = StreamingDecoder(model, DecodeOptions(mode="ctc_greedy", continuous_decoding=True))
    dec.accept_waveform(speech)
    dec.input_finished()
    alone = [e[1] for e in dec.advance() if e[0] == "final"]
    assert res.finals == alone and not res.failures and res.speech_end
    assert health(limits_server.url)["throttle_pauses"] > before


def test_performance_ws_style_whole_utterance_frames(test_wavs, server):
    """WeNet's performance-ws.py: many concurrent clients, each sending its whole
    utterance as one binary frame then `end`, work unchanged with the default limits
    (rate limit, slicing, keepalive)."""
    wavs = [read_wav(test_wavs[f"u{i}"])[0] for i in range(6)]
    texts = ["你好世界", "语音你", "好界音世你", "世世语", "音语界好", "你语好"]
    async def go():
        return await asyncio.gather(*[stream_samples(server.url, wavs[i % 6], chunk_ms=100000)
                                      for i in range(24)])
    results = run(go())
    assert [r.text for r in results] == [texts[i % 6] for i in range(24)]
    assert all(r.speech_end and not r.failures for r in results)


def _raw_handshake(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


def _frames(data):
    """(opcode, payload) of unmasked server frames with payloads under 126 bytes."""
    out, i = [], 0
    while i + 2 <= len(data):
        op, n = data[i] & 0x0F, data[i + 1] & 0x7F
        assert n < 126
        out.append((op, data[i + 2: i + 2 + n]))
        i += 2 + n
    return out


def test_keepalive_ping_closes_a_client_that_never_answers(ping_server):
    """A client that completes the handshake and then never reads nor answers pings
    is closed by the keepalive (code 1011), before the session limit and long before
    the idle timeout."""
    sock = _raw_handshake(ping_server.port)
    time.sleep(4)                                            # read nothing, answer nothing
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    sock.close()
    frames = _frames(data)
    ops = [op for op, _ in frames]
    assert 0x9 in ops and ops[-1] == 0x8                     # pings, then a close frame
    assert struct.unpack("!H", frames[-1][1][:2])[0] == 1011


def test_session_limit_sends_finals_then_closes(test_wavs, ping_server):
    speech = read_wav(test_wavs["two"])[0]
    samples = np.concatenate([speech] * 4)                   # about 20 s in real time

    async def go():
        msgs = []
        res = await stream_samples(ping_server.url, samples, chunk_ms=250, realtime=True,
                                   continuous_decoding=True, on_message=msgs.append)
        return msgs, res
    msgs, res = run(go())
    assert msgs[-1] == {"status": "failed", "message": "Session too long: limit is 5 s"}
    assert [m.get("type") for m in msgs[-3:-1]] == ["final_result", "speech_end"]
    assert res.finals[0][0]["sentence"] == "你好世界"


def test_send_timeout_drops_a_client_that_never_reads(tiny_exports, test_wavs, monkeypatch):
    """In-process server whose writes to one client never complete (as for a client
    that never reads): that client is aborted after --send_timeout, another stream
    is decoded meanwhile, and graceful shutdown started during the stall finishes."""
    import wenet_moe_runtime.server as server_mod
    from websockets.asyncio.server import ServerConnection

    stalled_ports, stalled = set(), []
    original = ServerConnection.send

    async def send(self, message, *args, **kwargs):
        if self.remote_address[1] in stalled_ports and "partial_result" in str(message):
            stalled.append(self.remote_address[1])
            await asyncio.Event().wait()                     # the write never drains
        return await original(self, message, *args, **kwargs)

    monkeypatch.setattr(ServerConnection, "send", send)
    samples, _ = read_wav(test_wavs["u0"])

    async def go():
        config = server_mod.ServerConfig(port=0, send_timeout=1.0, ping_interval=0)
        srv = server_mod.AsrServer(OnnxAsrModel(tiny_exports["full"]), config, DecodeOptions())
        await srv.start()
        url = f"ws://127.0.0.1:{srv.port}"
        good = await stream_samples(url, samples, chunk_ms=300)
        bad = await connect(url)
        stalled_ports.add(bad.local_address[1])
        await start(bad)
        await bad.send(samples.tobytes())
        while not stalled:
            await asyncio.sleep(0.05)
        await asyncio.wait_for(srv.shutdown(), 30)           # not held by the stalled write
        await drain(bad)
        return good, bad.close_code, srv.dropped_clients, srv.active
    good, bad_code, dropped, active = run(go())
    assert good.text == "你好世界" and not good.failures
    assert bad_code == 1006 and dropped == 1 and active == 0   # aborted, no closing handshake


@pytest.mark.slow
def test_abuse_bench_miniature(tiny_exports, test_wavs):
    """bench/server_abuse.py in miniature: two real-time streams alone, then beside
    every abuser (nbest 100000, 20 s in one frame, 50x real time, silent connections,
    a raw client that never reads, 10 MB JSON, nested JSON). Behaviour only: the
    server stays up and serving, the abusers get their replies, and the well-behaved
    streams get every final, identical to offline decoding, in both phases."""
    import sys
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
    sys.path.insert(0, os.path.abspath(bench))
    import server_abuse
    wavs = [(f"u{i}", read_wav(test_wavs[f"u{i}"])[0]) for i in range(6)]
    rep = server_abuse.run_abuse(tiny_exports["full"], wavs, streams=2, seconds=6, idle=3,
                                 long_frame_s=20, never_reads_s=6)
    assert rep["server_alive"] and rep["server_exit_code"] == 0
    for phase in ("alone", "with_abusers"):
        r = rep[phase]
        assert r["utterances"] >= 2 and r["failures"] == 0 and r["without_final"] == 0
        assert r["identical_to_offline"] == r["utterances"] and r["cer_vs_offline_pct"] == 0
    ab = rep["abusers"]
    assert not [v for v in ab.values() if v.startswith("client error")], ab
    assert ab["nbest 100000"] == ("failed: Wrong message header: nbest 100000 is more than "
                                  "the server's limit 10")
    assert "failed: Wrong message header: malformed JSON (nested too deeply)" in \
        ab["nested JSON (30000 deep)"]
    assert "failed: Message too large: text of 2000000 characters" in ab["nested JSON (1M deep)"]
    assert ab["10 MB JSON"].endswith("closed 1009")
    assert "speech_end=True, closed 1000" in ab["20 s in one frame"]
    assert "finals" in ab["50x real time"] and "3 silent connections" in ab["3 connect, never send"]


@pytest.mark.parametrize("flags,message", [
    (["--max_nbest", "20", "--beam_size", "10"], "--max_nbest 20 is more than --beam_size 10"),
    (["--max_audio_rate", "-1"], "--max_audio_rate must be >= 0, got -1.0"),
    (["--max_text_bytes", "10"], "--max_text_bytes (>= 64), --send_timeout and --audio_burst_s "
                                 "must be positive"),
])
def test_server_cli_refuses_bad_limits_in_one_line(tiny_exports, flags, message):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "wenet_moe_runtime.server", "--model_dir",
                           tiny_exports["full"], "--port", "0", *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"wenet-moe-server: error: {message}"
