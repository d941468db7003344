"""Decoding: batched == per utterance, attention beam search and rescoring checked
against scores computed here step by step with the decoders."""
import numpy as np
import pytest
import torch

from wenet_moe.decode.search import attention_beam_search, decoder_scores
from wenet_moe.model import build_model
from wenet_moe.model.masks import subsequent_mask
from wenet_moe_runtime.ctc_search import ctc_prefix_beam_search

METHODS = ["ctc_greedy_search", "ctc_prefix_beam_search", "attention", "attention_rescoring"]
V = 9


def tiny_model(seed=0, decoder="bitransformer", mlp_type="position_wise_feed_forward", **model_conf):
    torch.manual_seed(seed)
    conf = {
        "input_dim": 12, "output_dim": V,
        "encoder": "conformer",
        "encoder_conf": {"output_size": 16, "attention_heads": 2, "linear_units": 24,
                         "num_blocks": 2, "cnn_module_kernel": 3, "causal": True,
                         "use_dynamic_chunk": True, "cnn_module_norm": "layer_norm",
                         "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
                         "attention_dropout_rate": 0.0, "mlp_type": mlp_type,
                         "n_expert": 3, "n_expert_activated": 2},
        "decoder": decoder,
        "decoder_conf": {"attention_heads": 2, "linear_units": 24, "num_blocks": 2,
                         "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
                         "mlp_type": mlp_type, "n_expert": 3, "n_expert_activated": 2},
        "model_conf": dict({"ctc_weight": 0.3, "reverse_weight": 0.3 if decoder == "bitransformer" else 0.0}, **model_conf),
    }
    if decoder == "bitransformer":
        conf["decoder_conf"]["r_num_blocks"] = 1
    return build_model(conf).eval()


def _batch(seed=1, lens=(61, 45, 30)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lens), max(lens), 12, generator=g)
    for i, n in enumerate(lens):
        x[i, n:] = 0.0
    return x, torch.tensor(lens)


@pytest.mark.parametrize("chunk,mlp_type", [(-1, "position_wise_feed_forward"),
                                            (4, "position_wise_feed_forward"), (-1, "moe")])
def test_batched_decoding_equals_one_by_one(chunk, mlp_type):
    model = tiny_model(mlp_type=mlp_type)
    x, lens = _batch()
    batched = model.decode(METHODS, x, lens, beam_size=4, decoding_chunk_size=chunk)
    for b in range(x.size(0)):
        alone = model.decode(METHODS, x[b:b + 1, :lens[b]], lens[b:b + 1], beam_size=4,
                             decoding_chunk_size=chunk)
        for m in METHODS:
            assert batched[m][b] == alone[m][0], (m, b)
    assert any(len(h) > 0 for h in batched["ctc_greedy_search"])


def test_prefix_beam_matches_runtime_and_beam_one_is_greedy():
    model = tiny_model()
    x, lens = _batch()
    res = model.decode_results(["ctc_prefix_beam_search", "ctc_greedy_search"], x, lens,
                               beam_size=3)
    with torch.no_grad():
        enc, mask = model.encoder(x, lens, -1, -1)
        logp = model.ctc_activation(enc).double().numpy()
    for b, n in enumerate(mask.squeeze(1).sum(1).tolist()):
        ref = ctc_prefix_beam_search(logp[b, :n], 3)
        got = res["ctc_prefix_beam_search"][b]
        assert got.nbest == [h[0] for h in ref]
        np.testing.assert_allclose(got.nbest_scores, [h[1] for h in ref], atol=1e-4)
        assert got.times == ref[0][2]
    one = model.decode(["ctc_prefix_beam_search", "ctc_greedy_search"], x, lens, beam_size=1)
    assert one["ctc_prefix_beam_search"] == one["ctc_greedy_search"]


def _step_scores(decoder, memory, tokens, sos, eos):
    """log p(tokens + <eos>) by running forward_one_step once per prefix (no cache)."""
    total = 0.0
    prefix = [sos]
    for tok in list(tokens) + [eos]:
        ys = torch.tensor([prefix])
        mask = subsequent_mask(len(prefix)).unsqueeze(0)
        logp, _ = decoder.forward_one_step(memory, torch.ones(1, 1, memory.size(1), dtype=torch.bool),
                                           ys, mask, [])
        total += float(logp[0, tok])
        prefix.append(tok)
    return total


