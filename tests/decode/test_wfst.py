"""n-gram LM + TLG graph decoding: the Kneser-Ney estimator's distributions, the
graph search against an independent enumeration (CTC Viterbi + LM), and the LM
overruling a greedy misreading."""
import itertools
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import train_ngram_lm as lmtool  # noqa: E402

UNITS = ["<blank>", "<unk>", "你", "好", "世", "界", "语", "音", "<sos/eos>"]
TOKENS = list(range(2, 8))


def test_kneser_ney_distributions_sum_to_one_and_continuation_counts():
    text = ["a b c", "a b", "b c a", "c a b c", "a c"] + ["y z"] * 6 + \
        ["a w", "b w", "c w", "y w", "q w"]
    sents = [s.split() for s in text]
    for order in (1, 2, 3, 4):
        lm = lmtool.KneserNeyLM(sents, order)
        vocab = [w for w in lm.vocab if w != lmtool.BOS]
        histories = {()}
        for n in range(2, order + 1):
            histories |= {g[:-1] for g in lm.prob[n]}
        for h in histories:
            total = sum(lm.p(h + (w,)) for w in vocab)
            assert abs(total - 1.0) < 1e-9, (order, h, total)
    lm = lmtool.KneserNeyLM(sents, 2)
    # z is frequent (6) but follows only y; w (5) follows five words: KN ranks w
    # far above z as a unigram (continuation counts 5 and 1).
    assert lm.p(("w",)) > 2 * lm.p(("z",))
    assert lm.p(("y", "z")) > 0.5
    with pytest.raises(ValueError, match="reserved word"):
        lmtool.KneserNeyLM([["a", "</s>"]], 2)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    import make_tlg   # needs kaldifst, kaldilm (requirements.txt): a missing one fails
    d = tmp_path_factory.mktemp("graph")
    (d / "units.txt").write_text("".join(f"{s} {i}\n" for i, s in enumerate(UNITS)), encoding="utf-8")
    text = ["你好世界"] * 5 + ["你好", "世界你好", "语音", "你好语音", "音乐世界"]
    (d / "text").write_text("\n".join(text) + "\n", encoding="utf-8")
    assert lmtool.main(["--text", str(d / "text"), "--arpa", str(d / "lm.arpa"),
                        "--order", "3", "--char"]) == 0
    sizes = make_tlg.build_tlg(str(d / "units.txt"), str(d / "lm.arpa"), str(d / "g"))
    assert sizes["dropped_words"] == 1  # 乐 is not a unit
    lm = lmtool.KneserNeyLM([lmtool.split_words(t, True) for t in text], 3)
    return d, lm


def viterbi(lp, seq):
    """Best log-probability of a CTC alignment of `seq` in the compact topology
    (a unit may follow itself without a blank)."""
    n = len(seq)
    neg = -math.inf
    blank = np.full(n + 1, neg)   # i units emitted, in blank
    tok = np.full(n + 1, neg)     # i units emitted, still on unit i-1
    blank[0] = 0.0
    for row in lp:
        nb, nt = np.full(n + 1, neg), np.full(n + 1, neg)
        for i in range(n + 1):
            nb[i] = max(blank[i], tok[i]) + row[0]
            if i > 0:
                nt[i] = max(tok[i] + row[seq[i - 1]],
                            max(blank[i - 1], tok[i - 1]) + row[seq[i - 1]])
        blank, tok = nb, nt
    return max(blank[n], tok[n])


def best_by_enumeration(lp, lm, max_len=4):
    scored = []
    for n in range(max_len + 1):
        for seq in itertools.product(TOKENS, repeat=n):
            ac = viterbi(lp, seq)
            if ac == -math.inf:
                continue
            words = [UNITS[t] for t in seq]
            scored.append((ac + lm.sentence_logprob(words), list(seq)))
    scored.sort(reverse=True)
    return scored


