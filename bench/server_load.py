"""Load test of wenet-moe-server: N concurrent clients streaming wavs in real time.

    python bench/server_load.py --model_dir EXPORT --wav_scp wav.scp --concurrency 1,4,8,16
    python bench/server_load.py --standin DIR ...   # untrained stand-in export (needs torch)

For every N it starts a fresh server (127.0.0.1), streams for `--seconds` with N
real-time clients and reports: the server's CPU real-time factor (CPU seconds /
audio seconds), first-partial latency (first audio sent -> first partial) and
final latency (end of audio -> final result) p50/p95, CER of the server's finals
against offline decoding of the same export, and resident memory per active stream.
The largest N whose p95 final latency stays under `--rt_latency_ms` and whose CPU
use stays under the cores available is reported as the real-time capacity. It
then compares the server's memory after 10 and after `--sequential` (1000)
sequential connections, and optionally CTC batching on/off (`--compare_batching`).

    python bench/server_load.py --compare DENSE_EXPORT MOE_EXPORT [--concurrency 1,8,16]

compares two exports (e.g. Dense-S vs MoE with the same active compute, from
`--random_export`) in one run: at each N the two servers run one after the other
on the same wavs; printed per N are server CPU seconds per audio second, p95 final
latency and CER against each export's own offline decoding, and the ratio B / A.
`--batch_encoder both` measures each N without and with cross-stream batching
(`encoder_batch.onnx`), and reports how many streams a batched call advanced.
Random-weight exports emit as many characters as chance gives them on the test wavs
(rescoring and the prefix search cost follow), so two of them differ in more than the
encoder: `--calibrate_blank 0.7` serves copies (`EXPORT.blank70`, every file
hard-linked but the CTC graphs) whose CTC blank bias is moved so that 70 % of the test
wavs' frames are blank-best for each, which makes their outputs about as long.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import numpy as np

from common import blank_shift, edit_distance, raise_blank_, write_json_atomic  # bench/common.py
from wenet_moe_runtime.client import stream_samples
from wenet_moe_runtime.decode import read_scp
from wenet_moe_runtime.decoder import DecodeOptions, resolve_chunk_size
from wenet_moe_runtime.model import OnnxAsrModel
from wenet_moe_runtime.offline import decode_samples, encode_chunks, utterance_fbank
from wenet_moe_runtime.wavio import read_wav

TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS   # utime + stime


def pct(values: List[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Server:
    def __init__(self, model_dir: str, extra: List[str]) -> None:
        cmd = [sys.executable, "-m", "wenet_moe_runtime.server", "--model_dir", model_dir,
               "--port", "0", "--host", "127.0.0.1", *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        line = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            m = re.search(r"listening on (ws://\S+)", line)
            if m:
                self.url = m.group(1)
                return
            if not line:
                break
        self.proc.kill()
        raise RuntimeError(f"server did not start: {line}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _client(url: str, wavs: List[Tuple[str, np.ndarray]], start_index: int,
                  until: float, chunk_ms: int, results: List[Dict]) -> None:
    i = start_index
    while time.monotonic() < until:
        key, samples = wavs[i % len(wavs)]
        i += 1
        res = await stream_samples(url, samples, chunk_ms=chunk_ms, realtime=True, timeout=300)
        results.append({"key": key, "text": res.text, "audio_s": len(samples) / 16000.0,
                        "first_partial_s": res.first_partial_s,
                        "final_latency_s": (res.final_s - res.audio_end_s)
                        if res.final_s is not None and res.audio_end_s is not None else None,
                        "failures": res.failures})


async def _load(url: str, pid: int, n: int, wavs, seconds: float, chunk_ms: int):
    results: List[Dict] = []
    until = time.monotonic() + seconds
    peak = [0.0]

    async def sample_memory() -> None:
        while time.monotonic() < until:
            peak[0] = max(peak[0], rss_mb(pid))
            await asyncio.sleep(0.5)
    # Stagger the clients over one utterance so their chunks do not arrive in lockstep.
    tasks = []
    for k in range(n):
        await asyncio.sleep(min(0.05, 1.0 / max(n, 1)))
        tasks.append(asyncio.ensure_future(_client(url, wavs, k, until, chunk_ms, results)))
    await asyncio.gather(sample_memory(), *tasks)
    return results, peak[0]


def health(url: str) -> Dict:
    import urllib.request
    with urllib.request.urlopen(url.replace("ws:", "http:") + "/health", timeout=10) as r:
        return json.loads(r.read())


def run_concurrency(args, model_dir: str, wavs, reference: Dict[str, str], n: int,
                    max_batch: int, batch_encoder: bool = True) -> Dict:
    srv = Server(model_dir, ["--num_workers", str(args.num_workers), "--max_batch", str(max_batch),
                             "--max_connections", str(n + 8)] + (["--int8"] if args.int8 else [])
                 + ([] if batch_encoder else ["--no_batch_encoder"])
                 + args.server_args.split())
    try:
        time.sleep(0.5)
        idle = rss_mb(srv.proc.pid)
        cpu0, t0 = cpu_seconds(srv.proc.pid), time.monotonic()
        results, peak = asyncio.run(_load(srv.url, srv.proc.pid, n, wavs, args.seconds, args.chunk_ms))
        cpu = cpu_seconds(srv.proc.pid) - cpu0
        wall = time.monotonic() - t0
        stats = health(srv.url)
    finally:
        srv.stop()
    audio = sum(r["audio_s"] for r in results)
    errors = sum(edit_distance(reference[r["key"]], r["text"]) for r in results)
    ref_chars = sum(len(reference[r["key"]]) for r in results)
    first = [r["first_partial_s"] for r in results if r["first_partial_s"] is not None]
    final = [r["final_latency_s"] for r in results if r["final_latency_s"] is not None]
    calls = stats.get("encoder_batched_calls", 0)
    out = {"concurrency": n, "max_batch": stats.get("max_batch", max_batch),
           "batched_encoder": bool(stats.get("batched_encoder", False)),
           # encoder calls: batched ones, the streams per batched call, single ones
           "encoder_batched_calls": calls,
           "streams_per_batched_call": round(stats.get("encoder_batched_streams", 0) / calls, 2)
           if calls else 0.0,
           "encoder_single_calls": stats.get("encoder_single_calls", 0),
           # batches whose oldest job waited out --batch_wait_ms for company
           "held_batches": stats.get("held_batches", 0),
           "utterances": len(results),
           "failures": sum(len(r["failures"]) for r in results),
           "audio_s": round(audio, 1), "server_cpu_s": round(cpu, 2),
           "rtf_cpu": round(cpu / audio, 4) if audio else None,
           "cpu_cores_used": round(cpu / wall, 2),
           "first_partial_p50_ms": round(1000 * pct(first, 50)), "first_partial_p95_ms": round(1000 * pct(first, 95)),
           "final_p50_ms": round(1000 * pct(final, 50)), "final_p95_ms": round(1000 * pct(final, 95)),
           "cer_vs_offline_pct": round(100.0 * errors / max(ref_chars, 1), 2),
           "reference_chars": ref_chars,
           "rss_idle_mb": round(idle, 1), "rss_peak_mb": round(peak, 1),
           "rss_per_stream_mb": round((peak - idle) / n, 2)}
    # CPU inside the ONNX sessions per audio second (the server's /health): the model
    # part of rtf_cpu, apart from features, search and I/O, whose cost follows the
    # hypotheses a model emits (random-weight models differ in that too)
    for part, seconds in (stats.get("session_cpu_s") or {}).items():
        out[f"{part}_cpu_per_audio_s"] = round(seconds / audio, 4) if audio else None
    out["realtime"] = bool(out["failures"] == 0 and len(final) == len(results)
                           and pct(final, 95) * 1000 < args.rt_latency_ms
                           and cpu / wall < 0.95 * args.cores)
    return out


async def _sequential(url: str, pid: int, samples: np.ndarray, total: int, marks: List[int]):
    rss = {}
    for i in range(1, total + 1):
        res = await stream_samples(url, samples, chunk_ms=250, realtime=False, timeout=60)
        if res.failures or not res.speech_end:
            raise RuntimeError(f"sequential connection {i} failed: {res.failures}")
        if i in marks:
            await asyncio.sleep(0.3)
            rss[i] = round(rss_mb(pid), 1)
    return rss


def make_random_export(config: str, out_dir: str, vocab: int, chunk: int) -> None:
    """Export an untrained model of a recipe config (compute-realistic, not accurate):
    CTC blank biased up so posteriors are peaky like a trained model's."""
    import copy
    import torch
    from wenet_moe.config import load_yaml
    from wenet_moe.export import export_loaded
    from wenet_moe.model import build_model
    torch.manual_seed(0)
    conf = load_yaml(config)
    # the symbol table goes beside the export (the export refuses a directory holding
    # files it does not write, and copies the table in as units.txt)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    units = out_dir.rstrip("/") + ".units.txt"
    syms = ["<blank>", "<unk>", "<sos/eos>"] + [chr(0x4E00 + i) for i in range(vocab - 3)]
    with open(units, "w", encoding="utf-8") as f:
        f.writelines(f"{s} {i}\n" for i, s in enumerate(syms))
    conf.update({"input_dim": 80, "output_dim": vocab})
    conf.pop("cmvn", None)
    conf.pop("cmvn_conf", None)
    conf["tokenizer_conf"]["symbol_table_path"] = units
    model = build_model(copy.deepcopy(conf)).eval()
    # Bias the blank logit so that about 70% of frames of synthetic speech are blank.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runtime", "tests"))
    import rt_tiny_model as T
    from wenet_moe_runtime.features import FbankOptions, compute_fbank
    wav = T.synth([2, 3, 4, 5, 6, 7], seed=0).astype(np.float32) / 32768.0
    feats = torch.from_numpy(compute_fbank(wav, 16000, FbankOptions()))[None]
    raise_blank_(model, feats, 0.7, 16)
    export_loaded(model, copy.deepcopy(conf), copy.deepcopy(conf), out_dir, chunk_size=chunk,
                  left_chunks=-1, quantize="int8", verify=False)


