"""MoE FFN layer benchmark: our dispatch vs dense, a loop-over-experts reference, and the floor.

For each T (frames per call, batch 1) it times, per layer call (median over repetitions,
cycling through the weights of `--layers` layers so that they do not stay in cache):
  moe    wenet_moe.layers.moe.MoEFFN (topk router, k of E experts, expert hidden H)
  dense  PositionwiseFeedForward with hidden k*H (the same active compute per frame)
  loop   a WeNet-style reference: for each expert, torch.where over the routing, gather,
         expert, scale, add back (same weights and router as `moe`; outputs checked equal)
  allfr  the same MoEFFN forced onto its unpacked all-frames path (every used expert on
         all T frames, zero gates where not chosen; `moe_conf.all_frames_rows`): `path`
         says which path `moe` itself took with its configured threshold
  gemm   only the expert kernels of `moe` (on CPU fp32 inference the small-batch C
         kernel or oneDNN on packed weights, see --packed; else MKL addmm) on pre-sorted
         contiguous rows (what any dispatch must at least pay with these kernels):
         moe/gemm = dispatch overhead
  floor  max(bytes of the weights of the experts actually chosen / memory bandwidth,
         FLOPs of the chosen experts / GEMM throughput), with bandwidth measured by a
         large tensor copy and GEMM throughput by a large square matmul on this machine.
  moe_P  with --precisions: the same layers (same fp32 parameters) with
         moe_conf.expert_precision P (bf16 / int8 packed experts), timed in the same
         interleaved loop; a second table gives their times, moe/moe_P (the speed-up
         over fp32), moe_P/dense, loop/moe_P, moe_P/floor_P (floor_P: the chosen experts'
         bytes at P) and the largest output difference from fp32 relative to max|out|
Prints the times and the ratios moe/dense, loop/moe (speed-up), moe/floor, moe/gemm,
allfr/moe, and dense/floor (the dense FFN against its own floor: how far torch's GEMM
kernels are from the machine's copy bandwidth / peak GEMM rate at this shape).

A second table (CPU, unless --ort-frames is empty) times the same layers exported to
ONNX and run by ONNX Runtime (1 intra-op thread): the scripted MoEFFN (sorted dispatch
with tensor slice bounds), an all-frames graph (one batched MatMul over all experts,
gate-weighted), the dense FFN, and the loop reference (scripted).

    python bench/moe_layer.py [--device cpu|cuda] [--threads N] [--reps 30]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine as host  # noqa: E402
from wenet_moe.layers import cpu_kernel
from wenet_moe.layers.ffn import PositionwiseFeedForward
from wenet_moe.layers import moe as moe_module
from wenet_moe.layers.moe import MoEFactory, MoEFFN


class LoopMoE(nn.Module):
    """Reference MoE dispatch: Python loop over experts with torch.where per expert."""

    def __init__(self, moe: MoEFFN):
        super().__init__()
        self.moe = moe
        self.experts = nn.ModuleList()
        for e in range(moe.n_expert):
            ffn = PositionwiseFeedForward(moe.idim, moe.hidden_units, 0.0, nn.SiLU())
            with torch.no_grad():
                ffn.w_1.weight.copy_(moe.w1[e].t())
                ffn.w_1.bias.copy_(moe.b1[e])
                ffn.w_2.weight.copy_(moe.w2[e].t())
                ffn.w_2.bias.copy_(moe.b2[e])
            self.experts.append(ffn)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        batch, time_, dim = xs.shape
        x = xs.reshape(-1, dim)
        logits = self.moe.router(x)
        top_logits, selected = torch.topk(logits, self.moe.n_expert_activated, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        out = torch.zeros_like(x)
        empty = torch.zeros(0)
        for e, expert in enumerate(self.experts):
            token_ids, slot = torch.where(selected == e)
            out[token_ids] += weights[token_ids, slot, None] * expert(x[token_ids], empty)
        return out.view(batch, time_, dim)


class AllFramesGraph(nn.Module):
    """For the ONNX table: MoEFFN's math as one all-frames graph (every expert on all
    frames through one batched MatMul, hidden rows scaled by a dense (T, E) gate matrix
    that is zero where an expert was not chosen, then one (T, E*H) @ (E*H, D) MatMul)."""

    def __init__(self, moe: MoEFFN):
        super().__init__()
        self.moe = moe

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        x = xs.reshape(-1, xs.size(-1))
        n_tok = x.size(0)
        _, top_idx, gates = self.moe.route(x, torch.zeros(0))
        dense_gates = torch.zeros(n_tok, self.moe.n_expert, dtype=x.dtype).scatter(1, top_idx, gates)
        h = torch.matmul(x.unsqueeze(0), self.moe.w1) + self.moe.b1.unsqueeze(1)    # (E,T,H)
        h = self.moe.activation(h) * dense_gates.t().unsqueeze(-1)
        y = torch.matmul(h.transpose(0, 1).reshape(n_tok, -1),
                         self.moe.w2.reshape(-1, self.moe.w2.size(-1)))
        return (y + dense_gates @ self.moe.b2).view(xs.shape)


class WithoutRouteEmb(nn.Module):
    """Adapter (xs) -> layer(xs, empty) so every ONNX graph has the one input `xs`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return self.layer(xs, torch.zeros(0))


