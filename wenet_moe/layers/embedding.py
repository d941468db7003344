"""Sinusoidal positional encodings (abs_pos, rel_pos, no_pos).

Encodings are computed on the fly from the positions `offset ... offset+size-1`
(sin on even, cos on odd dims: pe[p, 2i] = sin(p / 10000^(2i/D)),
pe[p, 2i+1] = cos(p / 10000^(2i/D))), so there is no maximum length and a streaming
chunk at `offset` gets bit-identical encodings to the same frames of a whole
utterance.

Every class: `forward(x (B, T, D), offset: int = 0) -> (x', pos_emb (1, T, D))`,
`position_encoding(offset: int, size: int) -> (1, size, D)`, and for a batch of
streams at different positions (cross-stream batching) `forward_offsets(x (B, T, D),
offsets (B,) int64) -> x'` and `position_encoding_offsets(starts (B,) int64, size)
-> (B, size, D)`, row b equal to the single-stream encodings from `starts[b]`.
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

    def sinusoid_offsets(self, starts: torch.Tensor, size: int) -> torch.Tensor:
        """Raw float32 encodings of positions starts[b] .. starts[b]+size-1 of each
        stream b: (B, size, D) (the same float32 arithmetic as `sinusoid`)."""
        device = self.device_anchor.device
        inv_freq = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32, device=device)
                             * -(math.log(10000.0) / self.d_model))
        pos = torch.arange(size, dtype=torch.float32, device=device).unsqueeze(0) \
            + starts.to(device=device, dtype=torch.float32).unsqueeze(1)  # (B, size)
        angle = pos.unsqueeze(2) * inv_freq.view(1, 1, -1)  # (B, size, D/2)
        pe = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1)
        return pe.view(starts.size(0), size, self.d_model)

    @torch.jit.export
    def position_encoding(self, offset: int, size: int) -> torch.Tensor:
        """Encodings for `size` positions from `offset`, with dropout: (1, size, D)."""
        return self.dropout(self.sinusoid(offset, size))

    @torch.jit.export
    def position_encoding_offsets(self, starts: torch.Tensor, size: int) -> torch.Tensor:
        """Encodings for `size` positions from each stream's `starts[b]`: (B, size, D)."""
        return self.dropout(self.sinusoid_offsets(starts, size))

    def forward(self, x: torch.Tensor, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (dropout(x * sqrt(D) + pe), pos_emb (1, T, D))."""
        pe = self.sinusoid(offset, x.size(1)).to(x.dtype)
        return self.dropout(x * self.xscale + pe), self.dropout(pe)

    @torch.jit.export
    def forward_offsets(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), offsets (B,) -> dropout(x * sqrt(D) + pe of each stream's positions)."""
        pe = self.sinusoid_offsets(offsets, x.size(1)).to(x.dtype)
        return self.dropout(x * self.xscale + pe)


class RelPositionalEncoding(PositionalEncoding):
    """Encoding for relative-position attention: x is only scaled, the encodings
    are returned separately for the attention's positional term.

    forward: x (B, T, D) -> (dropout(x * sqrt(D)), dropout(pe) (1, T, D)).
    """

    def forward(self, x: torch.Tensor, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        pe = self.sinusoid(offset, x.size(1)).to(x.dtype)
        return self.dropout(x * self.xscale), self.dropout(pe)

    @torch.jit.export
    def forward_offsets(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> dropout(x * sqrt(D)) (positions enter the attention)."""
        return self.dropout(x * self.xscale)


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

    @torch.jit.export
    def position_encoding_offsets(self, starts: torch.Tensor, size: int) -> torch.Tensor:
        """Zeros (B, size, D)."""
        return torch.zeros(starts.size(0), size, self.d_model, device=self.device_anchor.device)

    @torch.jit.export
    def forward_offsets(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.dropout(x)

    def forward(self, x: torch.Tensor, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.dropout(x), torch.zeros(1, x.size(1), self.d_model,
                                            dtype=x.dtype, device=x.device)
