"""ASRModel: loss formula against independently computed parts, targets, export API
(eager vs TorchScript), MoE auxiliary losses and expert load."""
import math

import pytest
import torch
import torch.nn.functional as F

from wenet_moe.model import build_model
from wenet_moe.model.label_smoothing import LabelSmoothingLoss

V = 10


def make_config(decoder="bitransformer", mlp_type="position_wise_feed_forward", moe_conf=None,
                streaming=False, **model_conf):
    conf = {
        "input_dim": 12, "output_dim": V,
        "encoder": "conformer",
        "encoder_conf": {"output_size": 16, "attention_heads": 2, "linear_units": 24,
                         "num_blocks": 2, "cnn_module_kernel": 3, "causal": True,
                         "use_dynamic_chunk": streaming, "cnn_module_norm": "layer_norm",
                         "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
                         "attention_dropout_rate": 0.0, "mlp_type": mlp_type,
                         "n_expert": 4, "n_expert_activated": 2},
        "decoder": decoder,
        "decoder_conf": {"attention_heads": 2, "linear_units": 24, "num_blocks": 2,
                         "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
                         "mlp_type": mlp_type, "n_expert": 4, "n_expert_activated": 2},
        "model_conf": model_conf,
    }
    if decoder == "bitransformer":
        conf["decoder_conf"]["r_num_blocks"] = 1
    if moe_conf is not None:
        conf["moe_conf"] = moe_conf
    return conf


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(make_config(**kw))


def _batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, 12, generator=g)
    xl = torch.tensor([40, 33, 25])
    text = torch.tensor([[2, 5, 7, 3], [4, 4, 6, -1], [8, 1, -1, -1]])
    tl = torch.tensor([4, 3, 2])
    return x, xl, text, tl


def _smoothed_kl(logits, targets, eps):
    """Sum over listed (position, target) pairs of KL(smoothed one-hot || softmax)."""
    logp = torch.log_softmax(logits, -1)
    total = 0.0
    for pos, tgt in targets:
        q = torch.full((V,), eps / (V - 1))
        q[tgt] = 1 - eps
        total += float((q * (q.log() - logp[pos])).sum())
    return total


def test_loss_is_weighted_sum_of_independent_parts():
    ctc_w, rev_w, lsm = 0.3, 0.4, 0.1
    model = _model(ctc_weight=ctc_w, reverse_weight=rev_w, lsm_weight=lsm)
    x, xl, text, tl = _batch()
    out = model(x, xl, text, tl)
    with torch.no_grad():
        enc, mask = model.encoder(x, xl)
        enc_lens = mask.squeeze(1).sum(1)
        logp = model.ctc.log_softmax(enc)
        ctc = 0.0
        for b in range(3):
            n = int(tl[b])
            ctc += float(F.ctc_loss(logp[b:b + 1, :enc_lens[b]].transpose(0, 1), text[b:b + 1, :n],
                                    enc_lens[b:b + 1], tl[b:b + 1], blank=0, reduction="sum"))
        ctc /= 3
        sos = eos = V - 1
        l2r = r2l = 0.0
        for b in range(3):
            y = text[b, :int(tl[b])].tolist()
            memory, mmask = enc[b:b + 1, :enc_lens[b]], mask[b:b + 1, :, :enc_lens[b]]
            for dec, seq in ((model.decoder.left_decoder, y), (model.decoder.right_decoder, y[::-1])):
                logits = dec(memory, mmask, torch.tensor([[sos] + seq]), torch.tensor([len(seq) + 1]))[0][0]
                kl = _smoothed_kl(logits, list(enumerate(seq + [eos])), lsm)
                if dec is model.decoder.left_decoder:
                    l2r += kl / 3
                else:
                    r2l += kl / 3
    att = (1 - rev_w) * l2r + rev_w * r2l
    assert float(out["loss_ctc"]) == pytest.approx(ctc, rel=1e-4)
    assert float(out["loss_att"]) == pytest.approx(att, rel=1e-4)
    assert float(out["loss"]) == pytest.approx(ctc_w * ctc + (1 - ctc_w) * att, rel=1e-4)
    assert 0.0 <= float(out["th_accuracy"]) <= 1.0
    out["loss"].backward()
    assert model.decoder.right_decoder.embed.weight.grad is not None


