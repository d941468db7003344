#!/usr/bin/env python3
"""Print the upcycling evidence table of local/upcycle_experiment.sh (Markdown).

    upcycle_table.py --exp EXP --n1 3 --n2 3 [--modes MODE ...]

Rows: (a) dense N1 epochs then upcycled MoE N2 epochs (from the dense average; (a')
from its last epoch checkpoint, when EXP/a2_upcycled_<N2>ep exists; (a'') from (c)'s
checkpoint after N1 epochs, continuing its learning rate, when EXP/a3_upcycled_<N2>ep exists), (b) MoE from scratch N1+N2
epochs, (c) dense N1+N2 epochs. Columns: dev CER (%) after each epoch (1-based,
counted over the whole budget) and of the final averaged model. Per-epoch CERs come
from EXP/decode_<model dir>/ep<K>/<mode>/wer, the averaged models' from
<model dir>/decode_dev_full/<mode>/wer; a missing one prints as "-".
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Tuple

from cer_table import read_cer  # local/, beside this script


def fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def row_cers(exp: str, phases: List[Tuple[str, int]], final_dir: str, mode: str) -> List[Optional[float]]:
    """CERs of the epochs of `phases` ((model dir name, epochs) in training order)
    followed by the averaged model of `final_dir`."""
    cers = []
    for name, epochs in phases:
        for k in range(epochs):
            cers.append(read_cer(os.path.join(exp, f"decode_{name}", f"ep{k}", mode, "wer")))
    cers.append(read_cer(os.path.join(exp, final_dir, "decode_dev_full", mode, "wer")))
    return cers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exp", required=True)
    p.add_argument("--n1", type=int, required=True, help="dense epochs before upcycling")
    p.add_argument("--n2", type=int, required=True, help="upcycled MoE epochs")
    p.add_argument("--modes", nargs="+", default=["attention_rescoring", "ctc_greedy_search"])
    a = p.parse_args()
    n1, n2, total = a.n1, a.n2, a.n1 + a.n2
    rows = [
        (f"(a) dense {n1} ep + upcycled MoE {n2} ep",
         [(f"a_dense_{n1}ep", n1), (f"a_upcycled_{n2}ep", n2)], f"a_upcycled_{n2}ep"),
        (f"(a') as (a), upcycling the last dense checkpoint",
         [(f"a_dense_{n1}ep", n1), (f"a2_upcycled_{n2}ep", n2)], f"a2_upcycled_{n2}ep"),
        (f"(a'') dense {n1} of {total} ep, upcycled, MoE {n2} ep continuing the dense learning rate",
         [(f"c_dense_{total}ep", n1), (f"a3_upcycled_{n2}ep", n2)], f"a3_upcycled_{n2}ep"),
        (f"(b) MoE from scratch {total} ep", [(f"b_moe_{total}ep", total)], f"b_moe_{total}ep"),
        (f"(c) dense {total} ep", [(f"c_dense_{total}ep", total)], f"c_dense_{total}ep"),
    ]
    order = {"attention_rescoring": 0, "ctc_greedy_search": 1}
    for mode in sorted(a.modes, key=lambda m: order.get(m, 2)):
        print(f"Dev CER (%), {mode}, full context; epoch k = checkpoint after k epochs; "
              f"final = average of the last 3 epoch checkpoints:\n")
        head = [f"ep {k}" for k in range(1, total + 1)] + ["final (avg 3)"]
        print("| run | " + " | ".join(head) + " |")
        print("|---|" + "---|" * len(head))
        for label, phases, final_dir in rows:
            if label.startswith("(a'") and not os.path.isdir(os.path.join(a.exp, final_dir)):
                continue  # the optional train_a2 step was not run
            print(f"| {label} | " + " | ".join(fmt(c) for c in row_cers(a.exp, phases, final_dir, mode)) + " |")
        print()
    # the starting point of (a)'s MoE phase: the averaged dense model it was upcycled from
    for mode in sorted(a.modes, key=lambda m: order.get(m, 2)):
        c = read_cer(os.path.join(a.exp, f"a_dense_{n1}ep", "decode_dev_full", mode, "wer"))
        print(f"(a)'s upcycling start, dense {n1} ep averaged (avg 3), {mode}: {fmt(c)}")


if __name__ == "__main__":
    main()