def synthetic_wavs() -> List[Tuple[str, np.ndarray]]:
    """Tone-burst utterances of the runtime tests' stand-in (no corpus needed)."""
    import rt_tiny_model as T
    seqs = [[2, 3, 4, 5], [6, 7, 2], [3, 5, 7, 4, 2], [4, 4, 6], [7, 6, 5, 3], [2, 6, 3]]
    return [(f"syn{i}", T.synth(s, seed=i)) for i, s in enumerate(seqs)]


CTC_GRAPHS = ("ctc.onnx", "ctc.int8.onnx")


def export_blank_shift(model_dir: str, wavs, fraction: float) -> float:
    """How far to raise the CTC blank logit of the export so that `fraction` of the
    frames of `wavs` are blank-best (streaming, the export's chunk size, fp32 graphs):
    that quantile of max(non-blank log-posterior) - blank log-posterior."""
    model = OnnxAsrModel(model_dir)
    chunk = resolve_chunk_size(model, 0)
    scores = []
    for _, samples in wavs:
        chunks = encode_chunks(model, utterance_fbank(model, samples), chunk)
        if chunks:
            scores.append(model.ctc_log_probs(np.concatenate(chunks, axis=0)))
    if not scores:
        raise SystemExit(f"{model_dir}: the test wavs gave no encoder frames to calibrate on")
    return blank_shift(np.concatenate(scores), fraction)


