"""Multi-head attention with a key/value cache (WeNet's calling convention).

Both classes share one signature, so encoder and decoder blocks can hold either:

    forward(query (B, T1, D), key (B, T2, D), value (B, T2, D),
            mask: bool (B, 1 | T1, T2), True = may attend; shape (0, 0, 0) = no mask,
            pos_emb: (1 | B, T_cache + T2, D) positional encodings of the keys
                     (relative-position attention only; ignored by the plain one),
            cache: (B, H, T_cache, 2 * d_k), cached keys and values concatenated on
                   the last dim; shape (0, 0, 0, 0) = no cache)
        -> (out (B, T1, D), new_cache (B, H, T_cache + T2, 2 * d_k))

With a cache the keys/values of this call are appended to the cached ones, so the
queries attend over `T_cache + T2` positions; the mask's last dim is cut to that
length (a longer streaming `att_mask` is allowed, as in WeNet's runtime).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn


def _masked_fill_value(dtype: torch.dtype) -> float:
    """A large negative finite score for masked positions (finite, so a fully
    masked row yields zeros instead of NaN values and NaN gradients)."""
    if dtype == torch.float16:
        return -65504.0
    return -1.0e30


class MultiHeadedAttention(nn.Module):
    """Scaled dot-product attention over H heads.

    Args:
        n_head: number of heads H.
        n_feat: model dimension D (divisible by H; d_k = D / H).
        dropout_rate: dropout on the attention weights.
    """

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float):
        super().__init__()
        if n_feat % n_head != 0:
            raise ValueError(f"attention dimension {n_feat} is not divisible by "
                             f"the number of heads {n_head}")
        self.d_k = n_feat // n_head
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout = nn.Dropout(p=dropout_rate)

    def forward_qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and split heads: q (B, H, T1, d_k), k and v (B, H, T2, d_k)."""
        b = query.size(0)
        q = self.linear_q(query).view(b, -1, self.h, self.d_k).transpose(1, 2)
        k = self.linear_k(key).view(b, -1, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(value).view(b, -1, self.h, self.d_k).transpose(1, 2)
        return q, k, v

    def _with_cache(self, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prepend cached keys/values; returns (k, v, new_cache (B, H, T, 2*d_k))."""
        if cache.size(0) > 0:
            k_cache, v_cache = torch.split(cache, cache.size(-1) // 2, dim=-1)
            k = torch.cat([k_cache, k], dim=2)
            v = torch.cat([v_cache, v], dim=2)
        return k, v, torch.cat((k, v), dim=-1)

    def forward_attention(self, value: torch.Tensor, scores: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """Softmax over keys with the mask, weighted sum of values.

        Args:
            value: (B, H, T2, d_k).
            scores: (B, H, T1, T2) scaled attention logits.
            mask: bool (B, 1 | T1, >= T2) True = attend, or (0, 0, 0).
        Returns:
            (B, T1, D) after the output projection.
        """
        b = value.size(0)
        if mask.size(2) > 0:
            blocked = ~mask[:, :, :scores.size(-1)].unsqueeze(1)  # (B, 1, *, T2)
            scores = scores.masked_fill(blocked, _masked_fill_value(scores.dtype))
            attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        x = torch.matmul(self.dropout(attn), value)  # (B, H, T1, d_k)
        x = x.transpose(1, 2).contiguous().view(b, -1, self.h * self.d_k)
        return self.linear_out(x)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool),
                pos_emb: torch.Tensor = torch.empty(0),
                cache: torch.Tensor = torch.zeros((0, 0, 0, 0))
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """See the module docstring; `pos_emb` is ignored."""
        q, k, v = self.forward_qkv(query, key, value)
        k, v, new_cache = self._with_cache(k, v, cache)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_k)
        return self.forward_attention(v, scores, mask), new_cache


class RelPositionMultiHeadedAttention(MultiHeadedAttention):
    """Transformer-XL style attention with positional biases, as in U2++.

    scores = ((q + u) k^T + (q + v) p^T) / sqrt(d_k), where p = linear_pos(pos_emb)
    are the projected encodings of the key positions and u, v (H, d_k) are learned
    biases (`pos_bias_u`, `pos_bias_v`). As in WeNet's U2++ models the positional
    term is taken over the key positions directly (no relative shift), so one
    encoding per key position suffices, which is what streaming needs: the cached
    keys keep their absolute positions `offset - T_cache ...`.

    Args:
        n_head, n_feat, dropout_rate: as MultiHeadedAttention.
    """

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float):
        super().__init__(n_head, n_feat, dropout_rate)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool),
                pos_emb: torch.Tensor = torch.empty(0),
                cache: torch.Tensor = torch.zeros((0, 0, 0, 0))
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """See the module docstring; `pos_emb` (1 | B, T_cache + T2, D) is required."""
        q, k, v = self.forward_qkv(query, key, value)
        k, v, new_cache = self._with_cache(k, v, cache)
        q = q.transpose(1, 2)  # (B, T1, H, d_k)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, T1, d_k)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k)
        p = p.transpose(1, 2)  # (1 | B, H, T_keys, d_k)
        content = torch.matmul(q_u, k.transpose(-2, -1))
        position = torch.matmul(q_v, p.transpose(-2, -1))
        scores = (content + position) / math.sqrt(self.d_k)
        return self.forward_attention(v, scores, mask), new_cache
