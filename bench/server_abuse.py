"""Adversarial load test of wenet-moe-server: well-behaved streams beside abusive clients.

    python bench/server_abuse.py --standin /tmp/standin --streams 16 --seconds 40
    python bench/server_abuse.py --model_dir EXPORT --wav_scp wav.scp ...
    python bench/server_abuse.py --standin /tmp/standin --memory --memory_streams 4 --memory_hours 1

Runs a real server process on 127.0.0.1. Phase A: `--streams` clients stream
utterances in real time (200 ms frames) for `--seconds`. Phase B, on the same
server: the same streams again while, at the same time, abusers connect: one asks
`nbest` 100000, one sends 60 s of audio in one frame, one sends at 50x real time,
`--idle_clients` (40) connect and never send, one never reads its replies (a raw
socket that answers nothing), one sends a 10 MB JSON, one deeply nested JSON.
Reported: the well-behaved streams' final latency p50/p95 and CER against offline
decoding in both phases (target: p95 grows < 30 %, CER identical), what each abuser
got, server RSS before/after, and whether the server process stayed up.

`--memory`: `--memory_streams` streams with continuous decoding are fed
`--memory_hours` of audio each (one-minute cycles of utterances, pauses and 25 s of
noise) as fast
as the server takes it; the server's RSS per stream is printed at every 10 minutes
of audio, against the value after the first minute (target: within 10 %).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "runtime", "tests"))

from common import edit_distance, write_json_atomic  # noqa: E402
from server_load import Server, cpu_seconds, pct, rss_mb  # noqa: E402
from wenet_moe_runtime.client import stream_samples  # noqa: E402
from wenet_moe_runtime.decoder import DecodeOptions  # noqa: E402
from wenet_moe_runtime.model import OnnxAsrModel  # noqa: E402
from wenet_moe_runtime.offline import decode_samples  # noqa: E402

SR = 16000


def cpu_info() -> Dict[str, str]:
    """lscpu's model name, core count, caches and the SIMD flags that matter."""
    out = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {"cpu": "unknown"}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key in ("Model name", "CPU(s)", "Thread(s) per core", "L1d cache", "L2 cache", "L3 cache"):
            out[key] = val
        if key == "Flags":
            out["flags"] = " ".join(f for f in val.split() if f in ("avx2", "avx512f", "avx512_vnni",
                                                                  "amx_tile", "fma", "asimd"))
    return out


class DrainedServer(Server):
    """`server_load.Server` whose output is read by a thread, so that log lines can
    never fill the pipe and block the server."""

    def __init__(self, model_dir: str, extra: List[str]) -> None:
        super().__init__(model_dir, extra)
        self.log: List[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line.rstrip())


# ------------------------------------------------------------ well-behaved streams
async def _good_client(url: str, wavs, index: int, until: float, results: List[Dict]) -> None:
    i = index
    while time.monotonic() < until:
        key, samples = wavs[i % len(wavs)]
        i += 1
        res = await stream_samples(url, samples, chunk_ms=200, realtime=True, timeout=120)
        lat = (res.final_s - res.audio_end_s
               if res.final_s is not None and res.audio_end_s is not None else None)
        results.append({"key": key, "text": res.text, "final_latency_s": lat,
                        "failures": res.failures, "speech_end": res.speech_end})


async def good_streams(url: str, wavs, n: int, seconds: float) -> List[Dict]:
    results: List[Dict] = []
    until = time.monotonic() + seconds
    tasks = []
    for k in range(n):   # staggered, so that the chunks do not arrive in lockstep
        await asyncio.sleep(min(0.05, 1.0 / n))
        tasks.append(asyncio.ensure_future(_good_client(url, wavs, k, until, results)))
    await asyncio.gather(*tasks)
    return results


def summarize(results: List[Dict], reference: Dict[str, str]) -> Dict:
    lat = [r["final_latency_s"] for r in results if r["final_latency_s"] is not None]
    errors = sum(edit_distance(reference[r["key"]], r["text"]) for r in results)
    chars = sum(len(reference[r["key"]]) for r in results)
    return {"utterances": len(results), "failures": sum(len(r["failures"]) for r in results),
            "without_final": sum(r["final_latency_s"] is None for r in results),
            "final_p50_ms": round(1000 * pct(lat, 50)), "final_p95_ms": round(1000 * pct(lat, 95)),
            "cer_vs_offline_pct": round(100.0 * errors / max(chars, 1), 3),
            "identical_to_offline": sum(r["text"] == reference[r["key"]] for r in results)}