def ort_table(moes, loops, denses, frames_list, reps, dim) -> None:
    """Time the layers exported to ONNX (scripted, TorchScript-based exporter) in ONNX
    Runtime with one thread; outputs are checked against PyTorch first."""
    import io
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not importable: no ONNX Runtime table")
        return
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1

    def session(module: nn.Module):
        buf = io.BytesIO()
        example = torch.randn(1, 3, dim)
        torch.onnx.export(torch.jit.script(module), (example,), buf, dynamo=False,
                          opset_version=17, input_names=["xs"], output_names=["ys"],
                          dynamic_axes={"xs": {1: "T"}})
        return ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphs = {"moe": [session(WithoutRouteEmb(m)) for m in moes],
                  "allfr": [session(AllFramesGraph(m)) for m in moes],
                  "dense": [session(WithoutRouteEmb(d)) for d in denses],
                  "loop": [session(loop) for loop in loops]}
    print(f"\nONNX Runtime {ort.__version__}, 1 thread, same layers exported (scripted); "
          f"medians of {reps} interleaved repetitions, times per layer call")
    header = (f"{'T':>5} {'moe ms':>8} {'allfr ms':>8} {'dense ms':>8} {'loop ms':>8} "
              f"{'moe/dense':>9} {'loop/moe':>8} {'allfr/moe':>9}")
    print(header)
    print("-" * len(header))
    for frames in frames_list:
        inputs = [torch.randn(1, frames, dim) for _ in moes]
        feeds = [{"xs": x.numpy()} for x in inputs]
        with torch.inference_mode():
            for name, sessions in graphs.items():
                for i, sess in enumerate(sessions[:len(inputs)]):
                    x = inputs[i]
                    want = (denses[i] if name == "dense" else moes[i])(x, torch.zeros(0))
                    diff = float(abs(sess.run(None, feeds[i])[0] - want.numpy()).max())
                    if diff > 1e-4:
                        raise SystemExit(f"ONNX {name} T={frames}: differs from PyTorch by {diff:.2e}")
        samples = {name: [] for name in graphs}
        for rep in range(reps):
            for name in rotated(list(graphs), rep):
                sessions = graphs[name]
                start = time.perf_counter()
                for i, sess in enumerate(sessions):
                    sess.run(None, feeds[i % len(feeds)])
                samples[name].append((time.perf_counter() - start) / len(sessions))
        t = {name: statistics.median(v) for name, v in samples.items()}
        print(f"{frames:>5} {t['moe'] * 1e3:>8.3f} {t['allfr'] * 1e3:>8.3f} "
              f"{t['dense'] * 1e3:>8.3f} {t['loop'] * 1e3:>8.3f} {t['moe'] / t['dense']:>9.2f} "
              f"{t['loop'] / t['moe']:>8.2f} {t['allfr'] / t['moe']:>9.2f}", flush=True)


