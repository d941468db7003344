"""Decoding searches of the toolkit.

CTC searches are the runtime's numpy implementation (`wenet_moe_runtime.ctc_search`),
so that offline decoding and the streaming server cannot drift apart; this module
adds the torch side: batched attention beam search with decoder self-attention
caches, and attention rescoring of CTC n-best lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import torch

from wenet_moe.model.masks import subsequent_mask
from wenet_moe_runtime.ctc_search import ctc_greedy_search, ctc_prefix_beam_search
from wenet_moe_runtime.prefix_tree import build_prefix_trees


@dataclass
class DecodeResult:
    """One utterance's result.

    tokens: best hypothesis; score: its log score (method-specific); times: encoder
    frame of each token's CTC peak (empty for `attention`); nbest / nbest_scores /
    nbest_times: all candidates, best first.
    """
    tokens: List[int]
    score: float = 0.0
    times: List[int] = field(default_factory=list)
    nbest: List[List[int]] = field(default_factory=list)
    nbest_scores: List[float] = field(default_factory=list)
    nbest_times: List[List[int]] = field(default_factory=list)


def _utterance_log_probs(ctc_log_probs: torch.Tensor, lens: torch.Tensor) -> List[np.ndarray]:
    lp = ctc_log_probs.detach().to("cpu", torch.float64).numpy()
    return [lp[b, : int(n)] for b, n in enumerate(lens.tolist())]


def ctc_greedy(ctc_log_probs: torch.Tensor, lens: torch.Tensor, blank_id: int = 0
               ) -> List[DecodeResult]:
    """Greedy CTC search per utterance; ctc_log_probs (B, T, V), lens (B,)."""
    out = []
    for lp in _utterance_log_probs(ctc_log_probs, lens):
        tokens, times = ctc_greedy_search(lp, blank_id)
        score = float(lp.max(axis=1).sum()) if lp.shape[0] else 0.0
        out.append(DecodeResult(tokens, score, times, [tokens], [score], [times]))
    return out


def ctc_prefix_beam(ctc_log_probs: torch.Tensor, lens: torch.Tensor, beam_size: int,
                    blank_id: int = 0, context=None) -> List[DecodeResult]:
    """CTC prefix beam search per utterance; scores are total CTC log probabilities
    (plus the hotword bonus with a `wenet_moe_runtime.context.ContextGraph`)."""
    out = []
    for lp in _utterance_log_probs(ctc_log_probs, lens):
        hyps = ctc_prefix_beam_search(lp, beam_size, blank_id, context=context)
        out.append(DecodeResult(hyps[0][0], hyps[0][1], hyps[0][2], [h[0] for h in hyps],
                                [h[1] for h in hyps], [h[2] for h in hyps]))
    return out


def ctc_wfst(ctc_log_probs: torch.Tensor, lens: torch.Tensor, wfst, nbest: bool = False,
             context=None) -> List[DecodeResult]:
    """TLG graph search per utterance (`wenet_moe_runtime.wfst.WfstDecoder`): the
    1-best (FasterDecoder) or, with `nbest`, the lattice's distinct word sequences.
    Scores are acoustic_scale * CTC + LM log-probabilities; an utterance where no
    path reached a final state gets an empty hypothesis. With hotwords (`context`)
    the search runs on TLG o B(context) (`WfstDecoder.for_context`), as the runtime
    does: scores then include the bonus of completed phrases."""
    wfst = wfst.for_context(context)
    out = []
    for lp in _utterance_log_probs(ctc_log_probs, lens):
        hyps = [(h.tokens, h.score, h.times)
                for h in (wfst.decode_nbest(lp) if nbest else wfst.decode(lp))]
        if not hyps:
            out.append(DecodeResult([], float("-inf"), [], [[]], [float("-inf")], [[]]))
            continue
        out.append(DecodeResult(hyps[0][0], hyps[0][1], hyps[0][2], [h[0] for h in hyps],
                                [h[1] for h in hyps], [h[2] for h in hyps]))
    return out


def attention_beam_search(decoder: torch.nn.Module, encoder_out: torch.Tensor,
                          encoder_mask: torch.Tensor, beam_size: int, sos: int, eos: int,
                          max_steps: int = 0) -> List[DecodeResult]:
    """Left-to-right beam search, batched over utterances and beams.

    Args:
        decoder: has `forward_one_step(memory, memory_mask, tgt, tgt_mask, cache)`.
        encoder_out: (B, T, D); encoder_mask: bool (B, 1, T).
        beam_size: hypotheses kept per utterance.
        max_steps: 0 (default): an utterance stops after as many steps as it has
            encoder frames, so each result equals decoding the utterance alone;
            > 0: every utterance runs this many steps (WeNet's rule is the padded
            length T, which makes a result depend on the rest of the batch).
    Returns:
        per utterance the hypothesis with the best log probability (including <eos>
        once it ended).
    """
    batch, max_t = encoder_out.size(0), encoder_out.size(1)
    device = encoder_out.device
    n = batch * beam_size
    # hypotheses are utterance-major (row b * beam_size + j): each utterance's encoder
    # output serves its beams as one memory row (DecoderLayer), projected once per step
    if max_steps > 0:
        steps = torch.full((n, 1), max_steps, dtype=torch.long, device=device)
    else:
        steps = encoder_mask.squeeze(1).sum(1).repeat_interleave(beam_size).view(n, 1)
    max_t_steps = max(max_t, max_steps)
    hyps = torch.full((n, 1), sos, dtype=torch.long, device=device)
    first = torch.full((beam_size,), float("-inf"), device=device)
    first[0] = 0.0
    scores = first.repeat(batch).view(n, 1)
    ended = torch.zeros(n, 1, dtype=torch.bool, device=device)
    cache: List[torch.Tensor] = []
    base = (torch.arange(batch, device=device) * beam_size).unsqueeze(1)  # (B, 1)
    for step in range(1, max_t_steps + 1):
        ended = ended | (steps < step)
        if bool(ended.all()):
            break
        tgt_mask = subsequent_mask(step, device).unsqueeze(0).expand(n, step, step)
        logp, cache = decoder.forward_one_step(encoder_out, encoder_mask, hyps, tgt_mask, cache)
        vocab = logp.size(1)
        # An ended hypothesis can only "emit" <eos> again, at no cost.
        only_eos = torch.full((vocab,), float("-inf"), device=device)
        only_eos[eos] = 0.0
        logp = torch.where(ended, only_eos.unsqueeze(0), logp)
        k = min(beam_size, vocab)
        top_logp, top_ids = logp.topk(k, dim=1)  # (n, k)
        cand = (scores + top_logp).view(batch, beam_size * k)
        new_scores, pos = cand.topk(beam_size, dim=1)  # (B, beam)
        src = (base + torch.div(pos, k, rounding_mode="floor")).view(n)
        tokens = top_ids.view(batch, beam_size * k).gather(1, pos).view(n, 1)
        hyps = torch.cat([hyps[src], tokens], dim=1)
        cache = [c[src] for c in cache]
        ended = ended[src] | (tokens == eos)
        steps = steps[src]
        scores = new_scores.view(n, 1)
    scores = scores.view(batch, beam_size)
    hyps = hyps.view(batch, beam_size, -1)
    results = []
    for b in range(batch):
        order = torch.argsort(scores[b], descending=True).tolist()
        nbest, nbest_scores = [], []
        for j in order:
            if scores[b, j].item() == float("-inf"):
                continue
            seq = hyps[b, j, 1:].tolist()
            if eos in seq:
                seq = seq[: seq.index(eos)]
            nbest.append(seq)
            nbest_scores.append(float(scores[b, j]))
        results.append(DecodeResult(nbest[0], nbest_scores[0], [], nbest, nbest_scores,
                                    [[] for _ in nbest]))
    return results


def decoder_scores(model: torch.nn.Module, hyps: Sequence[Sequence[int]], utt_index: Sequence[int],
                   encoder_out: torch.Tensor, encoder_mask: torch.Tensor, reverse_weight: float
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decoder log probabilities of whole hypotheses, batched.

    Each utterance's hypotheses become one prefix tree (`build_prefix_trees`; the
    right-to-left decoder gets the tree of the reversed ones), so a prefix shared by
    several hypotheses is decoded once, and the trees of all utterances run in one
    decoder call over their own encoder outputs.

    Args:
        model: ASRModel (uses decoder, sos/eos, bidirectional).
        hyps: N token sequences (no <sos>/<eos>); utt_index: (N,) their utterance.
        encoder_out: (B, T, D); encoder_mask: bool (B, 1, T).
        reverse_weight: the right-to-left scores are computed only when > 0.
    Returns:
        (l2r (N,), r2l (N,)): sum of log p(token) over the hypothesis plus
        log p(<eos>) at its end; r2l is zeros when not computed.
    """
    device = encoder_out.device
    num = len(hyps)
    if num == 0:
        empty = torch.zeros(0, device=device)
        return empty, empty
    utts = sorted(set(int(u) for u in utt_index))
    slot = {u: i for i, u in enumerate(utts)}
    tree_of = [slot[int(u)] for u in utt_index]
    memory = encoder_out[torch.tensor(utts, dtype=torch.long, device=device)]
    memory_mask = encoder_mask[torch.tensor(utts, dtype=torch.long, device=device)]
    bidirectional = getattr(model, "bidirectional", False)

    def scores(decoder: torch.nn.Module, reverse: bool) -> torch.Tensor:
        trees = build_prefix_trees(hyps, tree_of, model.sos, model.eos, reverse)
        tokens, depth, ancestors = (torch.from_numpy(a).to(device)
                                    for a in (trees.tokens, trees.depth, trees.ancestors))
        logits = decoder.forward_prefix_tree(memory, memory_mask, tokens, depth, ancestors)
        logp = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.size(-1))
        picked = logp[torch.from_numpy(trees.rows).to(device), torch.from_numpy(trees.targets).to(device)]
        total = torch.zeros(num, dtype=torch.float64, device=device)
        return total.index_add_(0, torch.from_numpy(trees.owner).to(device), picked.double()).float()

    l2r = scores(model.decoder.left_decoder if bidirectional else model.decoder, False)
    if reverse_weight > 0.0 and bidirectional:
        r2l = scores(model.decoder.right_decoder, True)
    else:
        r2l = torch.zeros_like(l2r)
    return l2r, r2l


