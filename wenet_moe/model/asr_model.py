"""U2++ ASR model: shared encoder, CTC head, attention decoder(s), losses, decoding
and the TorchScript/ONNX export API (WeNet's method names)."""
from __future__ import annotations

import importlib.util
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from wenet_moe.model.ctc import CTC
from wenet_moe.model.masks import make_non_pad_mask
from wenet_moe.model.label_smoothing import LabelSmoothingLoss

# model -> (encoder_out_lens, text_lengths or None) of its last forward/decode, so
# that expert_load() can leave padding out (kept outside the module: TorchScript).
_LAST_LENGTHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

DECODE_METHODS = ("ctc_greedy_search", "ctc_prefix_beam_search", "attention",
                  "attention_rescoring", "ctc_wfst", "ctc_wfst_rescoring")


def _moe_module():
    """wenet_moe.layers.moe if it exists (dense models work without it)."""
    if importlib.util.find_spec("wenet_moe.layers.moe") is None:
        return None
    return importlib.import_module("wenet_moe.layers.moe")


class ASRModel(nn.Module):
    """CTC + attention encoder-decoder (U2++).

    Args:
        vocab_size: V (`output_dim`).
        encoder: ConformerEncoder / TransformerEncoder (INTERNALS.md interface).
        decoder: TransformerDecoder or BiTransformerDecoder.
        ctc: CTC head.
        ctc_weight: weight of the CTC loss in [0, 1].
        ignore_id: padding value of targets.
        reverse_weight: weight of the right-to-left decoder loss in [0, 1].
        lsm_weight: label smoothing of the attention loss.
        length_normalized_loss: attention loss per token (True) or per utterance.
        special_tokens: may hold '<sos>' and '<eos>' ids (default V-1 for both).
    """

    def __init__(self, vocab_size: int, encoder: nn.Module, decoder: nn.Module, ctc: CTC,
                 ctc_weight: float = 0.5, ignore_id: int = -1, reverse_weight: float = 0.0,
                 lsm_weight: float = 0.0, length_normalized_loss: bool = False,
                 special_tokens: Optional[Dict[str, int]] = None):
        super().__init__()
        if not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"model_conf.ctc_weight must be in [0, 1], got {ctc_weight}")
        if not 0.0 <= reverse_weight <= 1.0:
            raise ValueError(f"model_conf.reverse_weight must be in [0, 1], got {reverse_weight}")
        bidirectional = hasattr(decoder, "right_decoder")
        if reverse_weight > 0.0 and not bidirectional:
            raise ValueError("model_conf.reverse_weight > 0 needs decoder: bitransformer")
        special_tokens = special_tokens or {}
        self.vocab_size = vocab_size
        self.sos = int(special_tokens.get("<sos>", vocab_size - 1))
        self.eos = int(special_tokens.get("<eos>", vocab_size - 1))
        for name, idx in (("<sos>", self.sos), ("<eos>", self.eos)):
            if not 0 <= idx < vocab_size:
                raise ValueError(f"special token {name} id {idx} outside vocabulary of size {vocab_size}")
        self.ignore_id = ignore_id
        self.ctc_weight = ctc_weight
        self.reverse_weight = reverse_weight
        self.bidirectional = bidirectional
        self.blank_id = ctc.blank_id
        self.encoder = encoder
        self.decoder = decoder
        self.ctc = ctc
        self.criterion_att = LabelSmoothingLoss(vocab_size, ignore_id, lsm_weight,
                                                length_normalized_loss)

    # ------------------------------------------------------------------ training
    @torch.jit.unused
    def forward(self, speech: torch.Tensor, speech_lengths: torch.Tensor, text: torch.Tensor,
                text_lengths: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Losses of one batch.

        Args:
            speech: (B, T, F) features; speech_lengths: (B,).
            text: (B, L) token ids padded with ignore_id; text_lengths: (B,).
        Returns:
            dict with `loss` (total, including weighted MoE auxiliary losses),
            `loss_ctc`, `loss_att` (zero tensors when their weight makes them
            unused), `th_accuracy` (token accuracy of the left-to-right decoder)
            and one unweighted entry per MoE auxiliary loss.
        """
        encoder_out, encoder_mask = self.encoder(speech, speech_lengths)
        encoder_out_lens = encoder_mask.squeeze(1).sum(1)
        _LAST_LENGTHS[self] = (encoder_out_lens.detach(), text_lengths.detach())
        zero = encoder_out.new_zeros(())
        loss_ctc, loss_att, acc = zero, zero, zero
        if self.ctc_weight > 0.0:
            loss_ctc, _ = self.ctc(encoder_out, encoder_out_lens, text, text_lengths)
        if self.ctc_weight < 1.0:
            loss_att, acc = self._calc_att_loss(encoder_out, encoder_mask, text, text_lengths)
        loss = self.ctc_weight * loss_ctc + (1.0 - self.ctc_weight) * loss_att
        out = {"loss_ctc": loss_ctc, "loss_att": loss_att, "th_accuracy": acc}
        moe = _moe_module()
        if moe is not None:
            for name, (value, weight) in moe.moe_aux_losses(
                    self, encoder_out_lens, text, text_lengths).items():
                out[name] = value
                loss = loss + weight * value
        out["loss"] = loss
        return out

    @torch.jit.unused
    def attention_targets(self, text: torch.Tensor, text_lengths: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder inputs/outputs for teacher forcing, shapes (B, L+1).

        Returns (ys_in, ys_out, r_ys_in, r_ys_out): inputs start with <sos> and are
        padded with <eos>; outputs end with <eos> and are padded with ignore_id;
        the r_ versions hold each sequence reversed.
        """
        batch = text.size(0)
        ys = text.masked_fill(~make_non_pad_mask(text_lengths, text.size(1)), self.eos)
        sos = torch.full((batch, 1), self.sos, dtype=ys.dtype, device=ys.device)
        ys_in = torch.cat([sos, ys], dim=1)
        r_ys_in = self.reverse_hyps(ys_in, text_lengths + 1)
        keep = make_non_pad_mask(text_lengths + 1, ys_in.size(1))
        eos = torch.full((batch, 1), self.eos, dtype=ys.dtype, device=ys.device)
        ys_out = torch.cat([ys_in[:, 1:], eos], dim=1).masked_fill(~keep, self.ignore_id)
        r_ys_out = torch.cat([r_ys_in[:, 1:], eos], dim=1).masked_fill(~keep, self.ignore_id)
        return ys_in, ys_out, r_ys_in, r_ys_out

    @torch.jit.unused
    def _calc_att_loss(self, encoder_out: torch.Tensor, encoder_mask: torch.Tensor,
                       text: torch.Tensor, text_lengths: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        ys_in, ys_out, r_ys_in, r_ys_out = self.attention_targets(text, text_lengths)
        l_logits, r_logits, _ = self.decoder(encoder_out, encoder_mask, ys_in, text_lengths + 1,
                                             r_ys_in, self.reverse_weight)
        loss = self.criterion_att(l_logits, ys_out)
        if self.reverse_weight > 0.0:
            loss = (1.0 - self.reverse_weight) * loss \
                + self.reverse_weight * self.criterion_att(r_logits, r_ys_out)
        valid = ys_out != self.ignore_id
        correct = (l_logits.argmax(-1) == ys_out) & valid
        acc = correct.sum().float() / valid.sum().clamp_min(1).float()
        return loss, acc.detach()

    # ------------------------------------------------------------------ decoding
    @torch.jit.unused
    def encode(self, speech: torch.Tensor, speech_lengths: torch.Tensor,
               decoding_chunk_size: int = -1, num_decoding_left_chunks: int = -1,
               simulate_streaming: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, T', D) and mask bool (B, 1, T') for decoding.

        `simulate_streaming` with decoding_chunk_size > 0 runs each utterance chunk
        by chunk with caches (as the runtime does) instead of with a chunk mask.
        """
        if not (simulate_streaming and decoding_chunk_size > 0):
            return self.encoder(speech, speech_lengths, decoding_chunk_size,
                                num_decoding_left_chunks)
        outs: List[torch.Tensor] = []
        for b in range(speech.size(0)):
            xs = speech[b:b + 1, : int(speech_lengths[b])]
            out = self.encoder.forward_chunk_by_chunk(xs, decoding_chunk_size,
                                                      num_decoding_left_chunks)
            outs.append((out[0] if isinstance(out, tuple) else out)[0])
        lens = torch.tensor([o.size(0) for o in outs], device=speech.device)
        out = nn.utils.rnn.pad_sequence(outs, batch_first=True)
        return out, make_non_pad_mask(lens, out.size(1)).unsqueeze(1)

    @torch.jit.unused
    def decode_results(self, methods: List[str], speech: torch.Tensor,
                       speech_lengths: torch.Tensor, beam_size: int = 10,
                       decoding_chunk_size: int = -1, num_decoding_left_chunks: int = -1,
                       ctc_weight: float = 0.3, reverse_weight: float = 0.5,
                       simulate_streaming: bool = False, context=None, wfst=None):
        """Like `decode`, but returns {method: [DecodeResult]} with scores, token
        times (encoder frames, CTC-based methods) and the n-best lists."""
        from wenet_moe.decode import search
        unknown = [m for m in methods if m not in DECODE_METHODS]
        if unknown:
            raise ValueError(f"unknown decoding method '{unknown[0]}' (choose from "
                             f"{', '.join(DECODE_METHODS)})")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if wfst is None and {"ctc_wfst", "ctc_wfst_rescoring"} & set(methods):
            raise ValueError("ctc_wfst decoding needs a graph (wfst=WfstDecoder of TLG.fst)")
        if not self.bidirectional:
            reverse_weight = 0.0
        with torch.no_grad():
            encoder_out, encoder_mask = self.encode(speech, speech_lengths, decoding_chunk_size,
                                                    num_decoding_left_chunks, simulate_streaming)
            encoder_lens = encoder_mask.squeeze(1).sum(1)
            _LAST_LENGTHS[self] = (encoder_lens, None)
            ctc_logp = self.ctc.log_softmax(encoder_out)
            results = {}
            prefix = None
            if "ctc_prefix_beam_search" in methods or "attention_rescoring" in methods:
                prefix = search.ctc_prefix_beam(ctc_logp, encoder_lens, beam_size, self.blank_id,
                                                context=context)
            for method in methods:
                if method == "ctc_greedy_search":
                    results[method] = search.ctc_greedy(ctc_logp, encoder_lens, self.blank_id)
                elif method == "ctc_prefix_beam_search":
                    results[method] = prefix
                elif method == "attention":
                    results[method] = search.attention_beam_search(
                        self.decoder, encoder_out, encoder_mask, beam_size, self.sos, self.eos)
                elif method == "attention_rescoring":
                    results[method] = search.attention_rescoring(
                        self, prefix, encoder_out, encoder_mask, ctc_weight, reverse_weight)
                elif method == "ctc_wfst":
                    results[method] = search.ctc_wfst(ctc_logp, encoder_lens, wfst, context=context)
                else:
                    nbest = search.ctc_wfst(ctc_logp, encoder_lens, wfst, nbest=True, context=context)
                    results[method] = search.attention_rescoring(
                        self, nbest, encoder_out, encoder_mask, ctc_weight, reverse_weight)
        return results

    @torch.jit.unused
    def decode(self, methods: List[str], speech: torch.Tensor, speech_lengths: torch.Tensor,
               beam_size: int = 10, decoding_chunk_size: int = -1,
               num_decoding_left_chunks: int = -1, ctc_weight: float = 0.3,
               reverse_weight: float = 0.5, simulate_streaming: bool = False,
               context=None, wfst=None) -> Dict[str, List[List[int]]]:
        """Decode a batch: {method: [token ids per utterance]}.

        Args:
            methods: any of ctc_greedy_search, ctc_prefix_beam_search, attention,
                attention_rescoring, ctc_wfst (TLG graph search), ctc_wfst_rescoring
                (attention rescoring of the graph's n-best).
            speech: (B, T, F); speech_lengths: (B,).
            beam_size: beam of the prefix and attention searches.
            decoding_chunk_size: -1 full context, > 0 chunk size in encoder frames.
            num_decoding_left_chunks: left chunks seen (-1 all).
            ctc_weight: weight of the CTC score in attention rescoring.
            reverse_weight: weight of the right-to-left decoder in rescoring (ignored
                without a bidirectional decoder).
            simulate_streaming: encode chunk by chunk with caches.
            context: hotwords (`wenet_moe_runtime.context.ContextGraph`) biasing the CTC
                prefix beam search (and so the n-best that attention rescoring ranks).
            wfst: `wenet_moe_runtime.wfst.WfstDecoder` for the ctc_wfst methods.
        """
        res = self.decode_results(methods, speech, speech_lengths, beam_size,
                                  decoding_chunk_size, num_decoding_left_chunks, ctc_weight,
                                  reverse_weight, simulate_streaming, context, wfst)
        return {m: [r.tokens for r in rs] for m, rs in res.items()}

    # ------------------------------------------------------------------ export API
    @torch.jit.export
    def subsampling_rate(self) -> int:
        return int(self.encoder.embed.subsampling_rate)

    @torch.jit.export
    def right_context(self) -> int:
        return int(self.encoder.embed.right_context)

    @torch.jit.export
    def sos_symbol(self) -> int:
        return self.sos

    @torch.jit.export
    def eos_symbol(self) -> int:
        return self.eos

    @torch.jit.export
    def is_bidirectional_decoder(self) -> bool:
        return self.bidirectional

    @torch.jit.export
    def forward_encoder_chunk(self, xs: torch.Tensor, offset: int, required_cache_size: int,
                              att_cache: torch.Tensor = torch.zeros(0, 0, 0, 0),
                              cnn_cache: torch.Tensor = torch.zeros(0, 0, 0, 0)
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming chunk: xs (1, T, F) -> (out (1, T', D), att_cache, cnn_cache);
        cache shapes as WeNet (see encoder.forward_chunk)."""
        return self.encoder.forward_chunk(xs, offset, required_cache_size, att_cache, cnn_cache)

    @torch.jit.export
    def batch_forward_encoder(self, xs: torch.Tensor, xs_lens: torch.Tensor,
                              decoding_chunk_size: int = -1, num_decoding_left_chunks: int = -1
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Whole utterances: xs (B, T, F), xs_lens (B,) -> (encoder_out (B, T', D),
        encoder_out_lens (B,) int64); chunk arguments as in `decode`."""
        out, mask = self.encoder(xs, xs_lens, decoding_chunk_size, num_decoding_left_chunks)
        return out, mask.squeeze(1).sum(1).to(torch.int64)

    @torch.jit.export
    def batch_ctc_log_probs(self, xs: torch.Tensor, xs_lens: torch.Tensor
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Offline CTC model (sherpa-onnx `model.onnx` shape): features (B, T, F),
        (B,) -> (log_probs (B, T', V), log_probs_lens (B,) int64), full context."""
        out, lens = self.batch_forward_encoder(xs, xs_lens, -1, -1)
        return self.ctc.log_softmax(out), lens

    @torch.jit.export
    def ctc_activation(self, xs: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, T, D) -> CTC log-posteriors (B, T, V)."""
        return self.ctc.log_softmax(xs)

    @torch.jit.export
    def reverse_hyps(self, hyps: torch.Tensor, hyps_lens: torch.Tensor) -> torch.Tensor:
        """Right-to-left decoder inputs: hyps (N, L) = <sos> y_1..y_n (padded), hyps_lens
        (N,) = n + 1 -> (N, L) = <sos> y_n..y_1, padded with <eos>. Uses gather/where
        (no pad_sequence) so that it exports to ONNX."""
        max_len = hyps.size(1)
        n = (hyps_lens - 1).unsqueeze(1)  # (N, 1) tokens per hypothesis
        pos = torch.arange(max_len - 1, device=hyps.device).unsqueeze(0)  # (1, L-1)
        src = (n - pos).clamp(min=0, max=max_len - 1)
        rev = torch.gather(hyps, 1, src)
        rev = torch.where(pos < n, rev, torch.full_like(rev, self.eos))
        return torch.cat([torch.full_like(hyps[:, :1], self.sos), rev], dim=1)

    @torch.jit.export
    def forward_attention_decoder(self, hyps: torch.Tensor, hyps_lens: torch.Tensor,
                                  encoder_out: torch.Tensor, reverse_weight: float = 0.0
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decoder log-probabilities for N hypotheses of one utterance.

        Args:
            hyps: (N, L) ids, <sos> first, any padding; hyps_lens: (N,) lengths
                including <sos>.
            encoder_out: (1, T, D).
            reverse_weight: the right-to-left decoder runs only when > 0.
        Returns:
            (l2r (N, L, V), r2l (N, L, V)) log-probabilities; r2l holds zeros when
            the decoder is unidirectional or reverse_weight is 0. Position j of r2l
            predicts the token after <sos> y_n .. y_{n-j+1}.
        """
        pos = torch.arange(hyps.size(1), device=hyps.device).unsqueeze(0)
        hyps = torch.where(pos < hyps_lens.unsqueeze(1), hyps, torch.full_like(hyps, self.eos))
        # one memory row for all N hypotheses (DecoderLayer): its keys and values are
        # projected once per layer, not N times
        memory = encoder_out
        memory_mask = torch.ones(memory.size(0), 1, memory.size(1), dtype=torch.bool,
                                 device=memory.device)
        r_hyps = self.reverse_hyps(hyps, hyps_lens)
        l_logits, r_logits, _ = self.decoder(memory, memory_mask, hyps, hyps_lens, r_hyps,
                                             reverse_weight)
        l_logp = torch.log_softmax(l_logits, dim=-1)
        if self.bidirectional and reverse_weight > 0.0:
            r_logp = torch.log_softmax(r_logits, dim=-1)
        else:
            r_logp = torch.zeros_like(l_logp)
        return l_logp, r_logp

    @torch.jit.export
    def forward_attention_decoder_tree(self, tokens: torch.Tensor, depth: torch.Tensor,
                                       ancestors: torch.Tensor, r_tokens: torch.Tensor,
                                       r_depth: torch.Tensor, r_ancestors: torch.Tensor,
                                       encoder_out: torch.Tensor
                                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decoder log-probabilities of the prefix trees of n-best lists (one tree per
        utterance; `wenet_moe_runtime.prefix_tree`): each distinct prefix is decoded
        once, however many hypotheses share it.

        Args:
            tokens, depth: (M, P) int64; ancestors: bool (M, P, P): the left-to-right
                trees (`TransformerDecoder.forward_prefix_tree`).
            r_tokens, r_depth, r_ancestors: (M, P_r) / (M, P_r, P_r): the trees of the
                reversed hypotheses (right-to-left decoder).
            encoder_out: (M, T, D), row m the utterance of tree m (all T frames valid).
        Returns:
            (l2r (M, P, V), r2l (M, P_r, V)) log-probabilities; r2l holds zeros when
            the decoder is unidirectional.
        """
        memory_mask = torch.ones(encoder_out.size(0), 1, encoder_out.size(1), dtype=torch.bool,
                                 device=encoder_out.device)
        l_logits, r_logits = self.decoder.forward_prefix_trees(
            encoder_out, memory_mask, tokens, depth, ancestors, r_tokens, r_depth, r_ancestors)
        l_logp = torch.log_softmax(l_logits, dim=-1)
        if self.bidirectional:
            r_logp = torch.log_softmax(r_logits, dim=-1)
        else:
            r_logp = torch.zeros(r_tokens.size(0), r_tokens.size(1), l_logp.size(2),
                                 dtype=l_logp.dtype, device=l_logp.device)
        return l_logp, r_logp

    @torch.jit.unused
    def expert_load(self) -> Dict[str, torch.Tensor]:
        """{MoE layer name: int64 (n_expert,) assignments per expert} of the last
        forward or decode ({} if dense); padding frames are left out (decoder
        layers during decoding count every hypothesis position)."""
        moe = _moe_module()
        if moe is None:
            return {}
        enc_lens, text_lens = _LAST_LENGTHS.get(self, (None, None))
        return moe.expert_load(self, enc_lens, text_lens)