def rotated(names, rep: int):
    """names in the order of repetition `rep`: rotated by one place per repetition."""
    shift = rep % len(names)
    return names[shift:] + names[:shift]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class MachineFloor:
    """Probes of this machine, timed in the same interleaved loop as the layers, so that
    the floor sees the same load: a 256 MiB copy (bytes read + written per second) and
    a large square fp32 matmul (FLOP/s)."""

    def __init__(self, device: torch.device):
        self.src = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device=device).uniform_()
        self.dst = torch.empty_like(self.src)
        n = 1024 if device.type == "cpu" else 8192
        self.a = torch.randn(n, n, device=device)
        self.b = torch.randn(n, n, device=device)
        self.c = torch.empty(n, n, device=device)
        self.copy_bytes = 2.0 * self.src.numel() * self.src.element_size()
        self.gemm_flops = 2.0 * n ** 3

    def copy(self) -> None:
        self.dst.copy_(self.src)

    def gemm(self) -> None:
        torch.mm(self.a, self.b, out=self.c)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = keep default)")
    parser.add_argument("--reps", type=int, default=30, help="repetitions per measurement")
    parser.add_argument("--layers", type=int, default=0,
                        help="distinct MoE layers cycled through (0: enough that their experts "
                             "hold >= 3x the L3 cache, at least 12; dense layers are cycled the "
                             "same way), so weights come from memory as in a real 12-layer model")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden units of one expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--all-frames-rows", type=float, default=None,
                        help="moe_conf.all_frames_rows of `moe` (default: the module default)")
    parser.add_argument("--packed", default="auto", choices=["auto", "kernel", "onednn", "off"],
                        help="moe_conf.packed_experts: auto (true: the C kernel, else oneDNN), "
                             "kernel, onednn, or off (MKL addmm experts, as in training)")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=list(cpu_kernel.PRECISIONS),
                        help="expert precisions timed (moe_conf.expert_precision); fp32 is always "
                             "the baseline `moe`, the others get the second table")
    parser.add_argument("--accelerator-dispatch", default="auto", choices=list(moe_module.ACCELERATOR_PATHS),
                        help="MoE dispatch off the CPU (wenet_moe.layers.moe.ACCELERATOR_DISPATCH)")
    parser.add_argument("--ort-frames", type=int, nargs="*", default=[16],
                        help="T values of the ONNX Runtime table (CPU only; none = skip)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    moe_module.ACCELERATOR_DISPATCH = args.accelerator_dispatch
    torch.manual_seed(0)

    moe_conf = {"router": "topk"}
    if args.all_frames_rows is not None:
        moe_conf["all_frames_rows"] = args.all_frames_rows
    moe_conf["packed_experts"] = {"auto": True, "off": False}.get(args.packed, args.packed)
    factory = MoEFactory(args.dim, args.hidden, 0.0, "swish", args.experts, args.topk,
                         moe_conf, False)
    expert_bytes = (2 * args.dim * args.hidden + args.hidden + args.dim) * 4
    dense_bytes = (2 * args.dim * args.topk * args.hidden + args.topk * args.hidden + args.dim) * 4
    l3 = host.l3_bytes()
    n_dense = args.layers
    extra = [p for p in dict.fromkeys(args.precisions) if p != "fp32"]
    # bytes of one expert's weights per precision (biases and int8 scales stay fp32)
    weight_bytes = {"fp32": 4, "bf16": 2, "bf16a": 2, "int8": 1, "w8a8": 1}
    aux_bytes = {"fp32": 4, "bf16": 4, "bf16a": 4, "int8": 8, "w8a8": 12}   # bias, scale, column sum
    expert_bytes_of = {p: 2 * args.dim * args.hidden * weight_bytes[p]
                       + (args.hidden + args.dim) * aux_bytes[p] for p in ["fp32"] + extra}
    smallest = min(expert_bytes_of.values())
    if args.layers <= 0:   # cycle >= 3x L3 (at the smallest precision), so no weights stay in cache
        args.layers = max(12, -(-3 * l3 // (args.experts * smallest)))
        n_dense = max(12, -(-3 * l3 // dense_bytes))
    moes = [factory().to(device).eval() for _ in range(args.layers)]
    # shallow copies: the same parameters, their own packed experts (kept per module)
    moes_at = {p: [copy.copy(m) for m in moes] for p in extra}
    for p, layers in moes_at.items():
        for m in layers:
            m.expert_precision = p
    loops = [LoopMoE(m).to(device).eval() for m in moes]
    denses = [PositionwiseFeedForward(args.dim, args.topk * args.hidden, 0.0, nn.SiLU())
              .to(device).eval() for _ in range(n_dense)]
    empty = torch.zeros(0, device=device)
    with torch.inference_mode():
        inputs_probe = torch.zeros(1, args.dim, device=device)
        packed = moes[0]._packed(inputs_probe)
    machine = MachineFloor(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(host.describe())
    print(f"device {args.device}, threads {torch.get_num_threads()}, {os.cpu_count()} cpus, "
          f"load average {load:.1f} at start; layers cycled {args.layers} MoE "
          f"({args.layers * args.experts * expert_bytes / 2**20:.0f} MiB of experts), {n_dense} dense "
          f"({n_dense * dense_bytes / 2**20:.0f} MiB), L3 {l3 / 2**20:.0f} MiB; "
          f"medians of {args.reps} interleaved repetitions, times per layer call; "
          f"all_frames_rows {moes[0].all_frames_rows:g}; packed experts: {args.packed} "
          f"(`path` says which kernels each T used)"
          + (f"; expert precisions {', '.join(extra)} (second table)" if extra else ""))
    if args.device == "cpu" and args.packed == "auto" and packed is not None:
        limits = {p: moe_module.kernel_max_rows(args.dim, args.hidden, moes[0]._kernel_activation, p)
                  for p in ["fp32"] + extra}
        print("first-use probe (`kernel_max_rows`): the C kernel up to "
              + ", ".join(f"{v:g} ({p})" for p, v in limits.items())
              + " rows per expert, oneDNN above")
    header = (f"{'T':>5} {'path':>10} {'moe ms':>8} {'allfr ms':>8} {'dense ms':>8} "
              f"{'loop ms':>8} {'gemm ms':>8} {'floor ms':>8} {'GB/s':>6} {'GFLOP/s':>7} "
              f"{'moe/dense':>9} {'loop/moe':>8} {'moe/floor':>9} {'moe/gemm':>8} "
              f"{'allfr/moe':>9} {'dense/floor':>11}")
    print(header)
    print("-" * len(header))
    precision_rows = []
    with torch.inference_mode():
        for frames in args.frames:
            inputs = [torch.randn(1, frames, args.dim, device=device) for _ in range(args.layers)]
            used, sorted_rows = [], []
            for moe, loop, x in zip(moes, loops, inputs):
                diff = (moe(x, empty) - loop(x)).abs().max().item()
                if diff > 1e-4:
                    raise SystemExit(f"T={frames}: MoE and loop reference differ by {diff:.2e}")
                flat = x.reshape(-1, args.dim)
                _, top_idx, _ = moe.route(flat, empty)
                used.append(int(torch.unique(top_idx).numel()))
                order = torch.argsort(top_idx.reshape(-1), stable=True)
                rows = flat.index_select(0, order // args.topk)
                counts = torch.bincount(top_idx.reshape(-1), minlength=args.experts)
                sorted_rows.append((rows, [0] + counts.cumsum(0).tolist(), counts.tolist()))
            all_frames = sum(frames * args.topk <= moe.all_frames_rows * n
                             for moe, n in zip(moes, used))
            if packed is not None:
                kinds = {moe._packed(rows, rows.size(0) / n)[0]
                         for moe, (rows, _, _), n in zip(moes, sorted_rows, used)}
            path = ("+".join(sorted(kinds)) if packed is not None else "all-frames" if all_frames == len(moes)
                    else "sorted" if all_frames == 0 else f"mixed{all_frames}/{len(moes)}")

            def gemm_only():   # the expert kernels `moe` runs (packed where it packs)
                for moe, (rows, bounds, counts), n_used in zip(moes, sorted_rows, used):
                    packs = moe._packed(rows, rows.size(0) / n_used)
                    if packs is not None and packs[0] == "kernel":
                        moe._kernel_experts(packs[1], rows, counts, torch.empty_like(rows))
                        continue
                    for e in range(args.experts):
                        if bounds[e + 1] > bounds[e]:
                            piece = rows[bounds[e]:bounds[e + 1]]
                            if packs is None:
                                moe.expert(e, piece)
                            else:
                                moe._packed_expert(packs[1][e], piece)

            def run(layers, call):
                def go():
                    for i, layer in enumerate(layers):
                        call(layer, inputs[i % len(inputs)])
                return go

            def forced_all_frames(m, x):
                threshold, m.all_frames_rows = m.all_frames_rows, float("inf")
                packed, m.packed_experts = m.packed_experts, False
                try:
                    return m(x, empty)
                finally:
                    m.all_frames_rows, m.packed_experts = threshold, packed

            timed = {"moe": run(moes, lambda m, x: m(x, empty)),
                     "allfr": run(moes, forced_all_frames),
                     "dense": run(denses, lambda m, x: m(x, empty)),
                     "loop": run(loops, lambda m, x: m(x)),
                     "gemm": gemm_only, "copy": machine.copy, "peak": machine.gemm}
            errors = {}
            for p, layers in moes_at.items():
                timed[f"moe_{p}"] = run(layers, lambda m, x: m(x, empty))
                errors[p] = max(((m(x, empty) - m32(x, empty)).abs().max() / m32(x, empty).abs().max()).item()
                                for m, m32, x in zip(layers, moes, inputs))
            per_call = {"copy": 1, "peak": 1}
            samples = {name: [] for name in timed}
            for fn in timed.values():
                fn()
            names = list(timed)
            for rep in range(args.reps):   # interleaved, so load changes hit all alike,
                for name in rotated(names, rep):   # in a rotating order (no position bias)
                    fn = timed[name]
                    sync(device)
                    start = time.perf_counter()
                    fn()
                    sync(device)
                    samples[name].append((time.perf_counter() - start)
                                         / per_call.get(name, n_dense if name == "dense" else args.layers))
            t = {name: statistics.median(v) for name, v in samples.items()}
            bandwidth = machine.copy_bytes / t["copy"]
            throughput = machine.gemm_flops / t["peak"]
            flops = 2.0 * frames * args.topk * 2 * args.dim * args.hidden
            floor = statistics.mean(max(n * expert_bytes / bandwidth, flops / throughput)
                                    for n in used)
            dense_floor = max(dense_bytes / bandwidth, flops / throughput)
            print(f"{frames:>5} {path:>10} {t['moe'] * 1e3:>8.3f} {t['allfr'] * 1e3:>8.3f} "
                  f"{t['dense'] * 1e3:>8.3f} {t['loop'] * 1e3:>8.3f} {t['gemm'] * 1e3:>8.3f} "
                  f"{floor * 1e3:>8.3f} {bandwidth / 1e9:>6.1f} {throughput / 1e9:>7.1f} "
                  f"{t['moe'] / t['dense']:>9.2f} {t['loop'] / t['moe']:>8.2f} "
                  f"{t['moe'] / floor:>9.2f} {t['moe'] / t['gemm']:>8.2f} "
                  f"{t['allfr'] / t['moe']:>9.2f} {t['dense'] / dense_floor:>11.2f}", flush=True)
            for p in extra:
                floor_p = statistics.mean(max(n * expert_bytes_of[p] / bandwidth, flops / throughput)
                                          for n in used)
                precision_rows.append((frames, p, t[f"moe_{p}"], t["moe"], t["dense"], t["loop"], floor_p,
                                       errors[p]))
                print(f"{'':>5} {p:>10} {t[f'moe_{p}'] * 1e3:>8.3f} ms: moe/moe_P {t['moe'] / t[f'moe_{p}']:.2f}, "
                      f"moe_P/dense {t[f'moe_{p}'] / t['dense']:.2f}, loop/moe_P {t['loop'] / t[f'moe_{p}']:.2f}, "
                      f"moe_P/floor_P {t[f'moe_{p}'] / floor_p:.2f}, rel err {errors[p]:.1e}", flush=True)
        if precision_rows:
            print("\nexpert precision (same run, same interleaved repetitions; moe = fp32 above; "
                  "floor_P with the experts' bytes at P; rel err = max |out_P - out_fp32| / max |out_fp32|)")
            header = (f"{'T':>5} {'prec':>5} {'moe_P ms':>8} {'moe ms':>8} {'moe/moe_P':>9} "
                      f"{'moe_P/dense':>11} {'loop/moe_P':>10} {'moe_P/floor_P':>13} {'rel err':>8}")
            print(header)
            print("-" * len(header))
            for frames, p, t_p, t_moe, t_dense, t_loop, floor_p, err in precision_rows:
                print(f"{frames:>5} {p:>5} {t_p * 1e3:>8.3f} {t_moe * 1e3:>8.3f} {t_moe / t_p:>9.2f} "
                      f"{t_p / t_dense:>11.2f} {t_loop / t_p:>10.2f} {t_p / floor_p:>13.2f} {err:>8.1e}")
        if args.device == "cpu" and args.ort_frames:
            ort_table(moes, loops, denses, args.ort_frames, args.reps, args.dim)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f} at end (other processes share this machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
