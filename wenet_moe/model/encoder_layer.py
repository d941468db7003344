"""Encoder blocks: Transformer and Conformer (macaron FFN pair, conv module).

Both blocks share one signature (so one encoder drives either):

    forward(x (B, T, D), mask bool (B, T|1, T_cache+T) attention mask,
            pos_emb (1, T_cache+T, D), mask_pad bool (B, 1, T) padding mask for the
            convolution (or (0, 0, 0)), route_emb (B, T, E) or empty (the SpeechMoE
            frame embedding handed to every FFN), att_cache (B, H, T_cache, 2*d_k) or
            (0, 0, 0, 0), cnn_cache (B, D, kernel-1) or (0, 0, 0),
            cnn_cache_at_valid_end: bool = False (a batch of right-padded streaming
            chunks: each row's new conv cache ends at its last valid frame of mask_pad))
        -> (x (B, T, D), mask, new_att_cache (B, H, T_cache+T, 2*d_k),
            new_cnn_cache (B, D, kernel-1); (B, D, 0) without a causal convolution)

Every FFN is called as `ffn(x, route_emb, mask_pad)` (the FFN slot of
wenet_moe.layers.ffn).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


def _empty_cnn_cache(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((x.size(0), x.size(2), 0), dtype=x.dtype, device=x.device)


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN, each with a residual connection and a LayerNorm
    (before the sub-block if `normalize_before`, after it otherwise).

    Args:
        size: model dimension D.
        self_attn: attention module (attention.py).
        feed_forward: FFN module (the FFN slot).
        dropout_rate: dropout on each sub-block's output.
        normalize_before: pre-norm (True) or post-norm.
    """

    def __init__(self, size: int, self_attn: nn.Module, feed_forward: nn.Module,
                 dropout_rate: float, normalize_before: bool = True):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.norm1 = nn.LayerNorm(size, eps=1e-5)
        self.norm2 = nn.LayerNorm(size, eps=1e-5)
        self.dropout = nn.Dropout(dropout_rate)
        self.size = size
        self.normalize_before = normalize_before

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor,
                mask_pad: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool),
                route_emb: torch.Tensor = torch.zeros(0),
                att_cache: torch.Tensor = torch.zeros((0, 0, 0, 0)),
                cnn_cache: torch.Tensor = torch.zeros((0, 0, 0)),
                cnn_cache_at_valid_end: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        residual = x
        if self.normalize_before:
            x = self.norm1(x)
        x_att, new_att_cache = self.self_attn(x, x, x, mask, pos_emb, att_cache)
        x = residual + self.dropout(x_att)
        if not self.normalize_before:
            x = self.norm1(x)
        residual = x
        if self.normalize_before:
            x = self.norm2(x)
        x = residual + self.dropout(self.feed_forward(x, route_emb, mask_pad))
        if not self.normalize_before:
            x = self.norm2(x)
        return x, mask, new_att_cache, _empty_cnn_cache(x)


class ConformerEncoderLayer(nn.Module):
    """Conformer block: [0.5 * macaron FFN] -> self-attention -> [convolution] ->
    FFN (x 0.5 with macaron) -> final LayerNorm (when the conv module is used).

    Args:
        size: model dimension D.
        self_attn: attention module.
        feed_forward: FFN module.
        feed_forward_macaron: the first FFN of the macaron pair, or None.
        conv_module: ConvolutionModule or None.
        dropout_rate: dropout on each sub-block's output.
        normalize_before: pre-norm (True) or post-norm.
    """

    def __init__(self, size: int, self_attn: nn.Module, feed_forward: nn.Module,
                 feed_forward_macaron: Optional[nn.Module], conv_module: Optional[nn.Module],
                 dropout_rate: float, normalize_before: bool = True):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.feed_forward_macaron = feed_forward_macaron
        self.conv_module = conv_module
        self.norm_ff = nn.LayerNorm(size, eps=1e-5)
        self.norm_mha = nn.LayerNorm(size, eps=1e-5)
        if feed_forward_macaron is not None:
            self.norm_ff_macaron = nn.LayerNorm(size, eps=1e-5)
            self.ff_scale = 0.5
        else:
            self.norm_ff_macaron = None
            self.ff_scale = 1.0
        if conv_module is not None:
            self.norm_conv = nn.LayerNorm(size, eps=1e-5)
            self.norm_final = nn.LayerNorm(size, eps=1e-5)
        else:
            self.norm_conv = None
            self.norm_final = None
        self.dropout = nn.Dropout(dropout_rate)
        self.size = size
        self.normalize_before = normalize_before

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor,
                mask_pad: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool),
                route_emb: torch.Tensor = torch.zeros(0),
                att_cache: torch.Tensor = torch.zeros((0, 0, 0, 0)),
                cnn_cache: torch.Tensor = torch.zeros((0, 0, 0)),
                cnn_cache_at_valid_end: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.feed_forward_macaron is not None and self.norm_ff_macaron is not None:
            residual = x
            if self.normalize_before:
                x = self.norm_ff_macaron(x)
            x = residual + self.ff_scale * self.dropout(self.feed_forward_macaron(x, route_emb, mask_pad))
            if not self.normalize_before:
                x = self.norm_ff_macaron(x)

        residual = x
        if self.normalize_before:
            x = self.norm_mha(x)
        x_att, new_att_cache = self.self_attn(x, x, x, mask, pos_emb, att_cache)
        x = residual + self.dropout(x_att)
        if not self.normalize_before:
            x = self.norm_mha(x)

        new_cnn_cache = _empty_cnn_cache(x)
        if self.conv_module is not None and self.norm_conv is not None:
            residual = x
            if self.normalize_before:
                x = self.norm_conv(x)
            x, new_cnn_cache = self.conv_module(x, mask_pad, cnn_cache, cnn_cache_at_valid_end)
            x = residual + self.dropout(x)
            if not self.normalize_before:
                x = self.norm_conv(x)

        residual = x
        if self.normalize_before:
            x = self.norm_ff(x)
        x = residual + self.ff_scale * self.dropout(self.feed_forward(x, route_emb, mask_pad))
        if not self.normalize_before:
            x = self.norm_ff(x)

        if self.norm_final is not None:
            x = self.norm_final(x)
        return x, mask, new_att_cache, new_cnn_cache