def test_graph_search_equals_enumeration(graph):
    from wenet_moe_runtime.symbols import SymbolTable
    from wenet_moe_runtime.wfst import WfstDecoder, WfstOptions
    d, lm = graph
    sym = SymbolTable.read(str(d / "units.txt"))
    dec = WfstDecoder(str(d / "g"), sym, WfstOptions(beam=30, blank_skip_thresh=2.0))
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(12):
        logits = rng.normal(0, 2.0, (7, len(UNITS)))
        logits[:, [1, 8]] = -30.0  # <unk>, <sos/eos> never emitted
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        ranked = best_by_enumeration(lp, lm)
        if ranked[0][0] - ranked[1][0] < 0.5:
            continue  # too close to call independently of graph approximations
        hyp = dec.decode(lp)[0]
        assert hyp.tokens == ranked[0][1], trial
        # log-semiring determinization may add back-off mass: scores agree closely
        assert abs(hyp.score - ranked[0][0]) < 0.1, (hyp.score, ranked[0][0])
        assert [w for w in hyp.words] == [UNITS[t] for t in hyp.tokens]
        nbest = dec.decode_nbest(lp, 3)
        assert nbest[0].tokens == ranked[0][1]
        assert len({tuple(h.words) for h in nbest}) == len(nbest)
        checked += 1
    assert checked >= 4


def half_heard_world():
    """你 好 [语 0.55 | 世 0.45] 界, blanks between: greedy reads 你好语界."""
    rows = []

    def frame(probs):
        p = np.full(len(UNITS), 1e-4)
        for k, v in probs.items():
            p[k] = v
        p[0] += 1.0 - p.sum()
        rows.append(np.log(p))
    for probs in ({2: 0.9}, {3: 0.9}, {6: 0.55, 4: 0.44}, {5: 0.9}):
        frame(probs)
        frame({0: 0.95})
    return np.stack(rows)


def test_lm_overrules_a_greedy_misreading(graph):
    from wenet_moe_runtime.ctc_search import ctc_greedy_search, ctc_prefix_beam_search
    from wenet_moe_runtime.symbols import SymbolTable
    from wenet_moe_runtime.wfst import WfstDecoder, WfstOptions, words_text
    d, lm = graph
    sym = SymbolTable.read(str(d / "units.txt"))
    lp = half_heard_world()
    assert ctc_greedy_search(lp)[0] == [2, 3, 6, 5]
    assert ctc_prefix_beam_search(lp, 10)[0][0] == [2, 3, 6, 5]
    for skip in (2.0, 0.9):  # without and with blank frame skipping
        hyp = WfstDecoder(str(d / "g"), sym, WfstOptions(blank_skip_thresh=skip)).decode(lp)[0]
        assert hyp.tokens == [2, 3, 4, 5] and words_text(hyp.words) == "你好世界"
        assert hyp.times == [0, 2, 4, 6]   # original frame indices, skipped frames counted
    # The LM's preference is large: 你好世界 beats 你好语界 by several nats.
    assert lm.sentence_logprob(list("你好世界")) - lm.sentence_logprob(list("你好语界")) > 3.0
    # A huge acoustic scale lets the acoustics win again.
    hyp = WfstDecoder(str(d / "g"), sym, WfstOptions(acoustic_scale=50.0)).decode(lp)[0]
    assert hyp.tokens == [2, 3, 6, 5]


def test_graph_tool_errors(graph, tmp_path, capsys):
    import make_tlg
    d, _ = graph
    (tmp_path / "lex.txt").write_text("你好 你 好\n世界 世 外\n", encoding="utf-8")
    assert make_tlg.main(["--units", str(d / "units.txt"), "--arpa", str(d / "lm.arpa"),
                          "--graph_dir", str(tmp_path / "g"), "--lexicon",
                          str(tmp_path / "lex.txt")]) == 1
    assert f"{tmp_path / 'lex.txt'}:2: unit '外' is not in units.txt" in capsys.readouterr().err
    assert not (tmp_path / "g" / "TLG.fst").exists()
    assert make_tlg.main(["--units", str(d / "units.txt"), "--arpa", str(tmp_path / "none.arpa"),
                          "--graph_dir", str(tmp_path / "g")]) == 1
    assert "none.arpa: no such file" in capsys.readouterr().err
    from wenet_moe_runtime.symbols import SymbolTable
    from wenet_moe_runtime.wfst import WfstDecoder, WfstError
    with pytest.raises(WfstError, match="TLG.fst: no such file"):
        WfstDecoder(str(tmp_path), SymbolTable.read(str(d / "units.txt")))


