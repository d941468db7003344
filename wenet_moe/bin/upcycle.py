"""`wenet-moe upcycle`: a dense checkpoint -> an MoE checkpoint (sparse upcycling).

    wenet-moe upcycle --config exp/dense/train.yaml --checkpoint exp/dense/avg_10.pt \\
        --output_dir exp/upcycled --n_expert 8 --n_expert_activated 2 --router topk \\
        [--noise 0.0] [--router_init random|zero] [--scale_experts] [--seed 0]

Every FFN of the encoder and decoders becomes an MoE FFN whose experts are copies of
the dense FFN; OUT receives `train.yaml` (the MoE config), `final.pt`, `units.txt`
and the CMVN file. With topk/omni routers (and no noise) the upcycled model computes
what the dense one does; with switch/speechmoe every FFN output is scaled by the sum
of the chosen router probabilities (k/E with --router_init zero; --scale_experts
compensates that). Details: wenet_moe/interop/upcycle.py. The recipe's
`--upcycle_from OUT` trains from it.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="train.yaml of the dense model")
    parser.add_argument("--checkpoint", required=True, help="dense checkpoint (ours or imported)")
    parser.add_argument("--output_dir", required=True, help="new (or empty) output directory")
    parser.add_argument("--n_expert", type=int, default=8, help="experts per MoE FFN")
    parser.add_argument("--n_expert_activated", type=int, default=2, help="experts per frame (k)")
    parser.add_argument("--router", default="topk", choices=["topk", "switch", "speechmoe", "omni"],
                        help="router kind (moe_conf.router)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="relative noise added to each expert copy (x std of the tensor)")
    parser.add_argument("--router_init", default="random", choices=["random", "zero"],
                        help="routers: the model's random initialisation, or zeros")
    parser.add_argument("--scale_experts", action="store_true",
                        help="multiply expert output layers by n_expert/n_expert_activated "
                             "(switch/speechmoe with --router_init zero then equal the dense model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of router init and noise")


def main(args: argparse.Namespace) -> int:
    from wenet_moe.interop.upcycle import upcycle

    report = upcycle(args.config, args.checkpoint, args.output_dir, args.n_expert,
                     args.n_expert_activated, args.router, args.noise, args.seed,
                     args.router_init, args.scale_experts)
    print(f"wenet-moe upcycle: wrote {args.output_dir} ({report['parameters']} parameters, "
          f"{len(report['new_parameters'])} new tensors: routers"
          f"{' and the SpeechMoE embedding' if args.router == 'speechmoe' else ''})",
          file=sys.stderr)
    return 0