def test_ctc_only_and_attention_only_weights():
    x, xl, text, tl = _batch()
    only_ctc = _model(ctc_weight=1.0)(x, xl, text, tl)
    assert float(only_ctc["loss"]) == pytest.approx(float(only_ctc["loss_ctc"]))
    assert float(only_ctc["loss_att"]) == 0.0
    only_att = _model(ctc_weight=0.0, reverse_weight=0.5)(x, xl, text, tl)
    assert float(only_att["loss"]) == pytest.approx(float(only_att["loss_att"]))


def test_label_smoothing_normalisation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, V, generator=g)
    target = torch.tensor([[1, 2, -1], [3, -1, -1]])
    pairs = [(0, 0, 1), (0, 1, 2), (1, 0, 3)]
    ref = sum(_smoothed_kl(logits[b], [(p, t)], 0.2) for b, p, t in pairs)
    per_utt = LabelSmoothingLoss(V, -1, 0.2, normalize_length=False)(logits, target)
    per_tok = LabelSmoothingLoss(V, -1, 0.2, normalize_length=True)(logits, target)
    assert float(per_utt) == pytest.approx(ref / 2, rel=1e-5)
    assert float(per_tok) == pytest.approx(ref / 3, rel=1e-5)
    exact = LabelSmoothingLoss(V, -1, 0.0)(logits, target)
    nll = -sum(float(torch.log_softmax(logits[b, p], -1)[t]) for b, p, t in pairs)
    assert float(exact) == pytest.approx(nll / 2, rel=1e-5)


def test_attention_targets_and_reverse():
    model = _model(reverse_weight=0.3)
    _, _, text, tl = _batch()
    ys_in, ys_out, r_in, r_out = model.attention_targets(text, tl)
    s = e = V - 1
    assert ys_in.tolist() == [[s, 2, 5, 7, 3], [s, 4, 4, 6, e], [s, 8, 1, e, e]]
    assert ys_out.tolist() == [[2, 5, 7, 3, e], [4, 4, 6, e, -1], [8, 1, e, -1, -1]]
    assert r_in.tolist() == [[s, 3, 7, 5, 2], [s, 6, 4, 4, e], [s, 1, 8, e, e]]
    assert r_out.tolist() == [[3, 7, 5, 2, e], [6, 4, 4, e, -1], [1, 8, e, -1, -1]]
    # Padding given as -1 or 0 is handled by forward_attention_decoder.
    hyps = torch.tensor([[s, 2, 5, -1], [s, 7, 0, 0]])
    assert model.reverse_hyps(hyps.clamp(min=0), torch.tensor([3, 2])).tolist() == \
        [[s, 5, 2, e], [s, 7, e, e]]