def test_blank_skipping_keeps_repeated_units_apart(graph):
    """世 _ _ 世: skipping the blanks keeps one of them, so the repeat is two units."""
    from wenet_moe_runtime.symbols import SymbolTable
    from wenet_moe_runtime.wfst import WfstDecoder, WfstOptions
    d, _ = graph
    sym = SymbolTable.read(str(d / "units.txt"))
    dec = WfstDecoder(str(d / "g"), sym, WfstOptions(blank_skip_thresh=0.9))
    p = np.full((6, len(UNITS)), 1e-4)
    for t, u in enumerate([4, 0, 0, 4, 0, 5]):
        p[t, u] = 1.0
    lp = np.log(p / p.sum(1, keepdims=True))
    keep, _ = dec.frame_costs(lp)
    assert keep.tolist() == [0, 2, 3, 5]
    assert dec.decode(lp)[0].tokens == [4, 4, 5]


def test_stream_in_chunks_equals_whole_utterance(graph):
    """The incremental search (any chunking, blank skipping across chunk borders)
    gives the whole-utterance 1-best, frame times included."""
    from wenet_moe_runtime.symbols import SymbolTable
    from wenet_moe_runtime.wfst import WfstDecoder, WfstOptions, WfstStream
    d, _ = graph
    sym = SymbolTable.read(str(d / "units.txt"))
    rng = np.random.default_rng(1)
    for skip in (2.0, 0.6):
        dec = WfstDecoder(str(d / "g"), sym, WfstOptions(blank_skip_thresh=skip))
        for trial in range(4):
            logits = rng.normal(0, 2.0, (25, len(UNITS)))
            logits[:, [1, 8]] = -30.0
            logits[rng.random(25) < 0.4, 0] += 6.0   # blank runs to skip
            lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            whole = dec.decode(lp)[0]
            for step in (1, 4, 7):
                stream = WfstStream(dec)
                for s in range(0, 25, step):
                    stream.accept(lp[s:s + step])
                    assert stream.best(final=False) is not None
                got = stream.best(final=True)
                assert (got.tokens, got.times, got.words) == (whole.tokens, whole.times, whole.words)
                assert abs(got.score - whole.score) < 1e-4


