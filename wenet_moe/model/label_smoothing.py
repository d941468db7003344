"""Label-smoothing loss for the attention decoders."""
from __future__ import annotations

import torch
from torch import nn


class LabelSmoothingLoss(nn.Module):
    """KL divergence between the decoder distribution and smoothed one-hot targets.

    The smoothed target puts `1 - smoothing` on the reference token and
    `smoothing / (V - 1)` on every other token. Positions whose target equals
    `padding_idx` (-1 by default) are ignored.

    Args:
        size: vocabulary size V.
        padding_idx: target value of ignored positions.
        smoothing: smoothing mass (WeNet's `lsm_weight`).
        normalize_length: divide the summed loss by the number of target tokens
            (True) or by the batch size (False, WeNet's default).
    """

    def __init__(self, size: int, padding_idx: int = -1, smoothing: float = 0.0,
                 normalize_length: bool = False):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"lsm_weight must be in [0, 1), got {smoothing}")
        self.size = size
        self.padding_idx = padding_idx
        self.smoothing = smoothing
        self.confidence = 1.0 - smoothing
        self.normalize_length = normalize_length

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of logits x (B, L, V) against target ids (B, L); returns a scalar."""
        if x.size(-1) != self.size:
            raise ValueError(f"logits have {x.size(-1)} classes, expected {self.size}")
        batch_size = x.size(0)
        logits = x.reshape(-1, self.size)
        target = target.reshape(-1)
        ignore = target == self.padding_idx
        total = logits.size(0) - int(ignore.sum().item())
        safe_target = target.masked_fill(ignore, 0)
        true_dist = torch.full_like(logits, self.smoothing / max(self.size - 1, 1))
        true_dist.scatter_(1, safe_target.unsqueeze(1), self.confidence)
        logp = torch.log_softmax(logits, dim=1)
        # KL(true || model) = sum p log p - sum p log q; 0 log 0 = 0.
        plogp = torch.where(true_dist > 0, true_dist * torch.log(true_dist.clamp_min(1e-30)),
                            torch.zeros_like(true_dist))
        kl = (plogp - true_dist * logp).masked_fill(ignore.unsqueeze(1), 0.0)
        denom = total if self.normalize_length else batch_size
        return kl.sum() / max(denom, 1)