def test_forward_attention_decoder_matches_per_hypothesis_decoding():
    model = _model(reverse_weight=0.3).eval()
    x, xl, _, _ = _batch()
    s = e = V - 1
    hyps = [[2, 5, 7], [4], []]
    padded = torch.tensor([[s] + h + [-1] * (3 - len(h)) for h in hyps])
    lens = torch.tensor([len(h) + 1 for h in hyps])
    with torch.no_grad():
        enc, _ = model.encoder(x[:1], xl[:1])
        l2r, r2l = model.forward_attention_decoder(padded, lens, enc, 0.5)
        for i, h in enumerate(hyps):
            n = len(h) + 1
            left = model.decoder.left_decoder(enc, torch.ones(1, 1, enc.size(1), dtype=torch.bool),
                                              torch.tensor([[s] + h]), torch.tensor([n]))[0]
            right = model.decoder.right_decoder(enc, torch.ones(1, 1, enc.size(1), dtype=torch.bool),
                                                torch.tensor([[s] + h[::-1]]), torch.tensor([n]))[0]
            torch.testing.assert_close(l2r[i, :n], torch.log_softmax(left[0], -1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(r2l[i, :n], torch.log_softmax(right[0], -1), atol=1e-5, rtol=1e-5)
        _, r0 = model.forward_attention_decoder(padded, lens, enc, 0.0)
    assert torch.count_nonzero(r0) == 0


@pytest.mark.parametrize("mlp_type", ["position_wise_feed_forward", "moe"])
def test_scripted_export_api_matches_eager(mlp_type):
    model = _model(mlp_type=mlp_type, streaming=True, reverse_weight=0.3).eval()
    scripted = torch.jit.script(model)
    assert scripted.subsampling_rate() == 4 and scripted.right_context() == 6
    assert scripted.sos_symbol() == V - 1 and scripted.eos_symbol() == V - 1
    assert scripted.is_bidirectional_decoder()
    g = torch.Generator().manual_seed(5)
    att_cache = torch.zeros(0, 0, 0, 0)
    cnn_cache = torch.zeros(0, 0, 0, 0)
    s_att, s_cnn = att_cache, cnn_cache
    offset = 0
    with torch.no_grad():
        for _ in range(3):
            chunk = torch.randn(1, 19, 12, generator=g)  # 4 output frames
            e = model.forward_encoder_chunk(chunk, offset, 8, att_cache, cnn_cache)
            s = scripted.forward_encoder_chunk(chunk, offset, 8, s_att, s_cnn)
            for a, b in zip(e, s):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            _, att_cache, cnn_cache = e
            _, s_att, s_cnn = s
            offset += e[0].size(1)
        enc = e[0]
        torch.testing.assert_close(model.ctc_activation(enc), scripted.ctc_activation(enc))
        x, xl, _, _ = _batch()
        for a, b in zip(model.batch_ctc_log_probs(x, xl), scripted.batch_ctc_log_probs(x, xl)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        full, full_lens = model.batch_forward_encoder(x, xl)
        torch.testing.assert_close(scripted.batch_forward_encoder(x, xl, 4, -1)[0],
                                   model.batch_forward_encoder(x, xl, 4, -1)[0], atol=1e-5, rtol=1e-5)
        assert full_lens.dtype == torch.int64 and full_lens.tolist() == [9, 7, 5]
        hyps = torch.tensor([[V - 1, 3, 4, 5], [V - 1, 2, V - 1, V - 1]])
        lens = torch.tensor([4, 2])
        for a, b in zip(model.forward_attention_decoder(hyps, lens, enc, 0.5),
                        scripted.forward_attention_decoder(hyps, lens, enc, 0.5)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_moe_aux_losses_enter_total_loss_and_expert_load():
    from wenet_moe.layers.moe_router import resolve_moe_conf
    model = _model(mlp_type="moe", moe_conf={"router": "switch"}, ctc_weight=0.3,
                   reverse_weight=0.2)
    x, xl, text, tl = _batch()
    out = model(x, xl, text, tl)
    aux = {k: v for k, v in out.items() if k not in ("loss", "loss_ctc", "loss_att", "th_accuracy")}
    assert aux, "switch router should add a balance loss"
    weight = resolve_moe_conf({"router": "switch"})["balance_weight"]
    base = 0.3 * out["loss_ctc"] + 0.7 * out["loss_att"]
    assert float(out["loss"]) == pytest.approx(float(base + weight * sum(aux.values())), rel=1e-5)
    loads = model.expert_load()
    assert len(loads) == 2 * 2 + 2 + 1  # encoder macaron pairs + 2 left + 1 right decoder FFNs
    # Padding is left out: each valid frame is routed to the same number k of experts.
    with torch.no_grad():
        enc_frames = int(model.encoder(x, xl)[1].sum())
    dec_steps = int((tl + 1).sum())
    sums = {k: int(v.sum()) for k, v in loads.items()}
    enc_k = {s // enc_frames for k, s in sums.items() if k.startswith("encoder")}
    dec_k = {s // dec_steps for k, s in sums.items() if k.startswith("decoder")}
    assert all(s % enc_frames == 0 for k, s in sums.items() if k.startswith("encoder"))
    assert all(s % dec_steps == 0 for k, s in sums.items() if k.startswith("decoder"))
    assert len(enc_k) == 1 and enc_k == dec_k and enc_k <= {1, 2}
    assert _model().expert_load() == {}


def test_bad_model_settings():
    with pytest.raises(ValueError, match="reverse_weight"):
        build_model(make_config(decoder="transformer", reverse_weight=0.3))
    with pytest.raises(ValueError, match="ctc_weight"):
        build_model(make_config(ctc_weight=1.5))
    assert math.isclose(_model(ctc_weight=0.5).ctc_weight, 0.5)