def test_attention_rescoring_picks_best_combined_score():
    model = tiny_model()
    x, lens = _batch()
    ctc_weight, reverse_weight = 0.4, 0.3
    res = model.decode_results(["ctc_prefix_beam_search", "attention_rescoring"], x, lens,
                               beam_size=4, ctc_weight=ctc_weight, reverse_weight=reverse_weight)
    with torch.no_grad():
        enc, mask = model.encoder(x, lens, -1, -1)
        for b in range(x.size(0)):
            memory = enc[b:b + 1, : int(mask[b].sum())]
            cands = res["ctc_prefix_beam_search"][b]
            assert len(cands.nbest) > 1
            expected = []
            for hyp, ctc_score in zip(cands.nbest, cands.nbest_scores):
                l2r = _step_scores(model.decoder.left_decoder, memory, hyp, model.sos, model.eos)
                r2l = _step_scores(model.decoder.right_decoder, memory, hyp[::-1], model.sos, model.eos)
                expected.append((1 - reverse_weight) * l2r + reverse_weight * r2l + ctc_weight * ctc_score)
            best = int(np.argmax(expected))
            got = res["attention_rescoring"][b]
            assert got.tokens == cands.nbest[best]
            assert got.score == pytest.approx(expected[best], abs=1e-4)
            assert got.times == cands.nbest_times[best]
            np.testing.assert_allclose(sorted(got.nbest_scores), sorted(expected), atol=1e-4)


def test_decoder_scores_unidirectional_ignores_reverse_weight():
    model = tiny_model(decoder="transformer")
    x, lens = _batch()
    a = model.decode_results(["attention_rescoring"], x, lens, beam_size=3, reverse_weight=0.0)
    b = model.decode_results(["attention_rescoring"], x, lens, beam_size=3, reverse_weight=0.7)
    assert [r.score for r in a["attention_rescoring"]] == [r.score for r in b["attention_rescoring"]]
    with torch.no_grad():
        enc, mask = model.encoder(x, lens, -1, -1)
        l2r, r2l = decoder_scores(model, [[2, 3], []], [0, 1], enc, mask, 0.0)
        memory = enc[1:2, : int(mask[1].sum())]
        assert float(l2r[1]) == pytest.approx(
            _step_scores(model.decoder, memory, [], model.sos, model.eos), abs=1e-5)
    assert torch.equal(r2l, torch.zeros(2))


def test_decoder_scores_any_order_and_unequal_nbest():
    """Hypotheses of interleaved utterances, some with fewer than the others (scored
    in equal groups over one memory row each, padded with empty ones): every score
    equals the one computed step by step with the utterance's own encoder output."""
    model = tiny_model()
    x, lens = _batch()
    hyps = [[3, 4], [5], [], [6, 7, 8], [4], [3, 3, 3, 3]]
    owners = [2, 0, 2, 2, 0, 1]
    with torch.no_grad():
        enc, mask = model.encoder(x, lens, -1, -1)
        l2r, r2l = decoder_scores(model, hyps, owners, enc, mask, 0.3)
        assert l2r.shape == r2l.shape == (6,)
        for i, (hyp, b) in enumerate(zip(hyps, owners)):
            memory = enc[b:b + 1, : int(mask[b].sum())]
            want_l = _step_scores(model.decoder.left_decoder, memory, hyp, model.sos, model.eos)
            want_r = _step_scores(model.decoder.right_decoder, memory, hyp[::-1], model.sos, model.eos)
            assert float(l2r[i]) == pytest.approx(want_l, abs=1e-4)
            assert float(r2l[i]) == pytest.approx(want_r, abs=1e-4)


def test_attention_beam_search_scores_and_beam_one_greedy():
    model = tiny_model()
    x, lens = _batch()
    with torch.no_grad():
        enc, mask = model.encoder(x, lens, -1, -1)
        res = attention_beam_search(model.decoder, enc, mask, 3, model.sos, model.eos)
        greedy = attention_beam_search(model.decoder, enc, mask, 1, model.sos, model.eos)
        for b in range(x.size(0)):
            t = int(mask[b].sum())
            memory = enc[b:b + 1, :t]
            r = res[b]
            # The score of each ended hypothesis is its log probability with <eos>.
            if len(r.tokens) < t:
                assert r.score == pytest.approx(
                    _step_scores(model.decoder.left_decoder, memory, r.tokens, model.sos, model.eos), abs=1e-4)
            assert r.nbest_scores == sorted(r.nbest_scores, reverse=True)
            # Beam 1: argmax at every step, computed here without caches.
            prefix = [model.sos]
            for _ in range(t):
                logp, _ = model.decoder.forward_one_step(
                    memory, torch.ones(1, 1, t, dtype=torch.bool), torch.tensor([prefix]),
                    subsequent_mask(len(prefix)).unsqueeze(0), [])
                nxt = int(logp[0].argmax())
                if nxt == model.eos:
                    break
                prefix.append(nxt)
            assert greedy[b].tokens == prefix[1:]


def test_simulate_streaming_equals_chunk_mask():
    model = tiny_model()
    x, lens = _batch()
    masked = model.decode(["ctc_greedy_search", "attention_rescoring"], x, lens, beam_size=3,
                          decoding_chunk_size=4)
    streamed = model.decode(["ctc_greedy_search", "attention_rescoring"], x, lens, beam_size=3,
                            decoding_chunk_size=4, simulate_streaming=True)
    assert masked == streamed


def test_unknown_method_is_named():
    model = tiny_model()
    x, lens = _batch()
    with pytest.raises(ValueError, match="unknown decoding method 'beam'"):
        model.decode(["beam"], x, lens)