def blank_calibrated(model_dir: str, wavs, fraction: float) -> str:
    """`<model_dir>.blank<percent>`: the export with its CTC blank bias raised by
    `export_blank_shift` (in `ctc.onnx` and `ctc.int8.onnx`), every other file hard-linked
    (a copy where links fail); rewritten on every call. Returns its path."""
    import onnx
    from onnx import numpy_helper
    from wenet_moe.export.expert_split import link_or_copy
    shift = export_blank_shift(model_dir, wavs, fraction)
    out = f"{os.path.abspath(model_dir).rstrip('/')}.blank{round(100 * fraction)}"
    for root, _, files in os.walk(model_dir):
        rel = os.path.relpath(root, model_dir)
        os.makedirs(os.path.join(out, rel), exist_ok=True)
        for name in files:
            src, dst = os.path.join(root, name), os.path.join(out, rel, name)
            if rel != "." or name not in CTC_GRAPHS:
                link_or_copy(src, dst)
                continue
            proto = onnx.load(src)
            # the output layer's bias: the 1-D initializer added just before LogSoftmax
            made_by = {tensor: node for node in proto.graph.node for tensor in node.output}
            add = [made_by.get(n.input[0]) for n in proto.graph.node if n.op_type == "LogSoftmax"]
            names = set(add[0].input) if len(add) == 1 and add[0] and add[0].op_type == "Add" else set()
            bias = [t for t in proto.graph.initializer if t.name in names and len(t.dims) == 1]
            if len(bias) != 1:
                raise SystemExit(f"{src}: no bias added before LogSoftmax to calibrate")
            value = numpy_helper.to_array(bias[0]).copy()
            value[0] += shift
            bias[0].CopyFrom(numpy_helper.from_array(value, bias[0].name))
            if os.path.lexists(dst):
                os.unlink(dst)
            onnx.save(proto, dst)
    print(f"{out}: CTC blank logit {shift:+.3f}, {100 * fraction:.0f} % of the test wavs' "
          f"frames blank-best", flush=True)
    return out


