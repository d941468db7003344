"""U2++ encoders: one BaseEncoder (CMVN, input layer, chunk masks, full and streaming
forward) driving either Conformer or Transformer blocks.

The constructor takes WeNet's `encoder_conf` keys as keyword arguments:

    ConformerEncoder(input_size, global_cmvn=GlobalCMVN | None, moe_conf={...},
                     **configs["encoder_conf"])

Unknown keys raise `ConfigError("unknown key 'encoder_conf.<key>'")`; invalid values
raise ConfigError naming the key. Every FFN comes from one
`FFNFactory(..., frame_embedding=True)`; when the factory has a shared routing
embedding (SpeechMoE), it runs once per forward on the embedded input and its output
is handed to every FFN as `route_emb` (an empty tensor otherwise).

Streaming (`forward_chunk`) follows WeNet's cache conventions:
`att_cache (num_blocks, H, T_cache, 2*d_k)`, `cnn_cache (num_blocks, 1, D, kernel-1)`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from wenet_moe.config import ConfigError, check_keys
from wenet_moe.layers.attention import MultiHeadedAttention, RelPositionMultiHeadedAttention
from wenet_moe.layers.convolution import ConvolutionModule
from wenet_moe.layers.embedding import (NoPositionalEncoding, PositionalEncoding,
                                        RelPositionalEncoding)
from wenet_moe.layers.activation import get_activation
from wenet_moe.layers.ffn import FFNFactory
from wenet_moe.layers.subsampling import INPUT_LAYERS
from wenet_moe.model.encoder_layer import ConformerEncoderLayer, TransformerEncoderLayer
from wenet_moe.model.masks import add_optional_chunk_mask, make_pad_mask

POS_ENCODINGS = {"abs_pos": PositionalEncoding, "rel_pos": RelPositionalEncoding,
                 "no_pos": NoPositionalEncoding}
ATTENTIONS = {"selfattn": MultiHeadedAttention, "rel_selfattn": RelPositionMultiHeadedAttention}

TRANSFORMER_DEFAULTS: Dict[str, Any] = {
    "output_size": 256, "attention_heads": 4, "linear_units": 2048, "num_blocks": 6,
    "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.0,
    "input_layer": "conv2d", "pos_enc_layer_type": "abs_pos",
    "selfattention_layer_type": "selfattn", "normalize_before": True,
    "static_chunk_size": 0, "use_dynamic_chunk": False, "use_dynamic_left_chunk": False,
    "activation_type": "relu", "mlp_type": "position_wise_feed_forward",
    "n_expert": 8, "n_expert_activated": 2,
}
CONFORMER_DEFAULTS: Dict[str, Any] = dict(
    TRANSFORMER_DEFAULTS, pos_enc_layer_type="rel_pos",
    selfattention_layer_type="rel_selfattn", activation_type="swish", macaron_style=True,
    use_cnn_module=True, cnn_module_kernel=15, causal=False, cnn_module_norm="batch_norm",
    cnn_module_pad="glu")


def _choice(conf: Dict[str, Any], key: str, choices) -> None:
    if conf[key] not in choices:
        raise ConfigError(f"encoder_conf.{key}: unknown value '{conf[key]}' "
                          f"(choose from {', '.join(choices)})")


def resolve_encoder_conf(conf: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """Check keys and values of an `encoder_conf` block; returns it with defaults."""
    check_keys(conf, defaults, "encoder_conf")
    c = dict(defaults, **conf)
    for key in ("output_size", "attention_heads", "linear_units", "num_blocks"):
        if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] <= 0:
            raise ConfigError(f"encoder_conf.{key} must be a positive integer, got {c[key]!r}")
    if c["output_size"] % c["attention_heads"] != 0:
        raise ConfigError(f"encoder_conf.output_size {c['output_size']} is not divisible by "
                          f"encoder_conf.attention_heads {c['attention_heads']}")
    _choice(c, "input_layer", list(INPUT_LAYERS))
    _choice(c, "pos_enc_layer_type", list(POS_ENCODINGS))
    _choice(c, "selfattention_layer_type", list(ATTENTIONS))
    if c["selfattention_layer_type"] == "rel_selfattn" and c["pos_enc_layer_type"] == "no_pos":
        raise ConfigError("encoder_conf.selfattention_layer_type rel_selfattn needs "
                          "pos_enc_layer_type rel_pos or abs_pos, not no_pos")
    if "cnn_module_norm" in c:
        _choice(c, "cnn_module_norm", ["batch_norm", "layer_norm"])
        # where the conv module zero-pads and masks: "glu" output (default) or the
        # module "input" as WeNet does (layers/convolution.py)
        _choice(c, "cnn_module_pad", ["glu", "input"])
        if not isinstance(c["cnn_module_kernel"], int) or c["cnn_module_kernel"] < 1:
            raise ConfigError(f"encoder_conf.cnn_module_kernel must be a positive integer, "
                              f"got {c['cnn_module_kernel']!r}")
        if c["use_cnn_module"] and not c["causal"] and c["cnn_module_kernel"] % 2 == 0:
            raise ConfigError(f"encoder_conf.cnn_module_kernel {c['cnn_module_kernel']} must "
                              f"be odd for a non-causal convolution (or set causal: true)")
    try:
        get_activation(c["activation_type"])
    except ValueError as e:
        raise ConfigError(f"encoder_conf.activation_type: {e}") from e
    return c


def next_cache_start_of(attention_key_size: int, required_cache_size: int) -> int:
    """First of the `attention_key_size` keys of a chunk call kept as the next attention
    cache: 0 (keep all) when `required_cache_size` < 0, none kept when it is 0, else
    the last `required_cache_size`."""
    if required_cache_size < 0:
        return 0
    if required_cache_size == 0:
        return attention_key_size
    return max(attention_key_size - required_cache_size, 0)


class BaseEncoder(nn.Module):
    """Shared encoder machinery; subclasses choose the block type (`_make_layer`).

    Args:
        input_size: feature dimension F.
        global_cmvn: GlobalCMVN module applied first, or None.
        moe_conf: the top-level `moe_conf` block (used when mlp_type is moe).
        defaults: accepted keys with their default values.
        encoder_conf: the `encoder_conf` keys.
    """

    def __init__(self, input_size: int, global_cmvn: Optional[nn.Module],
                 moe_conf: Optional[Dict[str, Any]], defaults: Dict[str, Any],
                 encoder_conf: Dict[str, Any]):
        super().__init__()
        c = resolve_encoder_conf(encoder_conf, defaults)
        d = c["output_size"]
        self._output_size = d
        self.num_blocks = c["num_blocks"]
        self.attention_heads = c["attention_heads"]
        self.static_chunk_size = int(c["static_chunk_size"])
        self.use_dynamic_chunk = bool(c["use_dynamic_chunk"])
        self.use_dynamic_left_chunk = bool(c["use_dynamic_left_chunk"])
        self.normalize_before = bool(c["normalize_before"])
        # kernel of the conformer convolution (the cnn cache keeps kernel-1 frames
        # when it is causal); 1 without a convolution module
        self.cnn_module_kernel = int(c["cnn_module_kernel"]) if c.get("use_cnn_module") else 1

        self.global_cmvn = global_cmvn
        pos_enc = POS_ENCODINGS[c["pos_enc_layer_type"]](d, c["positional_dropout_rate"])
        self.embed = INPUT_LAYERS[c["input_layer"]](input_size, d, c["dropout_rate"], pos_enc)
        self.max_chunk_size = int(100.0 / self.embed.subsampling_rate)

        factory = FFNFactory(d, c["linear_units"], c["dropout_rate"], c["activation_type"],
                             c["mlp_type"], c["n_expert"], c["n_expert_activated"],
                             moe_conf, frame_embedding=True)
        self.encoders = nn.ModuleList([self._make_layer(c, factory)
                                       for _ in range(self.num_blocks)])
        self.route_embed = factory.route_embedding()
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def _make_layer(self, c: Dict[str, Any], factory: FFNFactory) -> nn.Module:
        raise NotImplementedError

    @torch.jit.export
    def output_size(self) -> int:
        """Model dimension D of the encoder output."""
        return self._output_size

    def _route_embedding(self, xs: torch.Tensor) -> torch.Tensor:
        """Shared routing embedding (B, T, E) of the embedded input, or empty."""
        if self.route_embed is not None:
            return self.route_embed(xs)
        return torch.zeros(0, dtype=xs.dtype, device=xs.device)

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor,
                decoding_chunk_size: int = 0, num_decoding_left_chunks: int = -1
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Whole-utterance forward with the configured/requested chunk mask.

        Args:
            xs: features (B, T, F); xs_lens: (B,) valid frames.
            decoding_chunk_size: 0 training (dynamic draw or static chunk), < 0 full
                context, > 0 chunk of that many output frames.
            num_decoding_left_chunks: left chunks visible (< 0: all).
        Returns:
            out (B, T', D) and masks bool (B, 1, T') of valid output frames.
        """
        if xs.dim() != 3 or xs_lens.dim() != 1 or xs_lens.size(0) != xs.size(0):
            raise ValueError("encoder input must be xs (B, T, F) with xs_lens (B,), got "
                             "shapes {} and {}".format(xs.shape, xs_lens.shape))
        masks = ~make_pad_mask(xs_lens, xs.size(1)).unsqueeze(1)
        if self.global_cmvn is not None:
            xs = self.global_cmvn(xs)
        xs, pos_emb, masks = self.embed(xs, masks, 0)
        mask_pad = masks
        chunk_masks = add_optional_chunk_mask(xs, masks, self.use_dynamic_chunk,
                                              self.use_dynamic_left_chunk,
                                              decoding_chunk_size, self.static_chunk_size,
                                              num_decoding_left_chunks, True,
                                              self.max_chunk_size)
        route_emb = self._route_embedding(xs)
        for layer in self.encoders:
            xs, chunk_masks, _, _ = layer(xs, chunk_masks, pos_emb, mask_pad, route_emb)
        if self.normalize_before:
            xs = self.after_norm(xs)
        return xs, masks

    @torch.jit.export
    def forward_chunk(self, xs: torch.Tensor, offset: int, required_cache_size: int,
                      att_cache: torch.Tensor = torch.zeros((0, 0, 0, 0)),
                      cnn_cache: torch.Tensor = torch.zeros((0, 0, 0, 0)),
                      att_mask: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool)
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming chunk (batch 1).

        Args:
            xs: (1, T, F) features of the chunk window (overlapping the previous one by
                `right_context + 1 - subsampling_rate` frames).
            offset: output frames produced before this chunk.
            required_cache_size: attention frames to keep for the next chunk
                (< 0: all history, 0: this call's keys, > 0: that many).
            att_cache: (num_blocks, H, T_cache, 2*d_k) or (0, 0, 0, 0).
            cnn_cache: (num_blocks, 1, D, kernel-1) or (0, 0, 0, 0).
            att_mask: (1, 1, T_cache + T') bool, False for cache slots to ignore, or
                (0, 0, 0).
        Returns:
            out (1, T', D), new_att_cache (num_blocks, H, T_kept, 2*d_k),
            new_cnn_cache (num_blocks, 1, D, kernel-1).
        """
        if xs.dim() != 3 or xs.size(0) != 1:
            raise ValueError("forward_chunk takes one chunk xs (1, T, F), got shape "
                             "{}".format(xs.shape))
        if att_cache.size(0) not in (0, self.num_blocks) or \
                cnn_cache.size(0) not in (0, self.num_blocks):
            raise ValueError("forward_chunk caches must have {} blocks (or be empty), got "
                             "att_cache {} and cnn_cache {}".format(
                                 self.num_blocks, att_cache.shape, cnn_cache.shape))
        tmp_masks = torch.ones((1, 1, xs.size(1)), dtype=torch.bool, device=xs.device)
        if self.global_cmvn is not None:
            xs = self.global_cmvn(xs)
        xs, _, _ = self.embed(xs, tmp_masks, offset)
        cache_t1 = att_cache.size(2)
        attention_key_size = cache_t1 + xs.size(1)
        pos_emb = self.embed.position_encoding(offset - cache_t1, attention_key_size)
        pos_emb = pos_emb.to(xs.dtype)
        next_cache_start = next_cache_start_of(attention_key_size, required_cache_size)
        route_emb = self._route_embedding(xs)
        # all frames of a chunk are valid: no pad mask (an empty one), so the layers
        # skip masking, and the export's shape tests on it are constant
        # (`onnx_passes.fold_static_ifs` removes them; the raw export's unused
        # masking branch does not pass ONNX shape inference)
        no_pad = torch.ones((0, 0, 0), dtype=torch.bool, device=xs.device)
        r_att_cache: List[torch.Tensor] = []
        r_cnn_cache: List[torch.Tensor] = []
        for i, layer in enumerate(self.encoders):
            layer_att_cache = att_cache[i:i + 1] if att_cache.size(0) > 0 else att_cache
            if cnn_cache.size(0) > 0:
                layer_cnn_cache = cnn_cache[i]
            else:
                layer_cnn_cache = torch.zeros((0, 0, 0), dtype=xs.dtype, device=xs.device)
            xs, _, new_att_cache, new_cnn_cache = layer(
                xs, att_mask, pos_emb, no_pad, route_emb, layer_att_cache, layer_cnn_cache)
            r_att_cache.append(new_att_cache[:, :, next_cache_start:, :])
            r_cnn_cache.append(new_cnn_cache.unsqueeze(0))
        if self.normalize_before:
            xs = self.after_norm(xs)
        return xs, torch.cat(r_att_cache, dim=0), torch.cat(r_cnn_cache, dim=0)

    @torch.jit.export
    def forward_chunk_batch(self, xs: torch.Tensor, chunk_lens: torch.Tensor,
                            offsets: torch.Tensor, required_cache_size: int,
                            att_cache: torch.Tensor, cnn_cache: torch.Tensor,
                            att_mask: torch.Tensor
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming chunk of B streams in one call (cross-stream batching).

        Row b computes what `forward_chunk` computes for stream b alone (within
        float rounding): its own positions, history and convolution cache.

        Args:
            xs: (B, T, F) chunk windows, right-padded to the longest; row b's first
                chunk_lens[b] frames are valid (>= right_context + 1 each).
            chunk_lens: (B,) int64 valid input frames of each window.
            offsets: (B,) int64 output frames stream b produced before this chunk
                (its `forward_chunk` offset).
            required_cache_size: as `forward_chunk` (< 0 all, 0 none, > 0 that many).
            att_cache: (B, blocks, H, T_cache, 2*d_k), each stream's history
                left-padded to T_cache (T_cache may be 0).
            cnn_cache: (B, blocks, D, kernel-1) (zeros for a stream's first chunk).
            att_mask: (B, 1, T_cache + T') bool: False on the left padding of the
                history (and on history a stream hides), on the padded frames of a
                short chunk; True elsewhere.
        Returns:
            out (B, T', D) (row b valid for its first out_lens[b] frames),
            out_lens (B,) int64, new_att_cache (B, blocks, H, T_next, 2*d_k) with each
            stream's frames right-aligned (its last min(T_cache_b + out_lens[b],
            T_next) frames are its `forward_chunk` cache; the rest is padding),
            new_cnn_cache (B, blocks, D, kernel-1) taken at each stream's last valid
            frame.
        """
        if xs.dim() != 3 or chunk_lens.dim() != 1 or offsets.dim() != 1 or \
                chunk_lens.size(0) != xs.size(0) or offsets.size(0) != xs.size(0):
            raise ValueError("forward_chunk_batch takes xs (B, T, F), chunk_lens (B,) and "
                             "offsets (B,), got shapes {}, {} and {}".format(
                                 xs.shape, chunk_lens.shape, offsets.shape))
        if att_cache.dim() != 5 or cnn_cache.dim() != 4 or \
                att_cache.size(1) != self.num_blocks or cnn_cache.size(1) != self.num_blocks:
            raise ValueError("forward_chunk_batch caches must be att_cache (B, {0}, H, T_cache, "
                             "2*d_k) and cnn_cache (B, {0}, D, kernel-1), got {1} and {2}".format(
                                 self.num_blocks, att_cache.shape, cnn_cache.shape))
        batch = xs.size(0)
        sub = self.embed.subsampling_rate
        context = self.embed.right_context + 1
        out_lens = torch.div(chunk_lens - context, sub, rounding_mode="floor") + 1
        if self.global_cmvn is not None:
            xs = self.global_cmvn(xs)
        xs = self.embed.forward_offsets(xs, offsets)
        t_out = xs.size(1)
        cache_t1 = att_cache.size(3)
        attention_key_size = cache_t1 + t_out
        # keys of row b: positions offsets[b] - T_cache ... (the left padding included)
        pos_emb = self.embed.position_encoding_offsets(offsets - cache_t1, attention_key_size)
        pos_emb = pos_emb.to(xs.dtype)
        next_cache_start = next_cache_start_of(attention_key_size, required_cache_size)
        frames = torch.arange(t_out, device=xs.device).unsqueeze(0)
        mask_pad = (frames < out_lens.unsqueeze(1)).unsqueeze(1)  # (B, 1, T')
        # new cache slot j of row b holds key j - (T' - out_lens[b]): its valid keys
        # end at the right edge (the padded frames of a short chunk fall off)
        keys = torch.arange(next_cache_start, attention_key_size, device=xs.device)
        src = keys.unsqueeze(0) - (t_out - out_lens).unsqueeze(1)
        src = torch.clamp(src, min=0)  # (B, T_next)
        route_emb = self._route_embedding(xs)
        r_att_cache: List[torch.Tensor] = []
        r_cnn_cache: List[torch.Tensor] = []
        for i, layer in enumerate(self.encoders):
            xs, _, new_att_cache, new_cnn_cache = layer(
                xs, att_mask, pos_emb, mask_pad, route_emb, att_cache[:, i], cnn_cache[:, i],
                True)
            index = src.view(batch, 1, -1, 1).expand(
                batch, new_att_cache.size(1), src.size(1), new_att_cache.size(3))
            r_att_cache.append(torch.gather(new_att_cache, 2, index).unsqueeze(1))
            r_cnn_cache.append(new_cnn_cache.unsqueeze(1))
        if self.normalize_before:
            xs = self.after_norm(xs)
        return xs, out_lens, torch.cat(r_att_cache, dim=1), torch.cat(r_cnn_cache, dim=1)

    @torch.jit.unused
    def forward_chunk_by_chunk(self, xs: torch.Tensor, decoding_chunk_size: int,
                               num_decoding_left_chunks: int = -1
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Simulated streaming of one utterance xs (1, T, F) through `forward_chunk`.

        Windows of `(chunk-1) * subsampling_rate + right_context + 1` input frames,
        stride `subsampling_rate * chunk`; the attention cache keeps
        `chunk * num_decoding_left_chunks` frames (all if negative).
        Returns (out (1, T', D), masks all-True (1, 1, T')).
        """
        if decoding_chunk_size <= 0:
            raise ValueError(f"decoding_chunk_size must be > 0 for chunk-by-chunk "
                             f"decoding, got {decoding_chunk_size}")
        if not (self.static_chunk_size > 0 or self.use_dynamic_chunk):
            raise ValueError("chunk-by-chunk decoding needs a streaming encoder "
                             "(encoder_conf.use_dynamic_chunk or static_chunk_size)")
        if xs.size(0) != 1:
            raise ValueError(f"chunk-by-chunk decoding takes one utterance, got a batch "
                             f"of {xs.size(0)}")
        subsampling = self.embed.subsampling_rate
        context = self.embed.right_context + 1
        stride = subsampling * decoding_chunk_size
        window = (decoding_chunk_size - 1) * subsampling + context
        num_frames = xs.size(1)
        required_cache_size = decoding_chunk_size * num_decoding_left_chunks
        att_cache = torch.zeros((0, 0, 0, 0), dtype=xs.dtype, device=xs.device)
        cnn_cache = torch.zeros((0, 0, 0, 0), dtype=xs.dtype, device=xs.device)
        outputs = []
        offset = 0
        for start in range(0, num_frames - context + 1, stride):
            end = min(start + window, num_frames)
            y, att_cache, cnn_cache = self.forward_chunk(
                xs[:, start:end], offset, required_cache_size, att_cache, cnn_cache)
            outputs.append(y)
            offset += y.size(1)
        if outputs:
            ys = torch.cat(outputs, 1)
        else:
            ys = torch.zeros((1, 0, self._output_size), dtype=xs.dtype, device=xs.device)
        return ys, torch.ones((1, 1, ys.size(1)), dtype=torch.bool, device=xs.device)


class TransformerEncoder(BaseEncoder):
    """Encoder of Transformer blocks (U2++ Transformer)."""

    def __init__(self, input_size: int, global_cmvn: Optional[nn.Module] = None,
                 moe_conf: Optional[Dict[str, Any]] = None, **encoder_conf: Any):
        super().__init__(input_size, global_cmvn, moe_conf, TRANSFORMER_DEFAULTS, encoder_conf)

    def _make_layer(self, c: Dict[str, Any], factory: FFNFactory) -> nn.Module:
        attn = ATTENTIONS[c["selfattention_layer_type"]](
            c["attention_heads"], c["output_size"], c["attention_dropout_rate"])
        return TransformerEncoderLayer(c["output_size"], attn, factory(), c["dropout_rate"],
                                       c["normalize_before"])


class ConformerEncoder(BaseEncoder):
    """Encoder of Conformer blocks (U2++ Conformer)."""

    def __init__(self, input_size: int, global_cmvn: Optional[nn.Module] = None,
                 moe_conf: Optional[Dict[str, Any]] = None, **encoder_conf: Any):
        super().__init__(input_size, global_cmvn, moe_conf, CONFORMER_DEFAULTS, encoder_conf)

    def _make_layer(self, c: Dict[str, Any], factory: FFNFactory) -> nn.Module:
        d = c["output_size"]
        attn = ATTENTIONS[c["selfattention_layer_type"]](
            c["attention_heads"], d, c["attention_dropout_rate"])
        macaron = factory() if c["macaron_style"] else None
        ffn = factory()
        conv = None
        if c["use_cnn_module"]:
            conv = ConvolutionModule(d, c["cnn_module_kernel"],
                                     get_activation(c["activation_type"]),
                                     c["cnn_module_norm"], c["causal"],
                                     pad_input=c["cnn_module_pad"] == "input")
        return ConformerEncoderLayer(d, attn, ffn, macaron, conv, c["dropout_rate"],
                                     c["normalize_before"])


ENCODERS = {"conformer": ConformerEncoder, "transformer": TransformerEncoder}