# ----------------------------------------------------------------------- abusers
async def _collect(ws, limit: float) -> Tuple[List[Dict], Optional[int]]:
    msgs: List[Dict] = []
    try:
        async with asyncio.timeout(limit):
            async for raw in ws:
                msgs.append(json.loads(raw))
    except (ConnectionClosed, TimeoutError):
        pass
    return msgs, ws.close_code


async def abuse_nbest(url: str) -> str:
    async with connect(url) as ws:
        await ws.send(json.dumps({"signal": "start", "nbest": 100000, "continuous_decoding": False}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
    return f"{reply['status']}: {reply.get('message', reply.get('type'))}"


async def abuse_one_frame(url: str, audio: np.ndarray, limit: float) -> str:
    t0 = time.monotonic()
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"signal": "start", "nbest": 1, "continuous_decoding": True}))
        await ws.send(audio.tobytes())
        await ws.send(json.dumps({"signal": "end"}))
        msgs, code = await _collect(ws, limit)
    finals = sum(m.get("type") == "final_result" for m in msgs)
    done = any(m.get("type") == "speech_end" for m in msgs)
    return (f"{len(audio) / SR:.0f} s in one frame: {finals} finals, speech_end={done}, "
            f"closed {code} after {time.monotonic() - t0:.1f} s")


async def abuse_fast(url: str, audio: np.ndarray, speed: float, seconds: float) -> str:
    """200 ms frames every 200/speed ms (looping `audio`) for `seconds`."""
    step = SR // 5
    msgs: List[Dict] = []
    sent = 0
    t0 = time.monotonic()
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"signal": "start", "nbest": 1, "continuous_decoding": True}))
        reader = asyncio.ensure_future(_collect(ws, seconds + 60))
        try:
            while time.monotonic() - t0 < seconds:
                k = (sent * step) % max(len(audio) - step, 1)
                await ws.send(audio[k: k + step].tobytes())
                sent += 1
                delay = t0 + sent * 0.2 / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            wall = time.monotonic() - t0
            await ws.send(json.dumps({"signal": "end"}))
        except ConnectionClosed:
            wall = time.monotonic() - t0
        msgs, code = await reader
    finals = sum(m.get("type") == "final_result" for m in msgs)
    return (f"asked {speed:g}x, got {sent * 0.2 / wall:.1f}x real time over {wall:.0f} s "
            f"(back-pressure), {finals} finals, closed {code}")


async def abuse_idle(url: str, n: int, seconds: float) -> str:
    conns = [await connect(url) for _ in range(n)]
    results = await asyncio.gather(*[_collect(ws, seconds) for ws in conns])
    codes = [code for _, code in results]
    closed = [c for c in codes if c is not None]
    for ws in conns:
        await ws.close()
    return (f"{n} silent connections: {len(closed)} closed by the server within {seconds:.0f} s "
            f"(codes {sorted(set(closed))})")


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    data = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)
    return head + mask + data.tobytes()