def attention_rescoring(model: torch.nn.Module, ctc_results: List[DecodeResult],
                        encoder_out: torch.Tensor, encoder_mask: torch.Tensor,
                        ctc_weight: float, reverse_weight: float) -> List[DecodeResult]:
    """Rescore each utterance's CTC n-best with the attention decoder(s), batched over
    all hypotheses of all utterances.

    score = (1 - reverse_weight) * l2r + reverse_weight * r2l + ctc_weight * ctc_score,
    decoder scores including <eos>. Returns the best candidate per utterance, with
    its CTC token times and every candidate's combined score.
    """
    flat, owner = [], []
    for b, res in enumerate(ctc_results):
        flat.extend(res.nbest)
        owner.extend([b] * len(res.nbest))
    if not flat:
        return []
    with torch.no_grad():
        l2r, r2l = decoder_scores(model, flat, owner, encoder_out, encoder_mask, reverse_weight)
    att = ((1.0 - reverse_weight) * l2r + reverse_weight * r2l).tolist()
    out, i = [], 0
    for res in ctc_results:
        combined = [att[i + j] + ctc_weight * res.nbest_scores[j] for j in range(len(res.nbest))]
        i += len(res.nbest)
        order = sorted(range(len(combined)), key=lambda j: combined[j], reverse=True)
        best = order[0]
        out.append(DecodeResult(res.nbest[best], combined[best], res.nbest_times[best],
                                [res.nbest[j] for j in order], [combined[j] for j in order],
                                [res.nbest_times[j] for j in order]))
    return out
