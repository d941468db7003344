"""Sinusoidal positional encodings (abs_pos, rel_pos, no_pos).

Encodings are computed on the fly from the positions `offset ... offset+size-1`
(sin on even, cos on odd dims: pe[p, 2i] = sin(p / 10000^(2i/D)),
pe[p, 2i+1] = cos(p / 10000^(2i/D))), so there is no maximum length and a streaming
chunk at `offset` gets bit-identical encodings to the same frames of a whole
utterance.

Every class: `forward(x (B, T, D), offset: int = 0) -> (x', pos_emb (1, T, D))` and
`position_encoding(offset: int, size: int) -> (1, size, D)`.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn


class PositionalEncoding(nn.Module):
    """Absolute encoding added to the input: x' = dropout(x * sqrt(D) + pe).

    Args:
        d_model: model dimension D (even).
        dropout_rate: dropout on x' (and on the returned pos_emb).
    """

    def __init__(self, d_model: int, dropout_rate: float):
        super().__init__()
        if d_model % 2 != 0:
            raise ValueError(f"positional encoding needs an even dimension, got {d_model}")
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.dropout = nn.Dropout(p=dropout_rate)
        # zero-size buffer that only tracks the module's device; the frequencies are
        # computed in float32 on every call, so `model.half()` cannot degrade them
        self.register_buffer("device_anchor", torch.zeros(0), persistent=False)

    def sinusoid(self, offset: int, size: int) -> torch.Tensor:
        """Raw float32 encodings of positions offset .. offset+size-1: (1, size, D)."""
        device = self.device_anchor.device
        inv_freq = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32, device=device)
                             * -(math.log(10000.0) / self.d_model))
        pos = torch.arange(size, dtype=torch.float32, device=device) + offset
        angle = pos.unsqueeze(1) * inv_freq.unsqueeze(0)  # (size, D/2)
        pe = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1)
        return pe.view(1, size, self.d_model)

    @torch.jit.export
    def position_encoding(self, offset: int, size: int) -> torch.Tensor:
        """Encodings for `size` positions from `offset`, with dropout: (1, size, D)."""
        return self.dropout(self.sinusoid(offset, size))

    def forward(self, x: torch.Tensor, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (dropout(x * sqrt(D) + pe), pos_emb (1, T, D))."""
        pe = self.sinusoid(offset, x.size(1)).to(x.dtype)
        return self.dropout(x * self.xscale + pe), self.dropout(pe)


class RelPositionalEncoding(PositionalEncoding):
    """Encoding for relative-position attention: x is only scaled, the encodings
    are returned separately for the attention's positional term.

    forward: x (B, T, D) -> (dropout(x * sqrt(D)), dropout(pe) (1, T, D)).
    """

    def forward(self, x: torch.Tensor, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        pe = self.sinusoid(offset, x.size(1)).to(x.dtype)
        return self.dropout(x * self.xscale), self.dropout(pe)


class NoPositionalEncoding(nn.Module):
    """No positional information: x' = dropout(x), pos_emb = zeros (1, T, D)."""

    def __init__(self, d_model: int, dropout_rate: float):
        super().__init__()
        self.d_model = d_model
        self.dropout = nn.Dropout(p=dropout_rate)
        self.register_buffer("device_anchor", torch.zeros(0), persistent=False)

    @torch.jit.export
    def position_encoding(self, offset: int, size: int) -> torch.Tensor:
        """Zeros (1, size, D)."""
        return torch.zeros(1, size, self.d_model, device=self.device_anchor.device)

    def forward(self, x: torch.Tensor, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.dropout(x), torch.zeros(1, x.size(1), self.d_model,
                                            dtype=x.dtype, device=x.device)
