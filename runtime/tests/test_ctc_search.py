"""CTC greedy and prefix beam search against brute-force enumeration of alignments."""
import itertools

import numpy as np
import pytest

from wenet_moe_runtime.ctc_search import (CtcPrefixBeamSearch, batch_ctc_greedy_search,
                                          ctc_greedy_search, ctc_prefix_beam_search)


def _random_log_probs(rng, t, v, sharp=1.0):
    x = rng.normal(size=(t, v)) * sharp
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _collapse(path, blank=0):
    out, prev = [], None
    for s in path:
        if s != prev and s != blank:
            out.append(s)
        prev = s
    return tuple(out)


def _brute_force(log_probs, blank=0):
    """Every label sequence's total probability and its best alignment's token times."""
    t, v = log_probs.shape
    totals, best = {}, {}
    for path in itertools.product(range(v), repeat=t):
        lp = sum(log_probs[i, s] for i, s in enumerate(path))
        y = _collapse(path, blank)
        totals[y] = np.logaddexp(totals.get(y, -np.inf), lp)
        if y not in best or lp > best[y][0]:
            best[y] = (lp, path)
    times = {}
    for y, (_, path) in best.items():
        tt, i = [], 0
        while i < t:  # runs of the same symbol in the best path
            j = i
            while j + 1 < t and path[j + 1] == path[i]:
                j += 1
            if path[i] != blank:
                seg = log_probs[i:j + 1, path[i]]
                tt.append(i + int(np.argmax(seg)))
            i = j + 1
        times[y] = tt
    return totals, times


def test_greedy_merges_repeats_and_finds_peaks():
    v = 4
    frames = [0, 2, 2, 2, 0, 2, 3, 3, 0, 1]
    peaks = {2: 2, 5: 5, 6: 7, 9: 9}
    lp = np.full((len(frames), v), np.log(0.1))
    for i, s in enumerate(frames):
        lp[i, s] = np.log(0.6 if i not in peaks.values() else 0.7)
    tokens, times = ctc_greedy_search(lp, blank_id=0)
    assert tokens == [2, 2, 3, 1]
    assert times == [2, 5, 7, 9]


def test_greedy_empty_and_nonzero_blank():
    assert ctc_greedy_search(np.zeros((0, 5))) == ([], [])
    lp = np.log(np.array([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]))
    assert ctc_greedy_search(lp, blank_id=2)[0] == [1, 0]
    with pytest.raises(ValueError, match="2-D"):
        ctc_greedy_search(np.zeros(3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_beam_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    t, v = 5, 3
    lp = _random_log_probs(rng, t, v, sharp=2.0)
    totals, times = _brute_force(lp)
    # Unpruned: beam holds every prefix, every token is considered.
    search = CtcPrefixBeamSearch(beam_size=len(totals), blank_id=0, top_k=v)
    search.advance(lp)
    got = search.scores()
    assert set(got) == set(totals)
    for y, score in totals.items():
        assert got[y] == pytest.approx(score, abs=1e-9)
    hyps = search.nbest()
    best_y = max(totals, key=totals.get)
    assert tuple(hyps[0][0]) == best_y
    for tokens, score, tt in hyps:
        assert tt == times[tuple(tokens)], tokens
    # Pruned beam: the best hypothesis of a beam of 3 is still a valid prefix whose
    # score is its exact total probability (no pruning happened inside it here).
    top = ctc_prefix_beam_search(lp, beam_size=3, top_k=v)
    assert len(top) == 3
    assert [h[1] for h in top] == sorted([h[1] for h in top], reverse=True)


def test_beam_one_equals_greedy():
    rng = np.random.default_rng(7)
    for _ in range(20):
        lp = _random_log_probs(rng, 30, 6, sharp=4.0)
        # Make frames peaky so that greedy and beam-1 must agree.
        greedy_tokens, greedy_times = ctc_greedy_search(lp)
        hyp = ctc_prefix_beam_search(lp, beam_size=1)
        assert len(hyp) == 1
        assert hyp[0][0] == greedy_tokens
        assert hyp[0][2] == greedy_times


def test_incremental_advance_equals_one_shot():
    rng = np.random.default_rng(3)
    lp = _random_log_probs(rng, 37, 8, sharp=3.0)
    one = ctc_prefix_beam_search(lp, beam_size=4)
    inc = CtcPrefixBeamSearch(beam_size=4)
    for start in range(0, 37, 5):
        inc.advance(lp[start:start + 5])
    assert inc.num_frames == 37
    got = inc.nbest()
    assert [h[0] for h in got] == [h[0] for h in one]
    assert [h[2] for h in got] == [h[2] for h in one]
    np.testing.assert_allclose([h[1] for h in got], [h[1] for h in one], rtol=0, atol=1e-12)
    inc.reset()
    assert inc.nbest() == [([], 0.0, [])]
    inc.advance(lp)
    assert [h[0] for h in inc.nbest()] == [h[0] for h in one]


def test_nonzero_blank_and_errors():
    rng = np.random.default_rng(5)
    lp = _random_log_probs(rng, 4, 3, sharp=2.0)
    # Relabel: blank moved from 0 to 2 must give the relabelled brute-force result.
    perm = [2, 0, 1]  # old index -> new index
    lp2 = np.empty_like(lp)
    lp2[:, perm] = lp
    totals, _ = _brute_force(lp)
    search = CtcPrefixBeamSearch(beam_size=len(totals), blank_id=2, top_k=3)
    search.advance(lp2)
    got = search.scores()
    for y, score in totals.items():
        assert got[tuple(perm[s] for s in y)] == pytest.approx(score, abs=1e-9)
    with pytest.raises(ValueError, match="beam_size"):
        CtcPrefixBeamSearch(0)
    with pytest.raises(ValueError, match="blank_id 5"):
        CtcPrefixBeamSearch(2, blank_id=5).advance(lp)


def test_batch_greedy_respects_lengths():
    rng = np.random.default_rng(9)
    lp = _random_log_probs(rng, 12, 5).reshape(1, 12, 5).repeat(2, axis=0)
    out = batch_ctc_greedy_search(lp, [12, 6])
    assert out[0] == ctc_greedy_search(lp[0])
    assert out[1] == ctc_greedy_search(lp[1, :6])
