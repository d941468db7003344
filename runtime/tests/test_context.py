"""Hotword biasing: the context graph's scores against hand computations, phrase
tokenization and its errors, and the CTC prefix beam search recovering a half-heard
phrase with the bonus (and only with it)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from wenet_moe_runtime.context import (ContextError, ContextGraph, ContextLimits,
                                       build_context_graph, load_context_graph, tokenize_phrase)
from wenet_moe_runtime.ctc_search import CtcPrefixBeamSearch, ctc_prefix_beam_search
from wenet_moe_runtime.symbols import SymbolTable

A, B, C, D, E = 2, 3, 4, 5, 6


def walk(graph, tokens):
    """Per-token bonus changes and the final state."""
    state, deltas = graph.root, []
    for tok in tokens:
        delta, state = graph.step(state, tok)
        deltas.append(delta)
    return deltas, state


def test_trie_scores_extend_break_and_complete():
    g = ContextGraph([[A, B, C]], 2.0)
    # A B then D breaks the match: the partial bonus 4 is taken back; D starts nothing.
    deltas, state = walk(g, [A, B, D])
    assert deltas == [2.0, 2.0, -4.0] and state is g.root
    # A B A: the break re-enters the phrase at A (-4 + 2); then B C completes it.
    deltas, state = walk(g, [A, B, A, B, C])
    assert deltas == [2.0, 2.0, -2.0, 2.0, 2.0] and state is g.root
    assert sum(deltas) == 6.0 == g.score_tokens([A, B, A, B, C])
    # An unfinished match at the end is worth nothing.
    deltas, state = walk(g, [A, B])
    assert sum(deltas) + g.finalize(state) == 0.0 == g.score_tokens([A, B])
    # Two occurrences: 6 each.
    assert g.score_tokens([A, B, C, D, A, B, C]) == 12.0


def test_trie_failure_links_and_nested_phrases():
    # Break inside ABCD at E: the failure link of ABC is BC, which continues to BCE.
    g = ContextGraph([[A, B, C, D], [B, C, E]], 1.5)
    deltas, state = walk(g, [A, B, C, E])
    # 3 * 1.5 gained, then node_score(BCE) = 4.5 minus partial(ABC) = 4.5: net 0.
    assert deltas == [1.5, 1.5, 1.5, 0.0] and state is g.root
    assert g.score_tokens([A, B, C, E]) == 4.5  # BCE completed: 3 units
    # A phrase that is a prefix of another keeps its bonus when the longer one breaks.
    g = ContextGraph([[A, B], [A, B, C, D]], 1.0)
    deltas, state = walk(g, [A, B, C, E])
    assert deltas == [1.0, 1.0, 1.0, -1.0]
    assert g.score_tokens([A, B, C, E]) == 2.0
    assert g.score_tokens([A, B, C, D]) == 4.0
    assert g.score_tokens([A, B, C]) == 2.0   # AB secured, C's partial removed
    assert g.num_phrases == 2
    with pytest.raises(ContextError, match="score must be > 0"):
        ContextGraph([[A]], 0.0)


def table(symbols):
    return SymbolTable(["<blank>", "<unk>"] + symbols + ["<sos/eos>"])


def test_tokenize_phrase_char_and_bpe():
    chars = table(["你", "好", "世", "界", "HELLO"])
    assert tokenize_phrase(chars, "你好 世界") == [2, 3, 4, 5]
    assert tokenize_phrase(chars, "你好hello") == [2, 3, 6]
    letters = table(["你", "5", "G"])
    assert tokenize_phrase(letters, "你5g") == [2, 3, 4]
    with pytest.raises(ContextError, match="word '5GX' is not a unit"):
        tokenize_phrase(letters, "5gx")
    with pytest.raises(ContextError, match="character '语'"):
        tokenize_phrase(chars, "你语")
    bpe = table(["\u2581HE", "LLO", "\u2581WORLD", "L", "O", "\u2581"])
    assert tokenize_phrase(bpe, "hello world") == [2, 3, 4]
    with pytest.raises(ContextError, match="'Z'"):
        tokenize_phrase(bpe, "hellz")


def test_phrase_list_errors_name_line_and_bounds(tmp_path):
    sym = table(["你", "好", "世", "界"])
    path = tmp_path / "hot.txt"
    path.write_text("你好\n\n世界\n你们\n", encoding="utf-8")
    with pytest.raises(ContextError, match=rf"{path}: line 4 '你们': character '们'"):
        load_context_graph(sym, str(path), 3.0)
    path.write_text("你好\n世界界界\n", encoding="utf-8")
    with pytest.raises(ContextError, match="line 2 '世界界界' has 4 units, at most 3"):
        load_context_graph(sym, str(path), 3.0, max_len=3)
    with pytest.raises(ContextError, match="3 phrases, at most 2"):
        build_context_graph(sym, ["你", "好", "世"], 3.0, max_phrases=2)
    with pytest.raises(ContextError, match="phrase 1 has 100000 characters, at most 512"):
        build_context_graph(sym, ["你" * 100000], 3.0)
    with pytest.raises(ContextError, match="phrase 2 must be a non-empty string"):
        build_context_graph(sym, ["你", 7], 3.0)
    with pytest.raises(ContextError, match="must be positive"):
        ContextLimits(3.0, 0, 32)
    g = build_context_graph(sym, ["你好", "你好", "世界"], 3.0)
    assert g.num_phrases == 2


def half_heard(vocab=8):
    """Log-posteriors reading 你 好 ? 界 (ids 2 3 ? 5): on the third token's frames
    语 (6) has 0.50 and the spoken 世 (4) 0.40; blanks between tokens."""
    rows = []

    def frame(probs):
        p = np.full(vocab, 1e-4)
        for tok, v in probs.items():
            p[tok] = v
        p[0] += 1.0 - p.sum()
        rows.append(np.log(p))

    for tok in (2, 3, None, 5):
        for _ in range(2):
            frame({tok: 0.9} if tok else {6: 0.5, 4: 0.4})
        frame({0: 0.95})
    return np.stack(rows)


def test_half_heard_phrase_recovered_only_with_bonus():
    lp = half_heard()
    plain = ctc_prefix_beam_search(lp, 10)
    assert plain[0][0] == [2, 3, 6, 5]                      # greedy-like misreading
    margin = plain[0][1] - next(h[1] for h in plain if h[0] == [2, 3, 4, 5])
    assert 0.3 < margin < 1.0                                # a small margin
    g = ContextGraph([[2, 3, 4, 5]], 3.0)
    biased = ctc_prefix_beam_search(lp, 10, context=g)
    assert biased[0][0] == [2, 3, 4, 5]
    # The score of a biased hypothesis is its CTC score plus its bonus (4 units * 3);
    # the CTC part differs by the pruned alignments (each search keeps other prefixes).
    ctc = {tuple(h[0]): h[1] for h in plain}
    assert math.isclose(biased[0][1], ctc[(2, 3, 4, 5)] + 12.0, rel_tol=0, abs_tol=1e-3)
    # A phrase the audio does not support is not forced in; an unrelated one changes nothing.
    for phrases in ([[7, 7, 7, 7]], [[7, 5]]):
        other = ctc_prefix_beam_search(lp, 10, context=ContextGraph(phrases, 3.0))
        assert other[0][0] == [2, 3, 6, 5]
    # Chunked (streaming) search gives the same n-best.
    search = CtcPrefixBeamSearch(10, context=g)
    for start in range(0, lp.shape[0], 3):
        search.advance(lp[start:start + 3])
    assert search.nbest() == biased


# ------------------------------------------------------------------ the server
async def stream_finals(url, samples, start):
    """Stream `samples` (int16) to the server with start message fields `start`;
    return the nbest lists of its final results."""
    import asyncio
    import json

    from websockets.asyncio.client import connect

    async with connect(url) as ws:
        await ws.send(json.dumps({"signal": "start", "nbest": 1, **start}))
        assert json.loads(await ws.recv())["type"] == "server_ready"
        for k in range(0, len(samples), 3200):
            await ws.send(samples[k: k + 3200].tobytes())
            await asyncio.sleep(0)
        await ws.send(json.dumps({"signal": "end"}))
        finals = []
        async for raw in ws:
            msg = json.loads(raw)
            if msg.get("type") == "final_result":
                finals.append(json.loads(msg["nbest"]))
        return finals


def test_server_context_per_connection_and_bad_lists(tiny_exports, test_wavs):
    """Two concurrent streams of one wav: the one whose start message carries a
    context gets the biased result (equal to offline decoding with that context),
    the other the unbiased one. The bonus (1000 per unit) makes the phrase win by a
    margin no acoustic score of the tiny model can match. Bad lists get `failed`
    replies and the connection stays usable."""
    import asyncio
    import json
    from websockets.asyncio.client import connect

    from rt_fixtures import ServerProcess
    from wenet_moe_runtime.decoder import DecodeOptions
    from wenet_moe_runtime.model import OnnxAsrModel
    from wenet_moe_runtime.offline import decode_samples
    from wenet_moe_runtime.wavio import read_wav

    model = OnnxAsrModel(tiny_exports["full"])
    samples, _ = read_wav(test_wavs["u0"])
    graph = build_context_graph(model.symbols, ["语音"], 1000.0)
    plain = decode_samples(model, samples, DecodeOptions())
    biased = decode_samples(model, samples, DecodeOptions(context=graph))
    assert "语音" in biased[0]["sentence"] and "语音" not in plain[0]["sentence"]

    def stream(url, start):
        return stream_finals(url, samples, start)

    async def bad_lists(url):
        replies = []
        async with connect(url) as ws:
            for ctx in ("语音", ["语音", 3], ["a"] * 4, ["你好世界语"], ["你们"]):
                await ws.send(json.dumps({"signal": "start", "context": ctx}))
                replies.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"signal": "start", "context": ["世界"]}))
            replies.append(json.loads(await ws.recv()))
        return replies

    srv = ServerProcess(tiny_exports["full"], ["--context_score", "1000",
                                               "--max_context_phrases", "3",
                                               "--max_context_len", "4"])
    try:
        async def both():
            return await asyncio.gather(stream(srv.url, {"context": ["语音"]}),
                                        stream(srv.url, {}),
                                        stream(srv.url, {"context": []}))
        with_ctx, without, empty = asyncio.run(asyncio.wait_for(both(), 60))
        assert with_ctx == [biased] and without == [plain] and empty == [plain]
        replies = asyncio.run(asyncio.wait_for(bad_lists(srv.url), 60))
    finally:
        assert srv.stop() == 0
    assert all(r["status"] == "failed" for r in replies[:5])
    msgs = [r["message"] for r in replies[:5]]
    assert msgs[0].startswith("Wrong message header: context must be a list of strings")
    assert msgs[1] == "Wrong message header: context: phrase 2 must be a non-empty string, got 3"
    assert msgs[2] == "Wrong message header: context: 4 phrases, at most 3 allowed"
    assert msgs[3] == ("Wrong message header: context: phrase 1 '你好世界语' has 5 units, "
                       "at most 4 allowed")
    assert msgs[4] == ("Wrong message header: context: phrase 1 '你们': "
                       "character '们' is not a unit of units.txt")
    assert replies[5] == {"status": "ok", "type": "server_ready"}


def test_server_with_graph_context_per_connection(tiny_exports, test_wavs, tmp_path):
    """A server whose model directory holds an LM graph: a stream whose start message
    carries a context searches TLG o B (its finals equal offline decoding with that
    context and the graph), while a concurrent stream without context gets the
    unbiased graph result. The bonus (1000 per unit) makes the phrase win by a margin
    no score of the tiny model can match."""
    import asyncio
    import os
    import shutil
    import sys

    from rt_fixtures import ServerProcess
    from wenet_moe_runtime.decoder import DecodeOptions
    from wenet_moe_runtime.model import OnnxAsrModel
    from wenet_moe_runtime.offline import decode_samples
    from wenet_moe_runtime.wavio import read_wav
    from wenet_moe_runtime.wfst import WfstDecoder

    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "tools")
    sys.path.insert(0, tools)
    import make_tlg
    import train_ngram_lm

    export = tmp_path / "export"
    shutil.copytree(tiny_exports["full"], export)
    model = OnnxAsrModel(str(export))
    samples, _ = read_wav(test_wavs["u0"])
    heard = decode_samples(model, samples, DecodeOptions(mode="ctc_prefix_beam"))[0]["sentence"]
    assert heard and "语音" not in heard
    (tmp_path / "text").write_text("\n".join([heard] * 3 + ["语音", heard[:2] + "语音"]) + "\n",
                                   encoding="utf-8")
    assert train_ngram_lm.main(["--text", str(tmp_path / "text"), "--arpa",
                                str(tmp_path / "lm.arpa"), "--order", "2", "--char"]) == 0
    make_tlg.build_tlg(str(export / "units.txt"), str(tmp_path / "lm.arpa"), str(export))
    wfst = WfstDecoder(str(export), model.symbols)
    graph = build_context_graph(model.symbols, ["语音"], 1000.0)
    plain = decode_samples(model, samples, DecodeOptions(wfst=wfst))
    biased = decode_samples(model, samples, DecodeOptions(wfst=wfst, context=graph))
    assert "语音" in biased[0]["sentence"] and "语音" not in plain[0]["sentence"]

    def stream(url, start):
        return stream_finals(url, samples, start)

    srv = ServerProcess(str(export), ["--context_score", "1000"])
    try:
        async def both():
            return await asyncio.gather(stream(srv.url, {"context": ["语音"]}),
                                        stream(srv.url, {}),
                                        stream(srv.url, {"context": ["语音"]}))
        with_ctx, without, again = asyncio.run(asyncio.wait_for(both(), 60))
    finally:
        assert srv.stop() == 0
    assert with_ctx == [biased] and again == [biased] and without == [plain]
    # A graph above --max_context_graph_states refuses per-connection lists (their
    # composition would hold the event loop); the server's own list is unaffected.
    from wenet_moe_runtime.context import ContextLimits
    from wenet_moe_runtime.server import AsrServer, ServerConfig
    states = wfst.graph.num_states
    for bound, ok in ((states, True), (states - 1, False)):
        server = AsrServer(model, ServerConfig(num_workers=1), DecodeOptions(wfst=wfst),
                           ContextLimits(1000.0, max_graph_states=bound))
        try:
            opts, err = server._start_options({"signal": "start", "context": ["语音"]})
            if ok:
                assert err is None and opts.wfst.context is not None and opts.wfst.base is wfst
            else:
                assert opts is None and err == (
                    f"Wrong message header: context: this server's LM graph has {states} states, "
                    f"more than --max_context_graph_states {states - 1} for per-connection hotwords")
            opts, err = server._start_options({"signal": "start"})
            assert err is None and opts.wfst is wfst
        finally:
            server.workers.shutdown()