def offline_reference(model_dir: str, wavs, int8: bool) -> Dict[str, str]:
    model = OnnxAsrModel(model_dir, int8=int8)
    return {k: decode_samples(model, w, DecodeOptions())[0]["sentence"] for k, w in wavs}


def compare_exports(args, dir_a: str, dir_b: str) -> int:
    """Runs both exports at each concurrency (A then B) and prints B / A ratios."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runtime", "tests"))
    from machine import describe  # bench/machine.py: the CPU this was measured on
    print(describe(), flush=True)
    wavs = ([(k, read_wav(path)[0]) for k, path in read_scp(args.wav_scp)] if args.wav_scp
            else synthetic_wavs())
    if args.calibrate_blank:
        dir_a, dir_b = (blank_calibrated(d, wavs, args.calibrate_blank) for d in (dir_a, dir_b))
    refs = {d: offline_reference(d, wavs, args.int8) for d in (dir_a, dir_b)}
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.batch_encoder]
    rows = []
    for n in [int(x) for x in args.concurrency.split(",")]:
        for batched in modes:
            pair = [run_concurrency(args, d, wavs, refs[d], n, args.max_batch, batched)
                    for d in (dir_a, dir_b)]
            rows.append((n, batched, pair))
            print(json.dumps({"concurrency": n, "batch_encoder": batched, "A": pair[0],
                              "B": pair[1]}), flush=True)
    print(f"\nA = {dir_a}\nB = {dir_b}")
    print("| streams | batched encoder (streams/call A / B) | CPU s / audio s A | B | B / A | "
          "encoder CPU s / audio s A | B | B / A | decoder B / A | decoder per char B / A | "
          "reference chars A / B | p95 final ms A | B | B / A | CER vs offline A / B |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def ratio(b_value, a_value) -> float:
        return b_value / a_value if a_value and b_value else float("nan")

    def per_char(row, key):
        """CPU seconds of `key` per character of the row's reference text: rescoring's
        cost follows the hypotheses' lengths, which random-weight models set by chance."""
        value = row.get(key)
        return value * row["audio_s"] / row["reference_chars"] if value and row["reference_chars"] else None
    for n, batched, (a, b) in rows:
        used = (f"on ({a['streams_per_batched_call']} / {b['streams_per_batched_call']})"
                if a["batched_encoder"] or b["batched_encoder"] else "off")
        enc_a, enc_b = a.get("encoder_cpu_per_audio_s"), b.get("encoder_cpu_per_audio_s")
        print(f"| {n} | {used} | {a['rtf_cpu']} | {b['rtf_cpu']} | {ratio(b['rtf_cpu'], a['rtf_cpu']):.2f} | "
              f"{enc_a} | {enc_b} | {ratio(enc_b, enc_a):.2f} | "
              f"{ratio(b.get('decoder_cpu_per_audio_s'), a.get('decoder_cpu_per_audio_s')):.2f} | "
              f"{ratio(per_char(b, 'decoder_cpu_per_audio_s'), per_char(a, 'decoder_cpu_per_audio_s')):.2f} | "
              f"{a['reference_chars']} / {b['reference_chars']} | "
              f"{a['final_p95_ms']} | {b['final_p95_ms']} | {ratio(b['final_p95_ms'], a['final_p95_ms']):.2f} | "
              f"{a['cer_vs_offline_pct']} / {b['cer_vs_offline_pct']} |")
    if args.out:
        write_json_atomic(args.out, {"A": dir_a, "B": dir_b, "rows": [
            {"concurrency": n, "batch_encoder": batched, "A": a, "B": b}
            for n, batched, (a, b) in rows]})
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", help="ONNX export directory")
    p.add_argument("--standin", help="write an untrained stand-in export here (needs torch) and use it")
    p.add_argument("--standin_size", default="256,12,4,4000", help="d,blocks,heads,vocab of the stand-in")
    p.add_argument("--random_export", nargs=2, metavar=("CONFIG", "DIR"),
                   help="export an untrained model of this train config into DIR and use it")
    p.add_argument("--vocab", type=int, default=5000, help="vocabulary of --random_export")
    p.add_argument("--wav_scp", help="test wavs (default: synthetic utterances)")
    p.add_argument("--concurrency", default="1,2,4,8,16,24,32")
    p.add_argument("--seconds", type=float, default=20.0, help="streaming time per N")
    p.add_argument("--chunk_ms", type=int, default=200)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--max_batch", type=int, default=0,
                   help="server --max_batch of the sweep (0: the server's default, 16 with "
                        "the batched encoder, else 1)")
    p.add_argument("--batch_encoder", choices=["on", "off", "both"], default="on",
                   help="serve with encoder_batch.onnx (on), without it (off: the server's "
                        "--no_batch_encoder), or both, one after the other (--compare)")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--rt_latency_ms", type=float, default=1000.0,
                   help="p95 final latency that still counts as real time")
    p.add_argument("--sequential", type=int, default=1000)
    p.add_argument("--compare_batching", action="store_true")
    p.add_argument("--int8", action="store_true")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--server_args", default="",
                   help="more wenet-moe-server flags for the load runs, e.g. \"--batch_wait_ms 300\"")
    p.add_argument("--export_only", action="store_true",
                   help="with --random_export: write the export and stop")
    p.add_argument("--compare", nargs=2, metavar=("EXPORT_A", "EXPORT_B"),
                   help="server cost of export B against export A at each --concurrency")
    p.add_argument("--calibrate_blank", type=float, default=0.0, metavar="FRACTION",
                   help="with --compare: serve copies of the exports whose CTC blank bias "
                        "makes FRACTION of the test wavs' frames blank-best (0: as exported)")
    args = p.parse_args()
    if not 0.0 <= args.calibrate_blank < 1.0:
        p.error(f"--calibrate_blank must be in [0, 1), got {args.calibrate_blank}")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runtime", "tests"))
    if args.standin:
        import rt_tiny_model as T
        from wenet_moe_runtime.features import FbankOptions
        d, blocks, heads, vocab = (int(x) for x in args.standin_size.split(","))
        T.make_standin_export(args.standin, FbankOptions().to_dict(), d, blocks, heads, vocab)
        args.model_dir = args.standin
    if args.random_export:
        make_random_export(args.random_export[0], args.random_export[1], args.vocab, 16)
        args.model_dir = args.random_export[1]
        if args.export_only:
            return 0
    if args.compare:
        return compare_exports(args, *args.compare)
    if not args.model_dir:
        p.error("give --model_dir, --standin or --compare")
    wavs = ([(k, read_wav(path)[0]) for k, path in read_scp(args.wav_scp)] if args.wav_scp
            else synthetic_wavs())
    reference = offline_reference(args.model_dir, wavs, args.int8)
    report = {"model_dir": args.model_dir, "cores": args.cores, "runs": []}
    largest = 0
    for n in [int(x) for x in args.concurrency.split(",")]:
        r = run_concurrency(args, args.model_dir, wavs, reference, n, args.max_batch)
        report["runs"].append(r)
        print(json.dumps(r), flush=True)
        if not r["realtime"]:
            break
        largest = n
    report["largest_realtime_concurrency"] = largest
    # CPU time per audio second does not depend on other processes sharing the
    # cores (their load only delays us), so it also gives the capacity of idle cores.
    rtfs = [r["rtf_cpu"] for r in report["runs"] if r["rtf_cpu"]]
    if rtfs:
        worst = max(rtfs)
        report["cpu_bound_capacity"] = int(0.8 * args.cores / worst)
        print(f"server CPU per audio second: {worst:.3f} -> about "
              f"{report['cpu_bound_capacity']} real-time streams on {args.cores} idle cores "
              f"(80% utilisation)", flush=True)
    report["load_average"] = os.getloadavg()
    if args.compare_batching and largest:
        for mb in (1, 8):
            r = run_concurrency(args, args.model_dir, wavs, reference, largest, mb)
            report.setdefault("batching", []).append(r)
            print(json.dumps(r), flush=True)
    if args.sequential > 0:
        srv = Server(args.model_dir, ["--num_workers", str(args.num_workers)])
        try:
            marks = sorted({10, args.sequential} | {m for m in (100, 500) if m < args.sequential})
            rss = asyncio.run(_sequential(srv.url, srv.proc.pid, wavs[0][1][:16000], args.sequential, marks))
        finally:
            srv.stop()
        report["rss_after_sequential_mb"] = rss
        print(json.dumps({"rss_after_sequential_mb": rss}), flush=True)
    print(f"largest real-time concurrency on {args.cores} cores: {largest}", flush=True)
    if args.out:
        write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
