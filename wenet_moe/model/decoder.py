"""Attention decoders: left-to-right Transformer and the U2++ bidirectional pair.

Every FFN of the decoders is made by one `FFNFactory(..., frame_embedding=False)`
(wenet_moe/layers/ffn.py), so `mlp_type: moe` turns each of them into an MoE FFN; the
U2++ pair hands one factory to both directions, so they share one Omni-Router.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from wenet_moe.layers.attention import MultiHeadedAttention
from wenet_moe.layers.embedding import PositionalEncoding
from wenet_moe.layers.ffn import FFNFactory
from wenet_moe.model.decoder_layer import DecoderLayer
from wenet_moe.model.masks import make_non_pad_mask, subsequent_mask

# decoder_conf keys (WeNet names plus the MoE keys); r_num_blocks only for bitransformer.
DECODER_CONF_KEYS = (
    "attention_heads", "linear_units", "num_blocks", "dropout_rate",
    "positional_dropout_rate", "self_attention_dropout_rate", "src_attention_dropout_rate",
    "input_layer", "use_output_layer", "normalize_before", "activation_type",
    "mlp_type", "n_expert", "n_expert_activated",
)
BI_DECODER_CONF_KEYS = DECODER_CONF_KEYS + ("r_num_blocks",)


@torch.jit.unused
def _check_groups(memory: torch.Tensor, targets: torch.Tensor) -> None:
    """One-line error unless the (B, L) targets split into memory.size(0) equal groups."""
    if memory.dim() != 3 or memory.size(0) == 0 or targets.size(0) % memory.size(0) != 0:
        raise ValueError(f"decoder: {targets.size(0)} target rows do not split into groups over "
                         f"memory of shape {tuple(memory.shape)}: each of its M rows needs the "
                         f"same number of consecutive target rows")


class TransformerDecoder(nn.Module):
    """Left-to-right attention decoder.

    Args:
        vocab_size: output vocabulary V.
        encoder_output_size: model dimension D (= encoder output size).
        attention_heads, linear_units, num_blocks: block shape.
        dropout_rate, positional_dropout_rate, self_attention_dropout_rate,
            src_attention_dropout_rate: dropouts.
        input_layer: `embed` (token embedding + absolute positional encoding).
        use_output_layer: project to V at the end.
        normalize_before: pre-norm blocks (plus a final LayerNorm).
        activation_type, mlp_type, n_expert, n_expert_activated: FFN slot settings.
        moe_conf: the top-level `moe_conf` block (for `mlp_type: moe`).
        ffn_factory: the FFN factory to draw the blocks' FFNs from (shared with the
            other direction of a BiTransformerDecoder); None: one of this decoder's own
            from the settings above. Not a config key.
    """

    def __init__(self, vocab_size: int, encoder_output_size: int, attention_heads: int = 4,
                 linear_units: int = 2048, num_blocks: int = 6, dropout_rate: float = 0.1,
                 positional_dropout_rate: float = 0.1, self_attention_dropout_rate: float = 0.0,
                 src_attention_dropout_rate: float = 0.0, input_layer: str = "embed",
                 use_output_layer: bool = True, normalize_before: bool = True,
                 activation_type: str = "relu", mlp_type: str = "position_wise_feed_forward",
                 n_expert: int = 8, n_expert_activated: int = 2,
                 moe_conf: Optional[Dict[str, Any]] = None,
                 ffn_factory: Optional[FFNFactory] = None):
        super().__init__()
        if input_layer != "embed":
            raise ValueError(f"decoder_conf.input_layer '{input_layer}' is not supported (use 'embed')")
        if num_blocks < 1:
            raise ValueError(f"decoder_conf.num_blocks must be >= 1, got {num_blocks}")
        d = encoder_output_size
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d)
        self.pos_enc = PositionalEncoding(d, positional_dropout_rate)
        self.normalize_before = normalize_before
        self.after_norm = nn.LayerNorm(d, eps=1e-5)
        self.use_output_layer = use_output_layer
        self.output_layer = nn.Linear(d, vocab_size) if use_output_layer else nn.Identity()
        if ffn_factory is None:
            ffn_factory = FFNFactory(d, linear_units, dropout_rate, activation_type, mlp_type,
                                     n_expert, n_expert_activated, moe_conf, frame_embedding=False)
        self.num_blocks = num_blocks
        self.decoders = nn.ModuleList([
            DecoderLayer(d,
                         MultiHeadedAttention(attention_heads, d, self_attention_dropout_rate),
                         MultiHeadedAttention(attention_heads, d, src_attention_dropout_rate),
                         ffn_factory(), dropout_rate, normalize_before)
            for _ in range(num_blocks)
        ])

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pos_enc(self.embed(tokens))[0]

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor, ys_in_pad: torch.Tensor,
                ys_in_lens: torch.Tensor, r_ys_in_pad: torch.Tensor = torch.empty(0),
                reverse_weight: float = 0.0
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced decoding.

        Args:
            memory: (M, T, D) encoder output, M dividing B; memory_mask: bool (M, 1, T).
                Target rows come in M groups of B / M consecutive rows, group m over
                memory row m (`DecoderLayer`): M = B in training, M = 1 to score N
                hypotheses of one utterance with its keys / values projected once.
            ys_in_pad: (B, L) input ids (<sos> first), padding ids must be valid
                indices (e.g. <eos>); ys_in_lens: (B,) valid lengths.
            r_ys_in_pad, reverse_weight: unused here (bidirectional API).
        Returns:
            (logits (B, L, V), tensor(0.) in place of right-to-left logits,
             olens (B,) = ys_in_lens).
        """
        x = self._forward_logits(memory, memory_mask, ys_in_pad, ys_in_lens)
        return x, torch.tensor(0.0), ys_in_lens

    def _forward_logits(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                        ys_in_pad: torch.Tensor, ys_in_lens: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            _check_groups(memory, ys_in_pad)
        max_len = ys_in_pad.size(1)
        tgt_mask = make_non_pad_mask(ys_in_lens, max_len).unsqueeze(1) \
            & subsequent_mask(max_len, ys_in_pad.device).unsqueeze(0)  # (B, L, L)
        return self._blocks_to_logits(self._embed(ys_in_pad), tgt_mask, memory, memory_mask)

    def _blocks_to_logits(self, x: torch.Tensor, tgt_mask: torch.Tensor, memory: torch.Tensor,
                          memory_mask: torch.Tensor) -> torch.Tensor:
        """Embedded targets x (B, L, D) through every block, the final norm and the
        output layer -> logits (B, L, V); tgt_mask bool (B, L, L)."""
        for layer in self.decoders:
            x, tgt_mask, memory, memory_mask = layer(x, tgt_mask, memory, memory_mask)
        if self.normalize_before:
            x = self.after_norm(x)
        return self.output_layer(x)

    @torch.jit.export
    def forward_prefix_tree(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                            tokens: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor
                            ) -> torch.Tensor:
        """Teacher-forced decoding of prefix trees: the distinct prefixes of a set of
        hypotheses, each computed once however many hypotheses share it.

        Args:
            memory: (M, T, D) encoder outputs; memory_mask: bool (M, 1, T).
            tokens: (M, P) the last token of each node's prefix (<sos> at the root).
            depth: (M, P) int64 each node's position (the root 0).
            ancestors: bool (M, P, P), [m, p, q] True when node q is on the path from
                the root to node p (p included); unused (padding) nodes need at least
                their own diagonal entry.
        Returns:
            logits (M, P, V): row p equals position depth[p] of `forward` on any
            hypothesis whose prefix is node p (causal self-attention sees exactly the
            prefix, at the same positions).
        """
        m, p = tokens.size(0), tokens.size(1)
        x = self.embed(tokens).reshape(m * p, 1, -1)
        x = self.pos_enc.forward_offsets(x, depth.reshape(-1)).reshape(m, p, -1)
        return self._blocks_to_logits(x, ancestors, memory, memory_mask)

    @torch.jit.export
    def forward_prefix_trees(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                             tokens: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor,
                             r_tokens: torch.Tensor, r_depth: torch.Tensor, r_ancestors: torch.Tensor
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(forward_prefix_tree logits (M, P, V), tensor(0.) in place of right-to-left
        ones): the r_* trees are unused here (bidirectional API)."""
        return self.forward_prefix_tree(memory, memory_mask, tokens, depth, ancestors), torch.tensor(0.0)

    @torch.jit.export
    def forward_one_step(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                         tgt: torch.Tensor, tgt_mask: torch.Tensor, cache: List[torch.Tensor]
                         ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """One incremental step of beam search.

        Args:
            memory: (M, T, D), M dividing N; memory_mask: bool (M, 1, T): the N
                prefixes are M groups of N / M consecutive rows (e.g. an utterance's
                beams), group m over memory row m (`DecoderLayer`).
            tgt: (N, i) prefixes (<sos> first); tgt_mask: bool (N, i, i).
            cache: per block, its output for the first i-1 positions (N, i-1, D);
                an empty list at the first step.
        Returns:
            (log-probabilities of the next token (N, V), new cache: per block (N, i, D)).
        """
        if not torch.jit.is_scripting():
            _check_groups(memory, tgt)
        x = self._embed(tgt)
        new_cache: List[torch.Tensor] = []
        for i, layer in enumerate(self.decoders):
            c = cache[i] if len(cache) > 0 else torch.zeros(0, 0, 0, device=x.device)
            x, tgt_mask, memory, memory_mask = layer(x, tgt_mask, memory, memory_mask, c)
            new_cache.append(x)
        y = x[:, -1]
        if self.normalize_before:
            y = self.after_norm(y)
        return torch.log_softmax(self.output_layer(y), dim=-1), new_cache


class BiTransformerDecoder(nn.Module):
    """U2++ decoder pair: a left-to-right and a right-to-left TransformerDecoder.

    Args: as TransformerDecoder, plus r_num_blocks for the right-to-left stack.
    Both directions draw their FFNs from one FFNFactory: the decoders are one MoE stack
    with one Omni-Router (if any), as the encoder is another.
    """

    def __init__(self, vocab_size: int, encoder_output_size: int, attention_heads: int = 4,
                 linear_units: int = 2048, num_blocks: int = 6, r_num_blocks: int = 0,
                 dropout_rate: float = 0.1, positional_dropout_rate: float = 0.1,
                 self_attention_dropout_rate: float = 0.0, src_attention_dropout_rate: float = 0.0,
                 input_layer: str = "embed", use_output_layer: bool = True,
                 normalize_before: bool = True, activation_type: str = "relu",
                 mlp_type: str = "position_wise_feed_forward", n_expert: int = 8,
                 n_expert_activated: int = 2, moe_conf: Optional[Dict[str, Any]] = None):
        super().__init__()
        if r_num_blocks < 1:
            raise ValueError(f"decoder_conf.r_num_blocks must be >= 1 for bitransformer, got {r_num_blocks}")

        ffn_factory = FFNFactory(encoder_output_size, linear_units, dropout_rate, activation_type,
                                 mlp_type, n_expert, n_expert_activated, moe_conf,
                                 frame_embedding=False)

        def stack(blocks: int) -> TransformerDecoder:
            return TransformerDecoder(
                vocab_size, encoder_output_size, attention_heads, linear_units, blocks,
                dropout_rate, positional_dropout_rate, self_attention_dropout_rate,
                src_attention_dropout_rate, input_layer, use_output_layer, normalize_before,
                activation_type, mlp_type, n_expert, n_expert_activated, moe_conf, ffn_factory)

        self.left_decoder = stack(num_blocks)
        self.right_decoder = stack(r_num_blocks)

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor, ys_in_pad: torch.Tensor,
                ys_in_lens: torch.Tensor, r_ys_in_pad: torch.Tensor = torch.empty(0),
                reverse_weight: float = 0.0
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced decoding in both directions.

        Args:
            memory, memory_mask, ys_in_pad, ys_in_lens: as TransformerDecoder.
            r_ys_in_pad: (B, L) reversed targets (<sos> first), same lengths.
            reverse_weight: the right-to-left decoder runs only when > 0.
        Returns:
            (l2r logits (B, L, V), r2l logits (B, L, V) or tensor(0.), olens (B,)).
        """
        l_x = self.left_decoder._forward_logits(memory, memory_mask, ys_in_pad, ys_in_lens)
        r_x = torch.tensor(0.0)
        if reverse_weight > 0.0:
            r_x = self.right_decoder._forward_logits(memory, memory_mask, r_ys_in_pad, ys_in_lens)
        return l_x, r_x, ys_in_lens

    @torch.jit.export
    def forward_prefix_trees(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                             tokens: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor,
                             r_tokens: torch.Tensor, r_depth: torch.Tensor, r_ancestors: torch.Tensor
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits of the hypotheses' prefix trees (left-to-right decoder, (M, P, V)) and
        of their reversed hypotheses' trees (right-to-left decoder, (M, P_r, V));
        see TransformerDecoder.forward_prefix_tree."""
        return (self.left_decoder.forward_prefix_tree(memory, memory_mask, tokens, depth, ancestors),
                self.right_decoder.forward_prefix_tree(memory, memory_mask, r_tokens, r_depth,
                                                       r_ancestors))

    @torch.jit.export
    def forward_one_step(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                         tgt: torch.Tensor, tgt_mask: torch.Tensor, cache: List[torch.Tensor]
                         ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Left-to-right incremental step (see TransformerDecoder.forward_one_step)."""
        return self.left_decoder.forward_one_step(memory, memory_mask, tgt, tgt_mask, cache)