def test_hotwords_bias_the_graph_search(graph):
    """Hotwords inside the graph search (TLG o B): the phrase 好语界 that the LM
    dislikes (it loses by ~5.6) wins with a bonus of 3.0 per unit and not with 0.5;
    its score is the unbiased graph score of 你好语界 plus 3 x 3.0; an unfinished or
    broken match earns nothing at the end; the biased search recovers the phrase
    even where the unbiased lattice (lattice beam 1) no longer holds it."""
    from wenet_moe_runtime.context import ContextGraph
    from wenet_moe_runtime.decoder import DecodeOptions, wfst_hyps
    from wenet_moe_runtime.symbols import SymbolTable
    from wenet_moe_runtime.wfst import WfstDecoder, WfstOptions, WfstStream
    d, _ = graph
    sym = SymbolTable.read(str(d / "units.txt"))
    lp = half_heard_world()
    wide = WfstDecoder(str(d / "g"), sym, WfstOptions(lattice_beam=20.0))
    plain = wide.decode(lp)[0]
    assert plain.tokens == [2, 3, 4, 5]
    unbiased = {tuple(h.tokens): h.score for h in wide.decode_nbest(lp, 20)}
    margin = unbiased[(2, 3, 4, 5)] - unbiased[(2, 3, 6, 5)]
    assert 4.0 < margin < 7.0
    for phrases, score, tokens, bonus in (
            ([[3, 6, 5]], 3.0, [2, 3, 6, 5], 9.0),        # recovered: +3 per unit
            ([[3, 6, 5]], 0.5, [2, 3, 4, 5], 0.0),        # bonus 1.5 < margin: not
            ([[3, 6, 5, 7]], 3.0, [2, 3, 4, 5], 0.0),     # unfinished at the end: 9 taken back
            ([[3, 6, 7]], 3.0, [2, 3, 4, 5], 0.0),        # broken by 界: 6 taken back
            ([[2, 3, 6], [6, 5]], 3.0, [2, 3, 6, 5], 9.0),   # 你好语 + (语界 overlaps: not both)
            ([[2, 3], [6, 5]], 3.0, [2, 3, 6, 5], 12.0)):  # two phrases, 2 units each
        ctx = ContextGraph(phrases, score)
        biased = wide.for_context(ctx)
        hyp = biased.decode(lp)[0]
        assert hyp.tokens == tokens, phrases
        assert abs(hyp.score - (unbiased[tuple(tokens)] + bonus)) < 1e-3, (phrases, hyp.score)
        assert ctx.score_tokens(hyp.tokens) == bonus   # the prefix search's trie agrees
    # cached per distinct list; None gives back the base graph
    ctx = ContextGraph([[3, 6, 5]], 3.0)
    biased = wide.for_context(ctx)
    assert wide.for_context(ContextGraph([[3, 6, 5]], 3.0)) is biased
    assert biased.for_context(None) is wide and biased.base is wide
    # Partials of the streaming search are biased: once 界 is read the phrase shows.
    for dec in (wide, biased):
        stream = WfstStream(dec)
        stream.accept(lp[:7])
        assert stream.best(final=False).tokens == ([2, 3, 6, 5] if dec is biased else [2, 3, 4, 5])
    # With a narrow lattice the unbiased n-best lacks 你好语界 (re-ranking it could
    # not recover the phrase); the biased search finds it, for 1-best and n-best.
    narrow = WfstDecoder(str(d / "g"), sym, WfstOptions(lattice_beam=1.0))
    assert (2, 3, 6, 5) not in {tuple(h.tokens) for h in narrow.decode_nbest(lp)}
    for mode in ("ctc_prefix_beam", "attention_rescoring"):
        opts = DecodeOptions(mode=mode, wfst=narrow, context=ctx)
        assert opts.wfst.context is ctx and opts.wfst.base is narrow
        hyps = wfst_hyps(opts, lp)
        assert hyps[0][0] == [2, 3, 6, 5]
        assert abs(hyps[0][1] - (unbiased[(2, 3, 6, 5)] + 9.0)) < 1e-3
        assert wfst_hyps(DecodeOptions(mode=mode, wfst=opts.wfst), lp)[0][0] == [2, 3, 4, 5]


def test_hotword_outside_the_graph_vocabulary(tmp_path):
    """A phrase whose units no word of words.txt spells is an error naming it."""
    import make_tlg
    from wenet_moe_runtime.context import ContextGraph
    from wenet_moe_runtime.decoder import DecodeOptions
    from wenet_moe_runtime.symbols import SymbolTable
    from wenet_moe_runtime.wfst import WfstDecoder, WfstError
    (tmp_path / "units.txt").write_text("".join(f"{s} {i}\n" for i, s in enumerate(UNITS)),
                                        encoding="utf-8")
    (tmp_path / "text").write_text("你好世界\n世界你好\n", encoding="utf-8")
    assert lmtool.main(["--text", str(tmp_path / "text"), "--arpa", str(tmp_path / "lm.arpa"),
                        "--order", "2", "--char"]) == 0
    make_tlg.build_tlg(str(tmp_path / "units.txt"), str(tmp_path / "lm.arpa"), str(tmp_path / "g"))
    sym = SymbolTable.read(str(tmp_path / "units.txt"))
    dec = WfstDecoder(str(tmp_path / "g"), sym)
    with pytest.raises(WfstError, match=r"hotword '世界语音': no word of .*words.txt spells "
                                        r"its units from '语音' on"):
        DecodeOptions(mode="ctc_prefix_beam", wfst=dec, context=ContextGraph([[4, 5, 6, 7]], 3.0))
