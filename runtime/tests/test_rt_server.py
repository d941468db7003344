"""WebSocket server over loopback: WeNet protocol end to end, limits and abuse,
health endpoint, graceful shutdown. Every connection is on 127.0.0.1 and bounded
in time."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rt_fixtures import ServerProcess, recv_json, run_async, start_stream
from wenet_moe_runtime.client import stream_samples
from wenet_moe_runtime.decoder import DecodeOptions
from wenet_moe_runtime.model import OnnxAsrModel
from wenet_moe_runtime.offline import decode_samples
from wenet_moe_runtime.wavio import read_wav

TEXTS = ["你好世界", "语音你", "好界音世你", "世世语", "音语界好", "你语好"]
T_OUT = 60
start = start_stream


def run(coro):
    return run_async(coro, T_OUT)


async def finish(ws, samples, step=8000):
    """Send audio then end; return (messages, close code)."""
    for k in range(0, len(samples), step):
        await ws.send(samples[k: k + step].tobytes())
    await ws.send(json.dumps({"signal": "end"}))
    msgs = []
    try:
        async for raw in ws:
            msgs.append(json.loads(raw))
    except ConnectionClosed:
        pass
    return msgs, ws.close_code


def final_text(msgs):
    finals = [m for m in msgs if m.get("type") == "final_result"]
    assert len(finals) == 1, msgs
    return json.loads(finals[0]["nbest"])[0]["sentence"]


def test_end_to_end_final_equals_offline_decoding(tiny_exports, test_wavs, server):
    model = OnnxAsrModel(tiny_exports["full"])
    for i in range(3):
        samples, _ = read_wav(test_wavs[f"u{i}"])
        offline = decode_samples(model, samples, DecodeOptions(nbest=2))
        res = run(stream_samples(server.url, samples, chunk_ms=300, nbest=2,
                                 realtime=(i == 0)))
        assert not res.failures and res.speech_end
        assert res.finals == [offline]                  # n-best with word pieces
        assert res.finals[0][0]["sentence"] == TEXTS[i]
        assert res.partials and res.partials[-1] == TEXTS[i]


def test_protocol_messages_and_double_encoded_nbest(test_wavs, server):
    samples, _ = read_wav(test_wavs["u1"])

    async def go():
        async with connect(server.url) as ws:
            await start(ws, nbest=3)
            msgs, code = await finish(ws, samples)
        return msgs, code
    msgs, code = run(go())
    assert code == 1000
    assert all(m["status"] == "ok" for m in msgs)
    assert [m["type"] for m in msgs][-2:] == ["final_result", "speech_end"]
    assert {m["type"] for m in msgs[:-2]} == {"partial_result"}
    nbest = json.loads(msgs[-2]["nbest"])                # a JSON string inside JSON
    assert isinstance(msgs[-2]["nbest"], str) and 1 <= len(nbest) <= 3
    assert set(nbest[0]) == {"sentence", "word_pieces"}
    assert all(set(p) == {"word", "start", "end"} for p in nbest[0]["word_pieces"])
    assert "word_pieces" not in json.loads(msgs[0]["nbest"])[0]


def test_abuse_gets_failed_replies_and_connection_stays_usable(test_wavs, server):
    samples, _ = read_wav(test_wavs["u0"])

    async def go():
        async with connect(server.url) as ws:
            await ws.send(samples[:1600].tobytes())
            m1 = await recv_json(ws)
            await ws.send("{not json")
            m2 = await recv_json(ws)
            await ws.send(json.dumps({"signal": "dance"}))
            m3 = await recv_json(ws)
            await ws.send(json.dumps({"nbest": 1}))
            m4 = await recv_json(ws)
            await ws.send(json.dumps({"signal": "start", "nbest": "two"}))
            m5 = await recv_json(ws)
            await ws.send(json.dumps({"signal": "end"}))
            m6 = await recv_json(ws)
            await start(ws)
            await ws.send(json.dumps({"signal": "start"}))
            m7 = await recv_json(ws)
            msgs, code = await finish(ws, samples)
            return [m1, m2, m3, m4, m5, m6, m7], msgs, code
    fails, msgs, code = run(go())
    assert all(m["status"] == "failed" for m in fails)
    texts = [m["message"] for m in fails]
    assert texts[0] == "Start signal is expected before binary data"
    assert texts[1].startswith("Wrong message header: malformed JSON")
    assert texts[2] == "Unexpected signal type: 'dance'"
    assert texts[3] == "Wrong message header: no 'signal' field"
    assert texts[4].startswith("Wrong message header: nbest must be a positive integer")
    assert texts[5] == "End signal before start signal"
    assert texts[6] == "Start signal received twice"
    assert final_text(msgs) == TEXTS[0] and code == 1000


def test_oversized_frames_are_refused_and_others_keep_working(test_wavs, server):
    samples, _ = read_wav(test_wavs["u0"])

    async def go():
        async with connect(server.url, max_size=None) as ws:
            await start(ws)
            await ws.send(b"\0" * 300000)                   # over --max_message_bytes
            m = await recv_json(ws)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            code1 = ws.close_code
        async with connect(server.url, max_size=None) as ws:
            await start(ws)
            await ws.send(b"\0" * 500000)                   # over the protocol limit too
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            code2 = ws.close_code
        async with connect(server.url) as ws:
            await start(ws)
            msgs, _ = await finish(ws, samples)
        return m, code1, code2, msgs
    m, code1, code2, msgs = run(go())
    assert m == {"status": "failed", "message": "Message too large: 300000 bytes, limit is 200000"}
    assert code1 == 1009 and code2 == 1009
    assert final_text(msgs) == TEXTS[0]


def test_disconnect_mid_stream_then_50_concurrent_clients(test_wavs, server):
    wavs = [read_wav(test_wavs[f"u{i}"])[0] for i in range(6)]

    async def go():
        for abrupt in (True, False):
            ws = await connect(server.url)
            await start(ws)
            await ws.send(wavs[2][:16000].tobytes())
            await asyncio.sleep(0.05)
            if abrupt:
                ws.transport.abort()                        # no closing handshake
            else:
                await ws.close()
        return await asyncio.gather(*[stream_samples(server.url, wavs[i % 6], chunk_ms=250)
                                      for i in range(50)])
    results = run(go())
    assert [r.text for r in results] == [TEXTS[i % 6] for i in range(50)]
    assert all(r.speech_end and not r.failures for r in results)
    health = json.loads(urllib.request.urlopen(server.url.replace("ws:", "http:") + "/health",
                                               timeout=10).read())
    assert health["status"] == "ok" and health["active_connections"] == 0
    assert health["kernel_graph"] == "" and health["kernel_experts"] == ""      # a dense model


def test_idle_timeout(server):
    async def go():
        async with connect(server.url) as ws:
            await start(ws)
            m = await recv_json(ws, timeout=15)            # --idle_timeout 3
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return m, ws.close_code
    m, code = run(go())
    assert m == {"status": "failed", "message": "Idle timeout: no message for 3 s"}
    assert code == 1000


def test_http_health_page_and_404(server):
    base = server.url.replace("ws:", "http:")
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        body = json.loads(r.read())
    assert body["status"] == "ok" and body["max_connections"] == 60
    with urllib.request.urlopen(base + "/", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        assert b"app.js" in r.read()
    with urllib.request.urlopen(base + "/app.js", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/javascript")
        assert b"getUserMedia" in r.read()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/missing.js", timeout=10)
    assert err.value.code == 404


def test_max_connections_and_graceful_shutdown(tiny_exports, test_wavs):
    samples, _ = read_wav(test_wavs["u0"])
    srv = ServerProcess(tiny_exports["full"], ["--max_connections", "2"])
    try:
        async def go():
            a = await connect(srv.url)
            b = await connect(srv.url)
            await start(a)
            await start(b)
            async with connect(srv.url) as c:
                refused = await recv_json(c)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(c.recv(), 10)
                refused_code = c.close_code
            await b.close()
            await asyncio.sleep(0.2)
            async with connect(srv.url) as d:               # a slot is free again
                await start(d)
                await d.close()
            # `a` is mid-utterance when the server is told to stop.
            await a.send(samples[: len(samples) * 3 // 4].tobytes())
            await asyncio.sleep(0.5)
            srv.proc.send_signal(signal.SIGTERM)
            msgs = []
            try:
                async for raw in a:
                    msgs.append(json.loads(raw))
            except ConnectionClosed:
                pass
            return refused, refused_code, msgs, a.close_code
        refused, refused_code, msgs, code = run(go())
        assert refused == {"status": "failed", "message": "Too many connections: limit is 2"}
        assert refused_code == 1013
        types = [m["type"] for m in msgs]
        assert types[-2:] == ["final_result", "speech_end"] and code == 1001
        assert json.loads(msgs[-2]["nbest"])[0]["sentence"].startswith("你好")
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()


def test_continuous_decoding_over_the_socket(test_wavs, server):
    """Two sentences over one connection (attention-rescoring finals)."""
    samples, _ = read_wav(test_wavs["two"])
    res = run(stream_samples(server.url, samples, chunk_ms=500, continuous_decoding=True))
    assert [f[0]["sentence"] for f in res.finals] == ["你好世界", "语音你"]
    assert res.speech_end and not res.failures
    single = run(stream_samples(server.url, samples, chunk_ms=500, continuous_decoding=False))
    assert [f[0]["sentence"] for f in single.finals] == ["你好世界"] and single.speech_end


def test_bad_mode_is_refused_at_start(tiny_exports):
    proc = subprocess.run([sys.executable, "-m", "wenet_moe_runtime.server", "--model_dir",
                           tiny_exports["full"], "--mode", "attention"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--mode: invalid choice: 'attention'" in proc.stderr


def test_engine_error_fails_only_that_stream(tiny_exports, test_wavs, monkeypatch):
    """In-process server whose encoder raises for streams asking nbest=7."""
    import wenet_moe_runtime.server as server_mod
    from wenet_moe_runtime.decoder import StreamingDecoder

    class Flaky(StreamingDecoder):
        def encode(self, window):
            if self.opts.nbest == 7:
                raise RuntimeError("boom")
            return super().encode(window)

    monkeypatch.setattr(server_mod, "StreamingDecoder", Flaky)
    samples, _ = read_wav(test_wavs["u0"])

    async def go():
        srv = server_mod.AsrServer(OnnxAsrModel(tiny_exports["full"]),
                                   server_mod.ServerConfig(port=0), DecodeOptions())
        await srv.start()
        url = f"ws://127.0.0.1:{srv.port}"
        try:
            async with connect(url) as bad, connect(url) as good:
                await start(bad, nbest=7)
                await start(good)
                await bad.send(samples.tobytes())
                msg = await recv_json(bad)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(bad.recv(), 10)
                msgs, code = await finish(good, samples)
                return msg, bad.close_code, msgs, code
        finally:
            await srv.shutdown()
    msg, bad_code, msgs, code = run(go())
    assert msg == {"status": "failed", "message": "Decoding error: RuntimeError: boom"}
    assert bad_code == 1011
    assert final_text(msgs) == TEXTS[0] and code == 1000


def test_server_cli_bad_model_dir_one_line_error(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "wenet_moe_runtime.server", "--model_dir",
                           str(tmp_path / "missing"), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"wenet-moe-server: error: {tmp_path / 'missing'}: "
                                   "model directory does not exist")


def test_client_cli_prints_partials_and_finals(test_wavs, server):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "wenet_moe_runtime.client", "--server",
                           server.url, test_wavs["u0"], test_wavs["u1"], "--chunk_ms", "300"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "u0\tfinal\t你好世界" in lines and "u1\tfinal\t语音你" in lines
    assert any(line.startswith("u0\tpartial\t") for line in lines)
    bad = subprocess.run([sys.executable, "-m", "wenet_moe_runtime.client", "--server",
                          "ws://127.0.0.1:1", test_wavs["u0"]],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("wenet-moe-client: error:")
    assert len(bad.stderr.strip().splitlines()) == 1
