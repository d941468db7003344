"""ONNX Runtime node profile of exported encoders run as the torch-free runtime runs them.

For each export directory (an `encoder.onnx`, or `encoder.int8.onnx` with `--int8`,
beside the rest of an export), runs `wenet_moe_runtime.offline.encode_utterance` on
`--seconds` of N(0, 1) features (every chunk spreads over nearly all experts) with
`SessionOptions.enable_profiling`, and prints the milliseconds summed over all calls
by op type (after ONNX Runtime's graph optimisations, so fused ops appear under their
fused names), the number of nodes run per encoder call, and the total; the first
utterance is a warm-up and not counted.

    python bench/ort_profile.py /tmp/wenet_moe_rtf/dense_s-5000-0 /tmp/wenet_moe_rtf/moe_topk-5000-0
    python bench/ort_profile.py --int8 --chunk -1 EXPORT_DIR     # offline, int8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from typing import Dict, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402


def profile(export_dir: str, int8: bool, chunk: int, feats: np.ndarray, threads: int,
            as_served: bool = False) -> Tuple[Dict[str, float], Counter, int]:
    """(ms by op type summed over the timed calls, nodes by op type per call, calls).
    `as_served`: the encoder the runtime serves (an MoE's `.kernel/whole.onnx`, its
    experts as `RoutedExperts` nodes, where the kernel builds), else the `.onnx` graph."""
    import onnxruntime as ort
    from wenet_moe_runtime.expert_encoder import ExpertSplitEncoder
    from wenet_moe_runtime.model import OnnxAsrModel
    from wenet_moe_runtime.offline import encode_utterance

    model = OnnxAsrModel(export_dir, int8=int8, num_threads=threads, kernel_experts=as_served)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="ort_profile_"), "enc")
    served = model.sessions["encoder"]
    if isinstance(served, ExpertSplitEncoder) and served.mode == "whole":
        encoder = ExpertSplitEncoder(served.path, opts)
        sess = encoder.session
    else:   # the .onnx graph (the pieces of an older export are not one session: its .onnx)
        graph = os.path.join(export_dir, "encoder.int8.onnx" if int8 else "encoder.onnx")
        sess = encoder = ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
    model.sessions["encoder"] = encoder
    encode_utterance(model, feats, chunk)                    # warm-up, not counted
    encode_utterance(model, feats, chunk)
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.unlink(path)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    calls = len(runs) // 2
    start = runs[calls - 1]["ts"] + runs[calls - 1]["dur"] if calls else 0
    events = [e for e in events if e.get("ts", 0) >= start]
    ms: Dict[str, float] = Counter()
    nodes: Counter = Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        ms[op] += e["dur"] / 1e3
        nodes[op] += 1
    for op in nodes:
        nodes[op] = round(nodes[op] / max(calls, 1))
    return dict(ms), nodes, calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dirs", nargs="+")
    p.add_argument("--int8", action="store_true", help="profile encoder.int8.onnx")
    p.add_argument("--as_served", action="store_true",
                   help="profile the encoder the runtime serves (an MoE's .kernel/whole.onnx)")
    p.add_argument("--chunk", type=int, default=16, help="decoding chunk (-1: offline)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=14, help="op types shown")
    args = p.parse_args()
    for d in args.export_dirs:
        if not os.path.isdir(d):
            p.error(f"{d}: not a directory")
    print(machine.describe())
    frames = int(args.seconds * 100)
    feats = np.random.default_rng(0).standard_normal((frames, 80)).astype(np.float32)
    results = {d: profile(d, args.int8, args.chunk, feats, args.threads, args.as_served)
               for d in args.export_dirs}
    ops = Counter()
    for ms, _, _ in results.values():
        for op, v in ms.items():
            ops[op] = max(ops[op], v)
    shown = [op for op, _ in ops.most_common(args.top)]
    names = [os.path.basename(os.path.normpath(d)) for d in args.export_dirs]
    print(f"\nencoder{'.int8' if args.int8 else ''}{' as served' if args.as_served else '.onnx'}, chunk {args.chunk}, "
          f"{args.seconds:g} s random features, {args.threads} thread(s): node ms summed over "
          f"all calls (nodes run per call)")
    width = max(26, max(len(n) for n in names) + 2)
    print(f"{'op type':<28}" + "".join(f"{n:>{width}}" for n in names))
    for op in shown + ["(other)", "total"]:
        cells = []
        for ms, nodes, _ in results.values():
            if op == "total":
                v, c = sum(ms.values()), sum(nodes.values())
            elif op == "(other)":
                v = sum(x for o, x in ms.items() if o not in shown)
                c = sum(x for o, x in nodes.items() if o not in shown)
            else:
                v, c = ms.get(op, 0.0), nodes.get(op, 0)
            cells.append(f"{v:>{width - 8}.0f} ({c:>5})")
        print(f"{op:<28}" + "".join(cells))
    print("encoder calls: " + ", ".join(f"{n} {r[2]}" for n, r in zip(names, results.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
