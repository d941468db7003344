"""Routers, the SpeechMoE shared frame embedding, and the MoE auxiliary losses.

Router kinds (``moe_conf.router``):
  topk       U2++ MoE: top-k, gates = softmax over the k selected logits, no aux loss;
             with k = 1 the gate is the full-softmax probability of the chosen expert
             (as switch), since a softmax over one logit is 1 and leaves the router
             without gradient.
  switch     Switch Transformer: gates = full-softmax probability of each chosen expert
             (top-1 in the paper), balance loss ``n * sum_i s_i * P_i``.
  speechmoe  SpeechMoE: router input concat(shared embedding, layer input); gates =
             full-softmax probabilities; sparsity L1 loss on the L2-normalised router
             distribution and mean-importance loss ``n * sum_j Imp_j^2``; the embedding
             network is trained with its own CTC loss.
  omni       Omni-Router: gates as `topk` with ONE router module shared by every MoE
             layer of a stack (the encoder; both decoder directions together);
             optional balance loss.

The loss functions here take the recorded router logits of one layer and a frame
mask, so padding frames never count.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict

import torch
from torch import nn

from wenet_moe.config import ConfigError, check_keys
from wenet_moe.layers.cpu_kernel import PRECISIONS as EXPERT_PRECISIONS

ROUTERS = ("topk", "switch", "speechmoe", "omni")

# Eager dispatch: when the frames per used expert (N*k / E_used) are at most this many,
# every used expert runs on all N frames with zero gates for the frames that did not
# choose it (moe.MoEFFN._dispatch_all_frames); above it, the sorted dispatch. Chosen
# from bench/moe_layer.py measurements (docs/moe.md).
ALL_FRAMES_ROWS = 1.0

# key -> default; None means "depends on the router" (resolved in resolve_moe_conf).
MOE_CONF_DEFAULTS: Dict[str, Any] = {
    "router": "topk",
    "balance_weight": None,       # switch 0.01 (Fedus et al.), omni 0.01, others unused
    "sparsity_weight": 0.1,       # SpeechMoE alpha
    "importance_weight": 0.1,     # SpeechMoE beta
    "embed_ctc_weight": 0.01,     # SpeechMoE gamma
    "embed_dim": 64,              # SpeechMoE shared embedding size
    "embed_layers": 2,            # dense layers of the embedding network
    "capacity_factor": 0.0,       # 0 = off; > 0 drops overflow assignments in training
    "router_bias": True,          # router linear layer with a bias
    "all_frames_rows": ALL_FRAMES_ROWS,  # eager all-frames dispatch threshold (0 = never)
    "packed_experts": True,       # CPU fp32 inference: packed expert weights (moe.py)
    "expert_precision": "fp32",   # packed experts (inference): fp32 | bf16 | bf16a | int8 | w8a8
}


def resolve_moe_conf(moe_conf: Dict[str, Any]) -> Dict[str, Any]:
    """Check `moe_conf` keys/values and fill defaults; errors name `moe_conf.<key>`."""
    check_keys(moe_conf, MOE_CONF_DEFAULTS.keys(), "moe_conf")
    conf = dict(MOE_CONF_DEFAULTS)
    conf.update(moe_conf)
    if conf["router"] not in ROUTERS:
        raise ConfigError(f"moe_conf.router: unknown router '{conf['router']}' "
                          f"(choose from {', '.join(ROUTERS)})")
    if conf["balance_weight"] is None:
        conf["balance_weight"] = 0.01 if conf["router"] in ("switch", "omni") else 0.0
    for key in ("balance_weight", "sparsity_weight", "importance_weight",
                "embed_ctc_weight", "capacity_factor", "all_frames_rows"):
        value = conf[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"moe_conf.{key}: expected a number >= 0, got {value!r}")
        conf[key] = float(value)
    for key in ("embed_dim", "embed_layers"):
        value = conf[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"moe_conf.{key}: expected an integer >= 1, got {value!r}")
    if not isinstance(conf["router_bias"], bool):
        raise ConfigError(f"moe_conf.router_bias: expected true/false, got {conf['router_bias']!r}")
    if not (isinstance(conf["packed_experts"], bool) or conf["packed_experts"] in ("kernel", "onednn")):
        raise ConfigError(f"moe_conf.packed_experts: expected one of true, false, 'kernel', 'onednn', "
                          f"got {conf['packed_experts']!r}")
    if conf["expert_precision"] not in EXPERT_PRECISIONS:
        raise ConfigError(f"moe_conf.expert_precision: expected one of {', '.join(EXPERT_PRECISIONS)}, "
                          f"got {conf['expert_precision']!r}")
    if conf["expert_precision"] != "fp32" and conf["packed_experts"] is False:
        raise ConfigError(f"moe_conf.expert_precision: {conf['expert_precision']} applies to packed "
                          f"experts only, but packed_experts is false")
    return conf


class Router(nn.Module):
    """Linear router: (N, in_dim) -> logits (N, n_expert)."""

    def __init__(self, in_dim: int, n_expert: int, bias: bool = True):
        super().__init__()
        self.gate = nn.Linear(in_dim, n_expert, bias=bias)
        nn.init.normal_(self.gate.weight, std=in_dim ** -0.5)
        if bias:
            nn.init.zeros_(self.gate.bias)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return self.gate(xs)


class RouteEmbedding(nn.Module):
    """SpeechMoE shared embedding network, frame-wise (no temporal context).

    Maps the subsampled encoder input (B, T, D) to the frame embedding (B, T, E) with
    `embed_layers` dense layers (Linear + LayerNorm + ReLU). Its CTC head is
    `ctc_proj` (E -> D) followed by the model's CTC vocabulary classifier
    (`model.ctc.log_softmax`), because the vocabulary size is not known when the
    encoder is built; `moe_aux_losses` computes that CTC loss.
    """

    def __init__(self, idim: int, embed_dim: int, embed_layers: int):
        super().__init__()
        layers = []
        in_dim = idim
        for _ in range(embed_layers):
            layers += [nn.Linear(in_dim, embed_dim), nn.LayerNorm(embed_dim), nn.ReLU()]
            in_dim = embed_dim
        self.net = nn.Sequential(*layers)
        self.ctc_proj = nn.Linear(embed_dim, idim)
        self.embed_dim = embed_dim

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """xs (B, T, D) -> embedding (B, T, E)."""
        emb = self.net(xs)
        if not torch.jit.is_scripting():
            self._record(emb)
        return emb

    @torch.jit.unused
    def _record(self, emb: torch.Tensor) -> None:
        if self.training:
            LAST_EMBEDDING[self] = emb


# Module -> tensors of the last forward; weak keys, so models can be freed, and no
# module attribute, so TorchScript never sees these (eager-only introspection).

LAST_ROUTING: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
LAST_EMBEDDING: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()


def frame_mask(lengths: torch.Tensor, batch: int, time: int) -> torch.Tensor:
    """(B, T) bool mask of valid frames, or all-true if `lengths` does not fit."""
    if lengths.numel() != batch or int(lengths.max()) > time:
        return torch.ones(batch, time, dtype=torch.bool, device=lengths.device)
    steps = torch.arange(time, device=lengths.device)
    return steps.unsqueeze(0) < lengths.to(steps.device).unsqueeze(1)


def balance_loss(logits: torch.Tensor, top_idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss ``n * sum_i s_i * P_i``.

    logits (B,T,E) router logits; top_idx (B,T,k) chosen experts; mask (B,T) valid
    frames. s_i = fraction of the valid assignments sent to expert i, P_i = mean router
    probability of i over valid frames. Equals 1 for perfectly uniform routing.
    """
    n_expert = logits.size(-1)
    probs = torch.softmax(logits.float(), dim=-1)[mask]                   # (F, E)
    chosen = torch.nn.functional.one_hot(top_idx[mask], n_expert).sum(1)  # (F, E)
    frac = chosen.float().sum(0) / chosen.sum().clamp(min=1)
    mean_prob = probs.mean(0)
    return n_expert * (frac * mean_prob).sum()


def sparsity_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SpeechMoE L_s: mean over valid frames of ``|| p / ||p||_2 ||_1``."""
    probs = torch.softmax(logits.float(), dim=-1)[mask]
    unit = probs / probs.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)
    return unit.abs().sum(-1).mean()


def importance_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SpeechMoE L_m: ``n * sum_j Imp_j^2`` with Imp_j the mean probability of expert j."""
    n_expert = logits.size(-1)
    probs = torch.softmax(logits.float(), dim=-1)[mask]
    importance = probs.mean(0)
    return n_expert * (importance ** 2).sum()
