"""Whole-model real-time factor: Dense-S vs MoE (each router) vs Dense-L, PyTorch and runtime.

Models (random weights unless `--checkpoint`; 80-dim fbank input, `--vocab` outputs):
  dense_s      examples/aishell2/s0/conf/train_u2++_conformer.yaml (FFN 2048)
  moe_<router> train_u2++_moe.yaml (topk: 8 x 1024, top-2), train_switch.yaml,
               train_speechmoe.yaml (8 x 2048, top-1), train_omni.yaml (8 x 1024, top-2)
  dense_l      the dense config with FFN = n_expert x expert hidden of train_u2++_moe.yaml
               (8192: the MoE's total parameters)
Random-weight models get their CTC blank bias raised so that ~70% of frames are blank
(peaky posteriors, so the prefix beam search and rescoring see realistic n-best lists),
and again for the decoding cases of each feature kind on its own, so that the models
compared emit about as many tokens on every kind (what decoding costs follows that count).

Cases (batch 1, one `--seconds` utterance; RTF = wall time / audio seconds):
  torch offline / chunk16      encoder only: full context, or `forward_chunk_by_chunk`
                               with chunk 16 and all left chunks (caches)
  torch dec offline / chunk16  full decoding: encoder + CTC prefix beam (beam 10) +
                               attention rescoring (`ASRModel.decode`)
  rt chunk16 PREC              the ONNX export through the torch-free runtime:
                               `wenet_moe_runtime.offline.encode_utterance` at chunk 16;
                               PREC fp32: as served (an MoE's FFNs in the C kernel,
                               `encoder.kernel/whole.onnx`, where it builds), fp32-ort: every
                               graph in ONNX Runtime, int8: the *.int8.onnx graphs
                               (an MoE encoder's FFNs as w8a8 in the kernel,
                               `encoder.int8.kernel/`, where it builds)
  rt offline PREC              the same, the whole utterance in one encoder call
  rt dec chunk16 PREC          runtime encoder + CTC + prefix beam + rescoring
at each `--threads` value (torch intra-op threads and ONNX Runtime intra-op threads),
for each feature kind:
  random   N(0, 1) features: every chunk spreads over nearly all experts (worst case)
  speech   fbank of `--seconds` of espeak-ng Mandarin (voice cmn), normalised per bin
           over the utterance (what global CMVN does for a trained model)
Every repetition times each model once, in an order rotated by one place per
repetition; the table gives medians. Peak memory (max RSS) is measured per model in
a fresh subprocess (PyTorch: build + offline + chunk16; runtime: load + chunk16).
Where MoE/Dense-S misses its target (1.15 offline, 1.3 chunk 16), a per-part
breakdown (attention, conv, FFN/MoE split into router and experts+dispatch, rest)
of the PyTorch encoder is printed.

    python bench/rtf.py                 # everything (tens of minutes on 2 cores)
    python bench/rtf.py --quick         # dense_s, moe_topk, dense_l; random features;
                                        # current threads; no int8, no memory
    python bench/rtf.py --checkpoint dense=exp/dense/avg_10.pt --checkpoint moe=exp/moe/avg_10.pt
    python bench/rtf.py --models dense_s moe_topk --runtime-only --no-decode \
        --precisions fp32 int8 --threads 1 --features random   # runtime encoders only
    python bench/rtf.py --quick --expert_precision fp32 bf16   # + moe_topk@bf16 (PyTorch)

`--expert_precision bf16 int8 w8a8` adds, per MoE model, a copy sharing its parameters
with moe_conf.expert_precision set (`moe_<router>@bf16`): bf16 / int8 / w8a8 packed
experts in the eager PyTorch cases; `@int8` is also exported with `--expert_precision int8` (fp32
graphs whose experts are 8-bit `MatMulNBits`) and run in the fp32 runtime cases; `@bf16` is exported with `--expert_precision bf16`
(bf16 values in the fp32 graphs, bf16 weights in the kernel graphs that the runtime's
fp32 cases run). The SUMMARY line gives
their MoE/Dense-S ratios too. When a runtime ratio misses its target, the ONNX Runtime
node profile of both encoders (op types, ms per call) says which ops run; its per-node
times inflate small nodes and do not add up to the wall time, so for a fp32 chunk-16
miss the bench also measures the split between the experts' bytes and the dispatch
(`bench/runtime_expert_bytes.py`: a shared-expert copy of the MoE encoder).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict, defaultdict
from typing import Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402
from common import model_blank_shift, raise_blank_  # noqa: E402
from wenet_moe.layers import cpu_kernel  # noqa: E402
from wenet_moe.layers import moe as moe_module  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF_DIR = os.path.join(ROOT, "examples", "aishell2", "s0", "conf")
ROUTER_CONFIGS = {"topk": "train_u2++_moe.yaml", "switch": "train_switch.yaml",
                  "speechmoe": "train_speechmoe.yaml", "omni": "train_omni.yaml"}
TARGETS = {"offline": 1.15, "chunk16": 1.3}
# wall: time.perf_counter; cpu: this process's CPU seconds (all its threads), which a
# machine shared with other work inflates far less than wall time (at 1 thread it is
# the time the case actually ran; at N threads it sums the threads' time)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = "wall"
CHUNK = 16
DEVICE = torch.device("cpu")        # --device: where the PyTorch models run


def now() -> float:
    """CLOCK's reading after the device's queued work is done (CUDA runs asynchronously)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return CLOCKS[CLOCK]()