def never_reads(port: int, audio: np.ndarray, seconds: float) -> str:
    """Raw socket (4 KB receive buffer): handshake, start, real-time audio, never read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:   # the handshake is the only thing it reads
        head += sock.recv(1)
    t0 = time.monotonic()
    outcome = f"still connected after {seconds:.0f} s"
    try:
        sock.sendall(_frame(0x1, json.dumps({"signal": "start", "nbest": 10,
                                             "continuous_decoding": True}).encode()))
        step = SR // 5
        i = 0
        while time.monotonic() - t0 < seconds:
            k = (i * step) % max(len(audio) - step, 1)
            sock.sendall(_frame(0x2, audio[k: k + step].tobytes()))
            i += 1
            time.sleep(max(0.0, t0 + i * 0.2 - time.monotonic()))
    except OSError as exc:
        outcome = f"dropped by the server after {time.monotonic() - t0:.1f} s ({type(exc).__name__})"
    sock.close()
    return outcome


async def abuse_json(url: str, text: str) -> str:
    ws = await connect(url, max_size=None)
    try:
        await ws.send(text)
    except ConnectionClosed:
        pass
    msgs, code = await _collect(ws, 30)
    if code is None:
        await ws.close()
    reply = msgs[0] if msgs else None
    return (f"{len(text) / 2 ** 20:.2f} MiB: " +
            (f"{reply['status']}: {reply.get('message')}" if reply else "no reply") +
            (f", closed {code}" if code is not None else ", connection still usable"))


async def abusers(url: str, port: int, audio: np.ndarray, seconds: float, idle: int,
                  long_frame_s: float, never_reads_s: float) -> Dict[str, str]:
    long_audio = np.resize(audio, int(long_frame_s * SR))
    jobs = {
        "nbest 100000": abuse_nbest(url),
        f"{long_frame_s:g} s in one frame": abuse_one_frame(url, long_audio, seconds + 60),
        "50x real time": abuse_fast(url, audio, 50.0, seconds),
        f"{idle} connect, never send": abuse_idle(url, idle, seconds),
        "never reads replies": asyncio.to_thread(never_reads, port, audio, never_reads_s),
        "10 MB JSON": abuse_json(url, json.dumps({"signal": "start", "pad": "x" * 10_000_000})),
        "nested JSON (30000 deep)": abuse_json(url, "[" * 30000 + "]" * 30000),
        "nested JSON (1M deep)": abuse_json(url, "[" * 1_000_000 + "]" * 1_000_000),
    }
    out = await asyncio.gather(*jobs.values(), return_exceptions=True)
    return {k: (f"client error: {v!r}" if isinstance(v, BaseException) else v)
            for k, v in zip(jobs, out)}


def run_abuse(model_dir: str, wavs, streams: int, seconds: float, idle: int,
              long_frame_s: float = 60.0, extra: Optional[List[str]] = None,
              never_reads_s: Optional[float] = None) -> Dict:
    """Phases A (streams alone) and B (streams + abusers) on one server process; the
    client that never reads keeps sending for `never_reads_s` (default `seconds` + 30,
    long enough to see the keepalive drop it)."""
    never_reads_s = seconds + 30 if never_reads_s is None else never_reads_s
    model = OnnxAsrModel(model_dir)
    reference = {k: decode_samples(model, w, DecodeOptions())[0]["sentence"] for k, w in wavs}
    del model
    flags = ["--num_workers", "2", "--max_connections", str(streams + idle + 16),
             "--idle_timeout", "10", "--ping_interval", "10", "--ping_timeout", "20",
             *(extra or [])]
    srv = DrainedServer(model_dir, flags)
    report: Dict = {"server_flags": flags, "streams": streams, "seconds": seconds}
    try:
        time.sleep(0.5)
        report["rss_idle_mb"] = round(rss_mb(srv.proc.pid), 1)
        cpu0 = cpu_seconds(srv.proc.pid)
        a = asyncio.run(good_streams(srv.url, wavs, streams, seconds))
        cpu1 = cpu_seconds(srv.proc.pid)
        report["rss_after_a_mb"] = round(rss_mb(srv.proc.pid), 1)
        port = int(srv.url.rsplit(":", 1)[1])
        audio = np.concatenate([w for _, w in wavs])

        async def phase_b():
            abuse = asyncio.ensure_future(abusers(srv.url, port, audio, seconds, idle, long_frame_s,
                                                  never_reads_s))
            await asyncio.sleep(0.5)    # abusers first: the streams meet them already there
            good = await good_streams(srv.url, wavs, streams, seconds)
            return good, await abuse
        b, abuse = asyncio.run(phase_b())
        report["server_cpu_s"] = {"alone": round(cpu1 - cpu0, 1),
                                  "with_abusers": round(cpu_seconds(srv.proc.pid) - cpu1, 1)}
        time.sleep(1.0)
        report["rss_after_b_mb"] = round(rss_mb(srv.proc.pid), 1)
        report["alone"], report["with_abusers"] = summarize(a, reference), summarize(b, reference)
        report["abusers"] = abuse
        report["p95_growth_pct"] = round(100.0 * (report["with_abusers"]["final_p95_ms"]
                                                  / max(report["alone"]["final_p95_ms"], 1) - 1), 1)
        alive = srv.proc.poll() is None
        if alive:   # and still serving
            after = asyncio.run(stream_samples(srv.url, wavs[0][1], chunk_ms=200))
            alive = after.text == reference[wavs[0][0]] and not after.failures
        report["server_alive"] = alive
    finally:
        srv.stop()
    report["server_exit_code"] = srv.proc.returncode
    report["server_log_tail"] = srv.log[-5:]
    return report


# -------------------------------------------------------------------- memory mode
def session_audio(wavs, seconds: float, seed: int = 0) -> np.ndarray:
    """`seconds` of audio made of one-minute cycles: utterances with 1.5 s pauses for
    35 s, then 25 s of low noise (longer than rule 3's 20 s: it may decode to
    nothing and fire no endpoint). Every kind of content occurs in the first minute,
    so memory after one minute against memory after an hour measures growth with
    session length, not the first sight of a new kind of input."""
    rng = np.random.default_rng(seed)
    pause = np.zeros(int(1.5 * SR), np.int16)
    parts, total, i = [], 0, seed
    while total < seconds * SR:
        speech: List[np.ndarray] = []
        while sum(len(x) for x in speech) < 35 * SR:
            speech += [wavs[i % len(wavs)][1], pause]
            i += 1
        cycle = np.concatenate(speech)[: 35 * SR]
        noise = (rng.normal(size=25 * SR) * 300).astype(np.int16)
        parts += [cycle, noise]
        total += 60 * SR
    return np.concatenate(parts)[: int(seconds * SR)]


async def _memory_stream(url: str, audio: np.ndarray, marks: List[int], barrier, done: List[int]):
    step = SR
    async with connect(url, max_size=None, ping_interval=None) as ws:
        await ws.send(json.dumps({"signal": "start", "nbest": 1, "continuous_decoding": True}))
        reader = asyncio.ensure_future(_collect(ws, 1e9))
        for k in range(0, len(audio), step):
            await ws.send(audio[k: k + step].tobytes())
            if (k + step) // SR in marks:
                await barrier()
        await ws.send(json.dumps({"signal": "end"}))
        msgs, _ = await reader
    done.append(sum(m.get("type") == "final_result" for m in msgs))


async def settle(pid: int, limit: float = 300.0) -> None:
    """Wait until the server has decoded everything sent (its CPU time stops growing):
    sent audio may still sit in socket buffers."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        c0 = cpu_seconds(pid)
        await asyncio.sleep(0.5)
        if cpu_seconds(pid) - c0 < 0.01:
            return


