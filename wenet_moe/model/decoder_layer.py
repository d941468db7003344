"""One Transformer decoder block: self-attention, source attention, FFN."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class DecoderLayer(nn.Module):
    """Pre-norm (or post-norm) decoder block with residual connections.

    Args:
        size: model dimension D.
        self_attn: attention over the target prefix (MultiHeadedAttention).
        src_attn: attention over the encoder output.
        feed_forward: FFN slot module, called as `ffn(x, torch.zeros(0), mask_pad)` with
            mask_pad (B, 1, L_query) the valid query positions: the last row of
            `tgt_mask` (a padding & causal mask's last row marks the valid positions).
        dropout_rate: dropout on each residual branch.
        normalize_before: LayerNorm before each sub-block (True) or after.
    """

    def __init__(self, size: int, self_attn: nn.Module, src_attn: nn.Module,
                 feed_forward: nn.Module, dropout_rate: float, normalize_before: bool = True):
        super().__init__()
        self.size = size
        self.self_attn = self_attn
        self.src_attn = src_attn
        self.feed_forward = feed_forward
        self.norm1 = nn.LayerNorm(size, eps=1e-5)
        self.norm2 = nn.LayerNorm(size, eps=1e-5)
        self.norm3 = nn.LayerNorm(size, eps=1e-5)
        self.dropout = nn.Dropout(dropout_rate)
        self.normalize_before = normalize_before

    def forward(self, tgt: torch.Tensor, tgt_mask: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor, cache: torch.Tensor = torch.zeros(0, 0, 0)
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the block.

        Args:
            tgt: (B, L, D) input; tgt_mask: bool (B, L, L), True = attend.
            memory: (M, T, D) encoder output, M dividing B: the B targets are M groups
                of B / M consecutive rows, group m attending over memory row m (M = B:
                one target per row; M = 1: N hypotheses of one utterance share it, and
                its keys / values are projected once, not once per hypothesis);
                memory_mask: bool (M, 1, T).
            cache: (B, L-1, D) this block's output for the first L-1 positions
                (incremental decoding), or an empty tensor: then all L positions
                are computed. With a cache only position L-1 is computed.
        Returns:
            (out (B, L, D), tgt_mask, memory, memory_mask).
        """
        residual = tgt
        if self.normalize_before:
            tgt = self.norm1(tgt)
        if cache.size(0) == 0:
            query = tgt
            mask_pad = tgt_mask[:, -1:, :]                  # (B, 1, L)
        else:
            query = tgt[:, -1:, :]
            residual = residual[:, -1:, :]
            tgt_mask = tgt_mask[:, -1:, :]
            mask_pad = tgt_mask[:, :, -1:]                  # (B, 1, 1): the last position
        x = residual + self.dropout(self.self_attn(query, tgt, tgt, tgt_mask)[0])
        if not self.normalize_before:
            x = self.norm1(x)

        residual = x
        if self.normalize_before:
            x = self.norm2(x)
        # source attention treats each query position alone, so a group's targets
        # go side by side as one (M, B/M * L, D) query batch over their memory row
        n, length, dim = x.size(0), x.size(1), x.size(2)
        src = self.src_attn(x.reshape(memory.size(0), -1, dim), memory, memory, memory_mask)[0]
        x = residual + self.dropout(src.reshape(n, length, dim))
        if not self.normalize_before:
            x = self.norm2(x)

        residual = x
        if self.normalize_before:
            x = self.norm3(x)
        x = residual + self.dropout(self.feed_forward(x, torch.zeros(0, device=x.device), mask_pad))
        if not self.normalize_before:
            x = self.norm3(x)

        if cache.size(0) > 0:
            x = torch.cat([cache, x], dim=1)
        return x, tgt_mask, memory, memory_mask
