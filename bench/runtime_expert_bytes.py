"""Where the runtime's MoE / Dense-S gap at streaming chunks comes from: bytes or dispatch.

For an MoE export and a dense export of the same shape (e.g. `bench/rtf.py`'s
work-dir entries), this writes a copy of the MoE's `encoder.onnx` in which every
expert of a layer uses expert 0's weights (same nodes, same routing, same rows per
expert: only the weights read differ, one expert's per layer instead of every chosen
one's), and times the three encoders through the torch-free runtime
(`encode_utterance`, chunk by chunk, interleaved, median of `--reps`):

    dispatch = MoE-shared / Dense-S          the exported dispatch, routers and small-M
                                             GEMMs from cache (1.0: free)
    bytes    = (MoE - MoE-shared) / Dense-S  reading the other chosen experts
    GB/s     = those extra bytes / their time (the chosen experts are counted from the
               routers' TopK outputs, added as graph outputs in the copy)

so MoE / Dense-S = dispatch + bytes. When the bytes term alone exceeds the target's
margin, no dispatch can meet it at that precision: only fewer bytes (int8 experts) do.

    python bench/runtime_expert_bytes.py /tmp/rtfwork/dense_s-5000-0 /tmp/rtfwork/moe_topk-5000-0
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

_EXPERT = re.compile(r"(moe\d+)/expert(\d+)/(w1|w2|b1|b2)")


def shared_expert_copies(moe_dir: str, work: str) -> Tuple[int, int]:
    """Write `work`/shared and `work`/count: `moe_dir` with an encoder.onnx whose expert
    nodes all read their layer's expert-0 weights (the other files linked, not copied);
    in `count` the routers' TopK indices are also outputs after the encoder's three.
    Returns (routers, bytes of one expert's w1 + w2 in fp32)."""
    import onnx
    proto = onnx.load(os.path.join(moe_dir, "encoder.onnx"))
    graph = proto.graph
    rewired = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            m = _EXPERT.fullmatch(name)
            if m and m.group(2) != "0":
                node.input[i] = f"{m.group(1)}/expert0/{m.group(3)}"
                rewired += 1
    if not rewired:
        raise SystemExit(f"{moe_dir}/encoder.onnx: no moe<j>/expert<e>/ weights (not an MoE export)")
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    w1 = next(t for t in keep if _EXPERT.fullmatch(t.name) and t.name.endswith("/expert0/w1"))
    # routers: TopK with a constant K (the dispatch's argsort is a TopK of dynamic K)
    constants = {t.name for t in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    routers = [node for node in graph.node if node.op_type == "TopK" and node.input[1] in constants]
    for variant in ("shared", "count"):
        out_dir = os.path.join(work, variant)
        os.makedirs(out_dir)
        for name in os.listdir(moe_dir):
            if name != "encoder.onnx" and not name.startswith("encoder_batch"):
                os.symlink(os.path.abspath(os.path.join(moe_dir, name)), os.path.join(out_dir, name))
        if variant == "count":
            for node in routers:
                graph.output.add(name=node.output[1])
        onnx.save(proto, os.path.join(out_dir, "encoder.onnx"))
    return len(routers), 2 * int(np.prod(w1.dims)) * 4


def split_gap(dense_dir: str, moe_dir: str, feats: np.ndarray, chunk: int = 16,
              threads: int = 1, reps: int = 7) -> Dict[str, float]:
    """Times Dense-S, the MoE and its shared-expert copy on `feats` (T, 80) chunk by
    chunk; returns the median seconds ("dense_s", "moe", "moe_shared"), the encoder
    calls, routers, mean distinct experts per chunk and router, one expert's bytes and
    the other chosen experts' bytes per call ("extra_per_call")."""
    from wenet_moe_runtime.model import OnnxAsrModel
    from wenet_moe_runtime.offline import encode_chunks, encode_utterance

    work = tempfile.mkdtemp(prefix="expert_bytes_")
    try:
        n_routers, expert_bytes = shared_expert_copies(moe_dir, work)
        # distinct experts per chunk and router, from the counting copy's TopK outputs
        counter = OnnxAsrModel(os.path.join(work, "count"), num_threads=threads, kernel_experts=False)
        session, distinct = counter.sessions["encoder"], []

        class Counting:
            """The encoder session, returning its first three outputs and counting the rest."""
            def run(self, outputs, feeds, *rest):
                result = session.run(None, feeds, *rest)
                distinct.extend(len(np.unique(r)) for r in result[3:])
                return result[:3]
        counter.sessions["encoder"] = Counting()
        encode_chunks(counter, feats, chunk)
        del counter
        models = {"dense_s": OnnxAsrModel(dense_dir, num_threads=threads, kernel_experts=False),
                  "moe": OnnxAsrModel(moe_dir, num_threads=threads, kernel_experts=False),
                  "moe_shared": OnnxAsrModel(os.path.join(work, "shared"), num_threads=threads,
                                            kernel_experts=False)}
        times: Dict[str, List[float]] = {name: [] for name in models}
        for _ in range(reps):
            for name, model in models.items():
                start = time.perf_counter()
                encode_utterance(model, feats, chunk)
                times[name].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    calls = max(1, len(distinct) // n_routers)
    out = {name: statistics.median(t) for name, t in times.items()}
    out.update(calls=calls, routers=n_routers, distinct=float(np.mean(distinct)),
               expert_bytes=expert_bytes,
               # beyond one expert per router and call (the copy reads that one too)
               extra_per_call=(sum(distinct) - len(distinct)) * expert_bytes / calls)
    return out


def summary(gap: Dict[str, float]) -> str:
    """'MoE/Dense-S r = dispatch d + bytes b (... MiB ... at ... GB/s)' of `split_gap`."""
    dense = gap["dense_s"]
    bytes_time = (gap["moe"] - gap["moe_shared"]) / gap["calls"]
    gbs = gap["extra_per_call"] / bytes_time / 1e9 if bytes_time > 0 else float("inf")
    return (f"MoE/Dense-S {gap['moe'] / dense:.2f} = dispatch {gap['moe_shared'] / dense:.2f} "
            f"+ bytes {(gap['moe'] - gap['moe_shared']) / dense:.2f} ({gap['extra_per_call'] / 2**20:.0f} "
            f"MiB of other chosen experts per call at {gbs:.1f} GB/s; {gap['distinct']:.2f} distinct "
            f"experts per chunk and router)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dense_dir")
    p.add_argument("moe_dir")
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    print(machine.describe())
    feats = np.random.default_rng(0).standard_normal((int(args.seconds * 100), 80)).astype(np.float32)
    gap = split_gap(args.dense_dir, args.moe_dir, feats, args.chunk, args.threads, args.reps)
    print(f"chunk {args.chunk}, {args.seconds:g} s random features, {args.threads} thread(s), "
          f"{gap['calls']} encoder calls, {gap['routers']} routers, expert "
          f"{gap['expert_bytes'] / 2**20:.1f} MiB")
    for name in ("dense_s", "moe", "moe_shared"):
        print(f"  {name:<11} {gap[name]:.4f} s  ({gap[name] / gap['dense_s']:.2f} x Dense-S)")
    print("SUMMARY " + summary(gap))


if __name__ == "__main__":
    main()