def run_memory(model_dir: str, wavs, streams: int, hours: float,
               extra: Optional[List[str]] = None) -> Dict:
    seconds = int(hours * 3600)
    marks = sorted({60} | set(range(600, seconds + 1, 600)) | {seconds})
    srv = DrainedServer(model_dir, ["--num_workers", "2", "--max_audio_rate", "0",
                                    "--idle_timeout", "600", "--ping_interval", "0",
                                    *(extra or [])])
    rows: List[Dict] = []
    try:
        time.sleep(0.5)
        idle = rss_mb(srv.proc.pid)
        audios = [session_audio(wavs, seconds, seed=s) for s in range(streams)]

        async def go():
            arrived = [0]
            release = [asyncio.Event()]
            t0 = time.monotonic()

            async def barrier():
                arrived[0] += 1
                event = release[0]
                if arrived[0] == streams:        # everyone is here: let the server drain
                    await settle(srv.proc.pid)
                    mark = marks[len(rows)]
                    rss = rss_mb(srv.proc.pid)
                    rows.append({"audio_min_per_stream": round(mark / 60, 1),
                                 "rss_mb": round(rss, 1),
                                 "rss_per_stream_mb": round((rss - idle) / streams, 2),
                                 "wall_s": round(time.monotonic() - t0)})
                    print(json.dumps(rows[-1]), flush=True)
                    arrived[0] = 0
                    release[0] = asyncio.Event()
                    event.set()
                else:
                    await event.wait()
            done: List[int] = []
            await asyncio.gather(*[_memory_stream(srv.url, a, marks, barrier, done) for a in audios])
            return done
        finals = asyncio.run(go())
    finally:
        srv.stop()
    first = rows[0]["rss_per_stream_mb"]
    return {"streams": streams, "audio_hours_per_stream": hours, "rss_idle_mb": round(idle, 1),
            "rows": rows, "finals_per_stream": finals,
            "last_over_first_minute": round(rows[-1]["rss_per_stream_mb"] / first, 3) if first else None}


