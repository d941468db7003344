"""Scriptable modules whose `forward` is one exported graph.

Each wrapper holds only the parts of the ASRModel its graph needs and calls the
model's own code (`encoder.forward_chunk`, `ctc.log_softmax`,
`forward_attention_decoder`), so the exported graphs compute what PyTorch does.
Integer and float arguments arrive as tensors, which fixes their ONNX types
(int64 / float32) and accepts both a scalar () and a (1,) tensor for `offset` and
`required_cache_size` (WeNet's runtime feeds scalars, sherpa-onnx feeds (1,)).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class EncoderChunk(nn.Module):
    """`encoder.onnx`: one streaming chunk.

    forward(chunk (1, T, F), offset int64 () or (1,), required_cache_size int64,
            att_cache (blocks, H, T_cache, 2*d_k), cnn_cache (blocks, 1, D, k-1),
            att_mask bool (1, 1, T_cache + T'))
        -> (output (1, T', D), r_att_cache (blocks, H, T_kept, 2*d_k),
            r_cnn_cache (blocks, 1, D, k-1))
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, chunk: torch.Tensor, offset: torch.Tensor,
                required_cache_size: torch.Tensor, att_cache: torch.Tensor,
                cnn_cache: torch.Tensor, att_mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encoder.forward_chunk(
            chunk, int(offset.reshape(-1)[0]), int(required_cache_size.reshape(-1)[0]),
            att_cache, cnn_cache, att_mask)


class StreamingCtc(nn.Module):
    """sherpa-onnx's `model_streaming.onnx`: `EncoderChunk` followed by the CTC
    log-softmax; same inputs, outputs (log_probs (1, T', V), r_attn_cache,
    r_conv_cache)."""

    def __init__(self, encoder: nn.Module, ctc: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.ctc = ctc

    def forward(self, x: torch.Tensor, offset: torch.Tensor,
                required_cache_size: torch.Tensor, attn_cache: torch.Tensor,
                conv_cache: torch.Tensor, attn_mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, r_attn_cache, r_conv_cache = self.encoder.forward_chunk(
            x, int(offset.reshape(-1)[0]), int(required_cache_size.reshape(-1)[0]),
            attn_cache, conv_cache, attn_mask)
        return self.ctc.log_softmax(out), r_attn_cache, r_conv_cache


class CtcActivation(nn.Module):
    """`ctc.onnx`: hidden (B, T, D) -> probs (B, T, V), CTC log-posteriors."""

    def __init__(self, ctc: nn.Module):
        super().__init__()
        self.ctc = ctc

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ctc.log_softmax(hidden)


class AttentionDecoder(nn.Module):
    """`decoder.onnx`: (hyps (N, L) <sos> first, hyps_lens (N,) including <sos>,
    encoder_out (1, T, D), reverse_weight float32 ()) -> (score, r_score) (N, L, V)
    log-probabilities of the left-to-right and right-to-left decoders."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, hyps: torch.Tensor, hyps_lens: torch.Tensor, encoder_out: torch.Tensor,
                reverse_weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_attention_decoder(hyps, hyps_lens, encoder_out,
                                                    float(reverse_weight.reshape(-1)[0]))


class AttentionDecoderTree(nn.Module):
    """`decoder_tree.onnx`: the prefix trees of n-best lists (`wenet_moe_runtime.
    prefix_tree`): tokens, depth (M, P) int64, ancestors bool (M, P, P), the same
    r_tokens, r_depth (M, P_r), r_ancestors (M, P_r, P_r) of the reversed hypotheses,
    encoder_out (M, T, D) -> (score (M, P, V), r_score (M, P_r, V)) log-probabilities
    of the left-to-right and right-to-left decoders (zeros when unidirectional)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor,
                r_tokens: torch.Tensor, r_depth: torch.Tensor, r_ancestors: torch.Tensor,
                encoder_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_attention_decoder_tree(tokens, depth, ancestors, r_tokens,
                                                         r_depth, r_ancestors, encoder_out)


class OfflineCtc(nn.Module):
    """sherpa-onnx's offline `model.onnx`: x (N, T, F), x_lens int64 (N,) ->
    (log_probs (N, T', V), log_probs_lens int64 (N,)), full-context encoder."""

    def __init__(self, encoder: nn.Module, ctc: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.ctc = ctc

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        out, mask = self.encoder(x, x_lens, -1, -1)
        lens = mask.squeeze(1).to(torch.int64).sum(1)
        return self.ctc.log_softmax(out), lens


class EncoderBatch(nn.Module):
    """`encoder_batch.onnx`: one streaming chunk of B streams (cross-stream batching;
    `encoder.forward_chunk_batch`).

    forward(chunk (B, T, F) right-padded windows, chunk_lens int64 (B,),
            offsets int64 (B,), required_cache_size int64 (),
            att_cache (B, blocks, H, T_cache, 2*d_k) left-padded,
            cnn_cache (B, blocks, D, k-1), att_mask bool (B, 1, T_cache + T'))
        -> (output (B, T', D), out_lens int64 (B,),
            r_att_cache (B, blocks, H, T_next, 2*d_k) right-aligned per stream,
            r_cnn_cache (B, blocks, D, k-1))
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, chunk: torch.Tensor, chunk_lens: torch.Tensor, offsets: torch.Tensor,
                required_cache_size: torch.Tensor, att_cache: torch.Tensor,
                cnn_cache: torch.Tensor, att_mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encoder.forward_chunk_batch(
            chunk, chunk_lens, offsets, int(required_cache_size.reshape(-1)[0]),
            att_cache, cnn_cache, att_mask)