# ---------------------------------------------------------------------------- models
def model_configs(routers: List[str], vocab: int, units: str) -> "OrderedDict[str, dict]":
    """name -> resolved config (random-weight models) for Dense-S, each MoE, Dense-L."""
    from wenet_moe.config import load_yaml

    def prepared(path: str) -> dict:
        conf = load_yaml(path)
        conf.update({"input_dim": 80, "output_dim": vocab})
        conf.pop("cmvn", None)
        conf.pop("cmvn_conf", None)
        conf["tokenizer_conf"]["symbol_table_path"] = units
        return conf

    confs: "OrderedDict[str, dict]" = OrderedDict()
    confs["dense_s"] = prepared(os.path.join(CONF_DIR, "train_u2++_conformer.yaml"))
    for router in routers:
        confs[f"moe_{router}"] = prepared(os.path.join(CONF_DIR, ROUTER_CONFIGS[router]))
    moe = prepared(os.path.join(CONF_DIR, ROUTER_CONFIGS["topk"]))
    dense_l = copy.deepcopy(confs["dense_s"])
    for key in ("encoder_conf", "decoder_conf"):
        dense_l[key]["linear_units"] = moe[key]["n_expert"] * moe[key]["linear_units"]
    confs["dense_l"] = dense_l
    return confs


def write_units(path: str, vocab: int) -> None:
    syms = ["<blank>", "<unk>", "<sos/eos>"] + [chr(0x4E00 + i) for i in range(vocab - 3)]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{s} {i}\n" for i, s in enumerate(syms))


def build_random(conf: dict, feats: torch.Tensor) -> torch.nn.Module:
    """Random-weight model, CTC blank bias raised until ~70% of `feats`' frames are blank."""
    from wenet_moe.model import build_model
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(conf)).eval()
    raise_blank_(model, feats, 0.7, CHUNK)
    return model


def move_blanks(models, shifts: Dict[str, float], variants: Dict[str, str], sign: int) -> None:
    """Adds sign x shifts[n] to the CTC blank bias of each base model n (a variant shares
    its base model's bias)."""
    for n, shift in shifts.items():
        if n not in variants:
            models[n].ctc.ctc_lo.bias[0] += sign * shift


def params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