def load_wavs(args) -> List[Tuple[str, np.ndarray]]:
    if args.wav_scp:
        from wenet_moe_runtime.decode import read_scp
        from wenet_moe_runtime.wavio import read_wav
        return [(k, read_wav(p)[0]) for k, p in read_scp(args.wav_scp)]
    import rt_tiny_model as T
    seqs = [[2, 3, 4, 5], [6, 7, 2], [3, 5, 7, 4, 2], [4, 4, 6], [7, 6, 5, 3], [2, 6, 3]]
    return [(f"syn{i}", T.synth(s, seed=i)) for i, s in enumerate(seqs)]


def print_table(rep: Dict) -> None:
    print(f"\n{'phase':<14}{'utts':>6}{'failed':>8}{'p50 ms':>9}{'p95 ms':>9}{'CER vs offline':>16}")
    for name in ("alone", "with_abusers"):
        r = rep[name]
        print(f"{name:<14}{r['utterances']:>6}{r['failures'] + r['without_final']:>8}"
              f"{r['final_p50_ms']:>9}{r['final_p95_ms']:>9}{r['cer_vs_offline_pct']:>15.3f}%")
    print(f"p95 growth with abusers: {rep['p95_growth_pct']:+.1f} % (target < 30 %); server CPU "
          f"seconds alone / with abusers: {rep['server_cpu_s']['alone']} / "
          f"{rep['server_cpu_s']['with_abusers']}")
    print(f"server RSS idle / after A / after B: {rep['rss_idle_mb']} / {rep['rss_after_a_mb']} / "
          f"{rep['rss_after_b_mb']} MB; server alive and serving: {rep['server_alive']}")
    for k, v in rep["abusers"].items():
        print(f"  {k:<28} {v}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", help="ONNX export directory")
    p.add_argument("--standin", help="write an untrained stand-in export here (needs torch) and use it")
    p.add_argument("--standin_size", default="256,12,4,4000", help="d,blocks,heads,vocab")
    p.add_argument("--wav_scp", help="test wavs (default: synthetic utterances)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--seconds", type=float, default=40.0, help="length of each phase")
    p.add_argument("--idle_clients", type=int, default=40)
    p.add_argument("--long_frame_s", type=float, default=60.0)
    p.add_argument("--memory", action="store_true", help="run the long-session memory bound instead")
    p.add_argument("--memory_streams", type=int, default=4)
    p.add_argument("--memory_hours", type=float, default=1.0)
    p.add_argument("--server_args", default="", help="extra server flags, space separated")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args()
    if args.standin:
        import rt_tiny_model as T
        from wenet_moe_runtime.features import FbankOptions
        d, blocks, heads, vocab = (int(x) for x in args.standin_size.split(","))
        T.make_standin_export(args.standin, FbankOptions().to_dict(), d, blocks, heads, vocab)
        args.model_dir = args.standin
    if not args.model_dir:
        p.error("give --model_dir or --standin")
    wavs = load_wavs(args)
    report: Dict = {"cpu": cpu_info(), "model_dir": args.model_dir,
                    "load_average_before": os.getloadavg()}
    print(json.dumps(report["cpu"]), flush=True)
    if args.memory:
        report["memory"] = run_memory(args.model_dir, wavs, args.memory_streams, args.memory_hours,
                                      args.server_args.split())
        m = report["memory"]
        print(f"RSS per stream after {m['rows'][-1]['audio_min_per_stream']} min of audio / after "
              f"1 min: {m['last_over_first_minute']} (target <= 1.10)", flush=True)
    else:
        report.update(run_abuse(args.model_dir, wavs, args.streams, args.seconds, args.idle_clients,
                                args.long_frame_s, args.server_args.split()))
        print_table(report)
    report["load_average_after"] = os.getloadavg()
    if args.out:
        write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
