"""Padding and (chunk-)causal attention masks. All masks are bool, True = attend/valid.

All functions are TorchScript-compatible; random draws for dynamic-chunk training
use `torch.randint` on the global generator (seed it with `torch.manual_seed`).
"""
from __future__ import annotations

import torch


def make_pad_mask(lengths: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """True at padded positions: lengths (B,) -> (B, T), T = max_len if > 0 else
    the largest length."""
    batch = lengths.size(0)
    if max_len <= 0:
        max_len = int(lengths.max().item()) if batch > 0 else 0
    positions = torch.arange(0, max_len, dtype=torch.int64, device=lengths.device)
    return positions.unsqueeze(0).expand(batch, max_len) >= lengths.unsqueeze(-1)


def make_non_pad_mask(lengths: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """True at valid positions: lengths (B,) -> (B, T)."""
    return ~make_pad_mask(lengths, max_len)


def subsequent_mask(size: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Causal mask (size, size): row i may attend to columns 0..i."""
    pos = torch.arange(size, device=device)
    return pos.unsqueeze(0) <= pos.unsqueeze(1)


def subsequent_chunk_mask(size: int, chunk_size: int, num_left_chunks: int = -1,
                          device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Block-causal mask (size, size) for chunks of `chunk_size` frames.

    Row i (in chunk c = i // chunk_size) may attend to column j iff j's chunk is c or
    one of the `num_left_chunks` chunks before it (all earlier chunks if < 0).
    """
    chunk = torch.arange(size, device=device) // chunk_size
    row = chunk.unsqueeze(1)
    col = chunk.unsqueeze(0)
    mask = col <= row
    if num_left_chunks >= 0:
        mask = mask & (col >= row - num_left_chunks)
    return mask


def add_optional_chunk_mask(xs: torch.Tensor, masks: torch.Tensor,
                            use_dynamic_chunk: bool, use_dynamic_left_chunk: bool,
                            decoding_chunk_size: int, static_chunk_size: int,
                            num_decoding_left_chunks: int,
                            enable_full_context: bool = True,
                            max_chunk_size: int = 25) -> torch.Tensor:
    """Combine the padding mask with a chunk mask (WeNet's U2/U2++ semantics).

    Args:
        xs: (B, L, D) encoder input after subsampling (only L and device are used).
        masks: (B, 1, L) padding mask.
        use_dynamic_chunk: dynamic chunk training/decoding.
        use_dynamic_left_chunk: draw a random number of left chunks in training.
        decoding_chunk_size: < 0 full context; > 0 fixed chunk; 0 = training draw
            (with dynamic chunk) or static chunk.
        static_chunk_size: fixed chunk when not dynamic (0 = none).
        num_decoding_left_chunks: left chunks at decoding time (< 0 = all).
        enable_full_context: training draws may pick full context (about half of
            the batches: a draw `c` in [1, L) above L // 2 means full context, else
            the chunk is `c % max_chunk_size + 1`).
        max_chunk_size: largest drawn chunk (`int(100 / subsampling_rate)`: 1 s).
    Returns:
        (B, L, L) bool with dynamic/static chunks, else `masks` (B, 1, L) unchanged.
    """
    if use_dynamic_chunk:
        max_len = xs.size(1)
        num_left_chunks = -1
        if decoding_chunk_size < 0:
            chunk_size = max_len
        elif decoding_chunk_size > 0:
            chunk_size = decoding_chunk_size
            num_left_chunks = num_decoding_left_chunks
        else:
            if max_len < 2:
                chunk_size = max_len
            else:
                chunk_size = int(torch.randint(1, max_len, (1,)).item())
                if chunk_size > max_len // 2 and enable_full_context:
                    chunk_size = max_len
                else:
                    chunk_size = chunk_size % max_chunk_size + 1
                    if use_dynamic_left_chunk:
                        max_left_chunks = (max_len - 1) // chunk_size
                        num_left_chunks = int(torch.randint(0, max_left_chunks + 1,
                                                            (1,)).item())
        chunk_masks = subsequent_chunk_mask(max(max_len, 0), max(chunk_size, 1),
                                            num_left_chunks, xs.device)
        return masks & chunk_masks.unsqueeze(0)
    if static_chunk_size > 0:
        chunk_masks = subsequent_chunk_mask(xs.size(1), static_chunk_size,
                                            num_decoding_left_chunks, xs.device)
        return masks & chunk_masks.unsqueeze(0)
    return masks