# -------------------------------------------------------------------------- features
def speech_fbank(seconds: float) -> np.ndarray:
    """(frames, 80) fbank of `seconds` of espeak-ng Mandarin, normalised per bin."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import espeak_tts
    from scipy.signal import resample_poly
    from wenet_moe_runtime.features import FbankOptions, compute_fbank
    text = ("今天天气很好我们一起去公园散步然后在湖边喝茶聊天"
            "明天早上八点在学校门口见面请不要迟到")
    tts = espeak_tts.EspeakTTS("cmn")
    pieces, total = [], 0
    rate = 16000
    while total < seconds * rate + 800:
        raw = tts.synth(text, "", 175, 50, 50, seed=len(pieces))
        x = resample_poly(raw.astype(np.float64), rate, tts.sample_rate).astype(np.float32)
        pieces.append(x)
        total += len(x)
    wav = np.concatenate(pieces)[: int(seconds * rate) + 240]
    opts = FbankOptions()
    opts.dither = 0.0
    feats = np.asarray(compute_fbank(wav, rate, opts), np.float32)
    return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)


def features(kind: str, seconds: float, speech_file: str = "") -> np.ndarray:
    """(frames, 80) features of `kind`; 'speech' from `speech_file` (.npy written by
    --save-speech) when given, so that a machine without espeak-ng can use them."""
    frames = int(seconds * 100)
    if kind == "random":
        return np.random.default_rng(0).standard_normal((frames, 80)).astype(np.float32)
    if speech_file:
        feats = np.load(speech_file)
        if feats.ndim != 2 or feats.shape[1] != 80 or feats.shape[0] < frames:
            raise SystemExit(f"{speech_file}: expected (>= {frames}, 80) features, got {feats.shape}")
        return feats[:frames].astype(np.float32)
    return speech_fbank(seconds)[:frames]


# ------------------------------------------------------------------------- timing
def interleaved(fns: Dict[str, Callable[[], None]], reps: int) -> Dict[str, float]:
    """Median seconds of each fn; every repetition runs all, rotated by one per rep."""
    names = list(fns)
    for fn in fns.values():          # warm-up (packing, allocator, ORT arenas)
        fn()
    samples: Dict[str, List[float]] = defaultdict(list)
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = now()
            fns[name]()
            samples[name].append(now() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def torch_cases(model, x: torch.Tensor) -> Dict[str, Callable[[], None]]:
    lens = torch.tensor([x.size(1)], device=x.device)

    def offline():
        model.encoder(x, lens, -1, -1)

    def chunk16():
        model.encoder.forward_chunk_by_chunk(x, CHUNK, -1)

    def dec_offline():
        model.decode(["attention_rescoring"], x, lens, beam_size=10, decoding_chunk_size=-1)

    def dec_chunk16():
        model.decode(["attention_rescoring"], x, lens, beam_size=10, decoding_chunk_size=CHUNK,
                     simulate_streaming=True)
    return {"torch offline": offline, "torch chunk16": chunk16,
            "torch dec offline": dec_offline, "torch dec chunk16": dec_chunk16}


def runtime_cases(rt, feats: np.ndarray, label: str, blank_raise: float = 0.0) -> Dict[str, Callable[[], None]]:
    from wenet_moe_runtime.ctc_search import ctc_prefix_beam_search
    from wenet_moe_runtime.decoder import DecodeOptions, rescore
    from wenet_moe_runtime.offline import encode_chunks, encode_utterance
    opts = DecodeOptions(chunk_size=CHUNK)

    def enc():
        encode_utterance(rt, feats, CHUNK)

    def enc_offline():
        encode_utterance(rt, feats, -1)

    def dec():
        chunks = encode_chunks(rt, feats, CHUNK)
        log_probs = np.concatenate([rt.ctc_log_probs(h) for h in chunks], axis=0)
        # the blank raised by `blank_raise` (the kind's own calibration): adding to the blank's
        # log-posterior ranks every prefix as raising its logit would (the two differ by
        # a per-frame constant that every path pays once)
        log_probs[:, rt.symbols.blank_id] += blank_raise
        hyps = ctc_prefix_beam_search(log_probs, 10, rt.symbols.blank_id)
        rescore(rt, hyps, np.concatenate(chunks, axis=0), opts)
    return {f"rt chunk16 {label}": enc, f"rt offline {label}": enc_offline,
            f"rt dec chunk16 {label}": dec}


# ----------------------------------------------------------------------- breakdown
def breakdown(model, x: torch.Tensor, mode: str, reps: int = 3) -> Dict[str, float]:
    """Seconds per encoder pass by part: attention, conv, ffn (dense FFN), router and
    experts (MoE: routing vs sort/gather/experts/add-back), rest (embedding, norms, ...).
    Timed with forward hooks / method wrappers on one pass (median of `reps`)."""
    from wenet_moe.layers.moe import MoEFFN
    acc: Dict[str, float] = defaultdict(float)
    handles, restore = [], []

    def timed_module(module, part):
        def pre(_m, _i):
            module._bench_t0 = now()

        def post(_m, _i, _o):
            acc[part] += now() - module._bench_t0
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    def timed_method(obj, name, part):
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            start = now()
            try:
                return original(*args, **kwargs)
            finally:
                acc[part] += now() - start
        setattr(obj, name, wrapper)
        restore.append((obj, name))

    for layer in model.encoder.encoders:
        timed_module(layer.self_attn, "attention")
        if getattr(layer, "conv_module", None) is not None:
            timed_module(layer.conv_module, "conv")
        for ffn in (layer.feed_forward, getattr(layer, "feed_forward_macaron", None)):
            if ffn is None:
                continue
            if isinstance(ffn, MoEFFN):
                timed_method(ffn, "route", "router")
                timed_method(ffn, "dispatch", "experts")
            else:
                timed_module(ffn, "ffn")
    run = torch_cases(model, x)[f"torch {mode}"]
    totals, parts = [], []
    try:
        run()
        for _ in range(reps):
            acc.clear()
            start = now()
            run()
            totals.append(now() - start)
            parts.append(dict(acc))
    finally:
        for h in handles:
            h.remove()
        for obj, name in restore:
            delattr(obj, name)
    best = int(np.argsort(totals)[len(totals) // 2])
    result = dict(parts[best])
    result["rest"] = totals[best] - sum(result.values())
    result["total"] = totals[best]
    return result


# -------------------------------------------------------------------------- memory
def memory_worker(args) -> int:
    """Subprocess: build / load one model, run it, print its peak RSS in MiB (VmHWM:
    getrusage's ru_maxrss would carry over the parent's peak across fork + exec)."""
    feats = features("random", args.seconds)
    if args.memory_backend == "torch":
        torch.set_num_threads(1)
        conf = json.loads(open(args.memory_conf).read())
        x = torch.from_numpy(feats)[None]
        model = build_random(conf, x)      # parameters outside inference mode
        with torch.inference_mode():
            model.encoder(x, torch.tensor([x.size(1)]), -1, -1)
            model.encoder.forward_chunk_by_chunk(x, CHUNK, -1)
    else:
        from wenet_moe_runtime.model import OnnxAsrModel
        from wenet_moe_runtime.offline import encode_utterance
        rt = OnnxAsrModel(args.memory_export, int8=args.memory_backend == "int8", num_threads=1,
                          kernel_experts=args.memory_backend != "fp32-ort")
        encode_utterance(rt, feats, CHUNK)
    with open("/proc/self/status") as f:
        peak = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")),
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"max_rss_mib": peak}))
    return 0


def peak_memory(backend: str, conf_path: str = "", export_dir: str = "", seconds: float = 10) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-backend", backend,
           "--seconds", str(seconds)]
    cmd += ["--memory-conf", conf_path] if conf_path else ["--memory-export", export_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  memory probe ({backend}) failed: {tail}")
        return float("nan")
    return json.loads(done.stdout.strip().splitlines()[-1])["max_rss_mib"]


# ---------------------------------------------------------------------------- main
def export_code_digest() -> str:
    """Hash of the sources an export depends on (model, layers, export): a cached
    export written by other code is written again."""
    import hashlib
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "wenet_moe")
    digest = hashlib.sha256()
    for sub in ("model", "layers", "export"):
        for name in sorted(os.listdir(os.path.join(root, sub))):
            if name.endswith((".py", ".c")):
                with open(os.path.join(root, sub, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def export_current(stamp: str) -> bool:
    """Whether the export of `stamp` (its `.bench_complete` file) was written by this code."""
    try:
        with open(stamp, encoding="utf-8") as f:
            return f.read().strip() == export_code_digest()
    except OSError:
        return False


def export_model(model, conf: dict, out_dir: str, int8: bool, expert_precision: str = "fp32"
                 ) -> None:
    from wenet_moe.export import export_loaded
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_loaded(model, copy.deepcopy(conf), copy.deepcopy(conf), out_dir, chunk_size=CHUNK,
                      left_chunks=-1, quantize="int8" if int8 else None, verify=False,
                      expert_precision=expert_precision)


def runtime_profile(export_dir: str, int8: bool, chunk: int, feats: np.ndarray, threads: int,
                    as_served: bool, top: int = 6) -> str:
    """'op ms, ...' per encoder call of the top op types (ONNX Runtime node profile; of
    the encoder as served, an MoE's experts as `RoutedExperts` nodes, or the .onnx one)."""
    import ort_profile
    ms, nodes, calls = ort_profile.profile(export_dir, int8, chunk, feats, threads, as_served)
    ranked = sorted(ms.items(), key=lambda kv: -kv[1])
    total = sum(ms.values()) / max(calls, 1)
    cells = [f"{op} {v / max(calls, 1):.1f}" for op, v in ranked[:top]]
    return f"{total:.1f} ms per call ({sum(nodes.values())} nodes): " + ", ".join(cells)


def print_table(title: str, results: Dict[str, Dict[str, float]], names: List[str], seconds: float) -> None:
    cases = list(next(iter(results.values())).keys()) if results else []
    print(f"\n{title}: RTF (median {CLOCK} seconds / {seconds:g} audio seconds)")
    header = f"{'case':<22}" + "".join(f"{n:>14}" for n in names)
    if "dense_s" in names:
        header += "".join(f"{n + '/S':>16}" for n in names if n != "dense_s")
    print(header)
    print("-" * len(header))
    for case in cases:   # "-": a case a model does not run (runtime cases of @bf16 / @int8)
        row = f"{case:<22}" + "".join(f"{results[n][case] / seconds:>14.4f}" if case in results[n]
                                      else f"{'-':>14}" for n in names)
        if "dense_s" in names:
            row += "".join(f"{results[n][case] / results['dense_s'][case]:>16.2f}" if case in results[n]
                           else f"{'-':>16}" for n in names if n != "dense_s")
        print(row, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", nargs="+", choices=list(ROUTER_CONFIGS), help="default: all")
    p.add_argument("--threads", type=int, nargs="+", help="default: 1 2")
    p.add_argument("--features", nargs="+", choices=["random", "speech"], help="default: both")
    p.add_argument("--precisions", nargs="*", choices=["fp32", "fp32-ort", "int8"],
                   help="runtime cases: fp32 (the MoE FFNs in the C kernel where the export has "
                        "encoder.kernel/ and the kernel builds), fp32-ort (every graph in ONNX "
                        "Runtime: kernel_experts=False), int8 (default: all three; none: no "
                        "runtime cases)")
    p.add_argument("--expert_precision", nargs="+", default=["fp32"], choices=list(cpu_kernel.PRECISIONS),
                   help="moe_conf.expert_precision of the PyTorch MoE models: each value other than "
                        "fp32 adds a copy of every MoE model (shared parameters) named moe_<router>@<value>; "
                        "@int8 also runs the fp32 runtime cases, exported with --expert_precision int8")
    p.add_argument("--no-decode", action="store_true", help="encoder cases only")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--reps", type=int, help="repetitions (default 5, --quick 3)")
    p.add_argument("--vocab", type=int, default=5000)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "wenet_moe_rtf"),
                   help="exports are written (and reused) here")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="trained checkpoint (train.yaml beside it); repeat for several, e.g. "
                        "dense_s=... moe_topk=...: replaces the random model of that name, or adds one")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time (default) or this process's CPU time (for a busy shared "
                        "machine; RTF then counts CPU seconds of all threads)")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="only these of dense_s, moe_<router>, dense_l (default: all)")
    p.add_argument("--runtime-only", action="store_true",
                   help="only the runtime cases (no PyTorch timings, breakdowns or torch memory)")
    p.add_argument("--quick", action="store_true",
                   help="defaults become: dense_s, moe_topk, dense_l; random features; current "
                        "thread count; fp32 runtime; 3 reps; no memory probes (options given "
                        "explicitly still apply)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the PyTorch cases run; cuda: no runtime cases (ONNX Runtime runs "
                        "on the CPU), no thread sweep, no peak memory")
    p.add_argument("--accelerator-dispatch", default="auto", choices=list(moe_module.ACCELERATOR_PATHS),
                   help="MoE dispatch off the CPU (wenet_moe.layers.moe.ACCELERATOR_DISPATCH)")
    p.add_argument("--speech-features", default="", metavar="NPY",
                   help="'speech' features from this .npy (written by --save-speech) instead of espeak-ng")
    p.add_argument("--save-speech", metavar="NPY", help="write the 'speech' features of --seconds to NPY and exit")
    p.add_argument("--memory-backend", help=argparse.SUPPRESS)
    p.add_argument("--memory-conf", help=argparse.SUPPRESS)
    p.add_argument("--memory-export", help=argparse.SUPPRESS)
    args = p.parse_args()
    global CLOCK, DEVICE
    CLOCK = args.clock
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device available")
        moe_module.ACCELERATOR_DISPATCH = args.accelerator_dispatch
        args.precisions, args.threads, args.no_memory = [], [torch.get_num_threads()], True
    if args.memory_backend:
        return memory_worker(args)
    if args.save_speech:
        np.save(args.save_speech, features("speech", args.seconds))
        return 0
    quick = args.quick

    def default(value, full, fast):
        return value if value is not None else (fast if quick else full)
    args.routers = default(args.routers, list(ROUTER_CONFIGS), ["topk"])
    args.threads = default(args.threads, [1, 2], [torch.get_num_threads()])
    args.features = default(args.features, ["random", "speech"], ["random"])
    args.precisions = default(args.precisions, ["fp32", "fp32-ort", "int8"], ["fp32", "fp32-ort"])
    args.reps = default(args.reps, 5, 3)
    args.no_memory = args.no_memory or quick

    print(machine.describe())
    print(f"torch {torch.__version__}, {sys.argv[0]} {' '.join(sys.argv[1:])}")
    if DEVICE.type == "cuda":
        print(f"device {torch.cuda.get_device_name(DEVICE)}, MoE dispatch {args.accelerator_dispatch}")
    os.makedirs(args.work_dir, exist_ok=True)
    units = os.path.join(args.work_dir, "units.txt")
    write_units(units, args.vocab)
    confs = model_configs(args.routers, args.vocab, units)
    if args.models:
        unknown = [m for m in args.models if m not in confs]
        if unknown:
            p.error(f"--models {' '.join(unknown)}: not among {', '.join(confs)}")
        confs = OrderedDict((n, c) for n, c in confs.items() if n in args.models)
    if args.runtime_only and not args.precisions:
        p.error("--runtime-only needs at least one --precisions value")
    feats = {kind: features(kind, args.seconds, args.speech_features) for kind in args.features}
    calib = torch.from_numpy(feats.get("speech", feats[args.features[0]]))[None]

    models: "OrderedDict[str, torch.nn.Module]" = OrderedDict()
    trained = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not path:
            p.error(f"--checkpoint {item!r}: expected NAME=PATH")
        trained[name] = path
    for name, conf in confs.items():
        if name not in trained:
            models[name] = build_random(conf, calib)
    if trained:
        from wenet_moe.model.loading import build_and_load, load_configs
        for name, path in trained.items():
            raw, conf = load_configs(os.path.join(os.path.dirname(path), "train.yaml"))
            models[name] = build_and_load(conf, path)
            confs[name] = conf
            print(f"{name}: trained checkpoint {path} (features: raw fbank, the model's CMVN "
                  f"applies; 'speech' features are not normalised for it)")
    # expert-precision variants: the MoE models again, parameters shared, experts packed at P
    variants: Dict[str, str] = {}
    for precision in dict.fromkeys(args.expert_precision):
        if precision == "fp32":
            continue
        for name in [n for n in models if n.startswith("moe") and "@" not in n]:
            model = models[name]
            memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
            twin = copy.deepcopy(model, memo)
            for module in twin.modules():
                if hasattr(module, "expert_precision"):
                    module.expert_precision = precision
            models[f"{name}@{precision}"] = twin
            variants[f"{name}@{precision}"] = name
    names = list(models)
    for name in names:
        print(f"  {name:<14} {params_m(models[name]):7.1f} M parameters")
        models[name].to(DEVICE)
    # the ONNX / runtime models: every base model, @int8 (fp32 graphs, int8 experts) and
    # @bf16 (bf16 values in the fp32 graphs; the kernel graphs hold bf16)
    exported = [n for n in names if n not in variants or n.endswith(("@int8", "@bf16"))]

    exports: Dict[str, str] = {}
    if args.precisions:
        for name in exported:
            base = variants.get(name, name)
            out = os.path.join(args.work_dir, f"{name}-{args.vocab}-{int(bool(base in trained))}")
            stamp = os.path.join(out, ".bench_complete")
            want_int8 = "int8" in args.precisions and name not in variants
            have = (export_current(stamp) and
                    (not want_int8 or os.path.exists(os.path.join(out, "encoder.int8.onnx"))))
            if not have or base in trained:
                start = time.perf_counter()
                if os.path.exists(stamp):       # the export only replaces what it writes
                    os.unlink(stamp)
                export_model(models[name], confs[base], out, want_int8,
                             name.split("@")[1] if name in variants else "fp32")
                with open(stamp, "w", encoding="utf-8") as f:
                    f.write(export_code_digest())
                print(f"  exported {name} to {out} in {time.perf_counter() - start:.0f} s", flush=True)
            exports[name] = out

    summary = {}
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            runtimes = {}
            if exports:
                from wenet_moe_runtime.model import OnnxAsrModel
                runtimes = {prec: {n: OnnxAsrModel(exports[n], int8=prec == "int8", num_threads=threads,
                                                   kernel_experts=prec != "fp32-ort")
                                   for n in exported if prec == "fp32" or n not in variants}
                            for prec in args.precisions}
                for prec in ("fp32", "int8"):
                    for n, rt in runtimes.get(prec, {}).items():
                        if rt.kernel_experts:
                            chosen = f" ({rt.encoder_choice})" if rt.kernel_experts == "on" and rt.encoder_choice else ""
                            print(f"  {n} runtime {prec}: MoE FFNs in the C kernel {rt.kernel_experts}{chosen}")
            for kind, fe in feats.items():
                x = torch.from_numpy(fe)[None].to(DEVICE)
                results: Dict[str, Dict[str, float]] = {n: {} for n in names}
                # random-weight models: the blank of this kind's decoding cases at 70 %
                # (`build_random` calibrated it on one kind; the @P variants share their
                # base model's CTC layer and export)
                shifts = {n: model_blank_shift(models[n], x, 0.7, CHUNK) if not args.no_decode else 0.0
                          for n in names if n not in trained and n not in variants}
                shifts.update({v: shifts.get(b, 0.0) for v, b in variants.items()})
                if any(abs(v) > 0.01 for v in shifts.values()):
                    print(f"  {kind} features: CTC blank raised by "
                          + ", ".join(f"{n} {shifts[n]:+.2f}" for n in names if n in shifts and n not in variants)
                          + " in the decoding cases (calibrated on another kind)")
                move_blanks(models, shifts, variants, +1)
                case_names = list(torch_cases(models[names[0]], x))
                if args.no_decode:
                    case_names = [c for c in case_names if " dec " not in c]
                if args.runtime_only:
                    case_names = []
                for case in case_names:
                    t = interleaved({n: torch_cases(models[n], x)[case] for n in names}, args.reps)
                    for n in names:
                        results[n][case] = t[n]
                move_blanks(models, shifts, variants, -1)
                for prec, rts in runtimes.items():
                    for case in runtime_cases(rts[names[0]], fe, prec):
                        if args.no_decode and " dec " in case:
                            continue
                        t = interleaved({n: runtime_cases(rts[n], fe, prec, shifts.get(n, 0.0))[case]
                                         for n in rts}, args.reps)
                        for n in rts:
                            results[n][case] = t[n]
                title = (f"{threads} thread{'s' if threads > 1 else ''}, {kind} features, "
                         f"batch 1, {args.seconds:g} s" if DEVICE.type == "cpu" else
                         f"{torch.cuda.get_device_name(DEVICE)}, {kind} features, batch 1, "
                         f"{args.seconds:g} s, MoE dispatch {args.accelerator_dispatch}")
                print_table(title, results, names, args.seconds)
                summary[(threads, kind)] = results
                # where to look when the runtime MoE misses its target
                for n in [n for n in exported if n.startswith("moe") and "dense_s" in results]:
                    for prec, rts in runtimes.items():
                        for mode, target in TARGETS.items():
                            case = f"rt {mode} {prec}"
                            if n not in rts or case not in results[n] or case not in results["dense_s"]:
                                continue
                            ratio = results[n][case] / results["dense_s"][case]
                            if ratio <= target:
                                continue
                            chunk = CHUNK if mode == "chunk16" else -1
                            print(f"  {n} {case}: MoE/Dense-S {ratio:.2f} > {target}; ONNX Runtime "
                                  f"encoder profile (ms per call summed by op type)")
                            for m in ("dense_s", n):
                                print(f"    {m}: " + runtime_profile(exports[m], prec == "int8", chunk,
                                                                     fe, threads, prec != "fp32-ort"))
                            if prec == "fp32-ort" and mode == "chunk16" and "@" not in n:
                                import runtime_expert_bytes
                                gap = runtime_expert_bytes.split_gap(exports["dense_s"], exports[n], fe,
                                                                     CHUNK, threads, args.reps)
                                print("    bytes vs dispatch (bench/runtime_expert_bytes.py): "
                                      + runtime_expert_bytes.summary(gap))
                # where to look when MoE misses its target
                for n in names:
                    if not n.startswith("moe") or "dense_s" not in results or args.runtime_only:
                        continue
                    for mode, target in TARGETS.items():
                        ratio = results[n][f"torch {mode}"] / results["dense_s"][f"torch {mode}"]
                        if ratio <= target:
                            continue
                        parts = {m: breakdown(models[m], x, mode) for m in ("dense_s", n)}
                        cells = "  ".join(
                            f"{part} {parts['dense_s'].get(part, 0) * 1e3:.0f}/{parts[n].get(part, 0) * 1e3:.0f}"
                            for part in ("attention", "conv", "ffn", "router", "experts", "rest", "total"))
                        print(f"  {n} torch {mode}: MoE/Dense-S {ratio:.2f} > {target}; ms per "
                              f"pass dense_s/{n}: {cells}")
            del runtimes

    if not args.no_memory:
        print("\npeak memory (max RSS, MiB; fresh process per model)")
        print(f"{'model':<14}{'torch':>10}" + "".join(f"{'rt ' + prec:>10}" for prec in args.precisions))
        for name in exported:
            conf_path = ""
            if name in variants:      # the runtime with int8 experts (fp32 graphs) only
                rt_mb = [peak_memory(prec, export_dir=exports[name], seconds=args.seconds)
                         if prec == "fp32" else float("nan") for prec in args.precisions]
                print(f"{name:<14}{float('nan'):>10.0f}" + "".join(f"{v:>10.0f}" for v in rt_mb),
                      flush=True)
                continue
            if name not in trained:
                conf_path = os.path.join(args.work_dir, f"{name}.json")
                with open(conf_path, "w") as f:
                    json.dump(confs[name], f)
            torch_mb = (peak_memory("torch", conf_path, seconds=args.seconds)
                        if conf_path and not args.runtime_only else float("nan"))
            rt_mb = [peak_memory(prec, export_dir=exports[name], seconds=args.seconds)
                     for prec in args.precisions]
            print(f"{name:<14}{torch_mb:>10.0f}" + "".join(f"{v:>10.0f}" for v in rt_mb), flush=True)

    # one line of ratios per (threads, features)
    for (threads, kind), res in summary.items():
        moe = next((n for n in names if n.startswith("moe")), None)
        if moe is None or "dense_s" not in res:
            continue
        cells = []
        if not args.runtime_only:
            cells += [f"MoE/Dense-S offline {res[moe]['torch offline'] / res['dense_s']['torch offline']:.2f}",
                      f"chunk16 {res[moe]['torch chunk16'] / res['dense_s']['torch chunk16']:.2f}"]
        for prec in args.precisions:
            chunk, full = f"rt chunk16 {prec}", f"rt offline {prec}"
            cells.append(f"runtime {prec} chunk16 {res[moe][chunk] / res['dense_s'][chunk]:.2f} "
                         f"offline {res[moe][full] / res['dense_s'][full]:.2f}")
        if "dense_l" in res and not args.runtime_only:
            l_moe = res['dense_l']['torch offline'] / res[moe]['torch offline']
            l_s = res['dense_l']['torch offline'] / res['dense_s']['torch offline']
            cells.append(f"Dense-L/MoE offline {l_moe:.2f} (target >= 0.9 x Dense-L/Dense-S = {0.9 * l_s:.2f})")
        if "int8" in args.precisions and "fp32" in args.precisions:
            cells.append(f"int8/fp32 runtime MoE chunk16 "
                         f"{res[moe]['rt chunk16 int8'] / res[moe]['rt chunk16 fp32']:.2f} offline "
                         f"{res[moe]['rt offline int8'] / res[moe]['rt offline fp32']:.2f}")
        for variant, base in variants.items():
            if base == moe and not args.runtime_only:
                cells.append(f"{variant.split('@')[1]} experts: MoE/Dense-S offline "
                             f"{res[variant]['torch offline'] / res['dense_s']['torch offline']:.2f}, chunk16 "
                             f"{res[variant]['torch chunk16'] / res['dense_s']['torch chunk16']:.2f}")
            if base == moe and "rt chunk16 fp32" in res.get(variant, {}):
                cells.append(f"runtime fp32 with {variant.split('@')[1]} experts: MoE/Dense-S chunk16 "
                             f"{res[variant]['rt chunk16 fp32'] / res['dense_s']['rt chunk16 fp32']:.2f} "
                             f"offline {res[variant]['rt offline fp32'] / res['dense_s']['rt offline fp32']:.2f}")
        print(f"SUMMARY {moe}, {threads} thread(s), {kind}: " + "; ".join(cells))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f} at end (other processes share this machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
