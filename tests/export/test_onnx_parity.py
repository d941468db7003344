"""ONNX Runtime equals PyTorch for dense and every MoE router: offline CTC log-probs
at 12 lengths (1 output frame, where most experts get 0 frames, to 400), the
streaming loop over encoder.onnx with caches against forward_chunk_by_chunk, the
batched streaming encoder (encoder_batch.onnx, several streams per call) against each
stream's forward_chunk, and decoder.onnx rescoring scores against the toolkit's own
rescoring code."""
import os

import numpy as np
import pytest
import torch

from export_tiny import ROUTERS, tiny_model
from wenet_moe.export import onnx_export
from wenet_moe.export.verify import chunk_windows, session

LENGTHS = [7, 8, 10, 11, 15, 23, 40, 67, 99, 150, 257, 400]  # 1 .. 99 output frames
TOL = 1e-4


@pytest.fixture(scope="module", params=ROUTERS)
def exported(request, tmp_path_factory):
    model, conf = tiny_model(request.param, seed=3)
    onnx_export.set_feature_dim(model, conf["input_dim"])
    d = str(tmp_path_factory.mktemp(f"onnx_{request.param}"))
    meta = {"vocab_size": str(conf["output_dim"])}
    onnx_export.export_offline(model, os.path.join(d, "model.onnx"), meta)
    onnx_export.export_encoder(model, os.path.join(d, "encoder.onnx"), 4, 2, meta)
    onnx_export.export_decoder(model, os.path.join(d, "decoder.onnx"), 0.3, meta)
    onnx_export.export_encoder_batch(model, os.path.join(d, "encoder_batch.onnx"), 4, 2, meta)
    onnx_export.export_decoder_tree(model, os.path.join(d, "decoder_tree.onnx"), meta)
    return request.param, model, conf, d


def test_decoder_tree_equals_pytorch_and_the_padded_decoder(exported):
    """decoder_tree.onnx against the eager model, and the hypotheses' scores read off its
    prefix trees against the padded one-row-per-hypothesis decoder's (every router);
    the check fails for a model with one decoder weight changed."""
    import copy
    from wenet_moe.export.verify import ParityError, verify_decoder_tree
    router, model, _, d = exported
    path = os.path.join(d, "decoder_tree.onnx")
    report = verify_decoder_tree(model, path)
    assert report["decoder_tree.onnx"] <= TOL and report["decoder_tree.onnx scores"] <= 1e-3, report
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.decoder.right_decoder.decoders[0].src_attn.linear_v.weight[0] += 0.5
    with pytest.raises(ParityError, match="decoder_tree.onnx r_score"):
        verify_decoder_tree(other, path)


def test_batched_streams_equal_each_stream_alone(exported):
    """Five streams of different lengths joining at different rounds, three chunk /
    cache settings (verify_encoder_batch); every router (SpeechMoE's shared routing
    embedding included)."""
    from wenet_moe.export.verify import verify_encoder_batch
    router, model, _, d = exported
    report = verify_encoder_batch(model, os.path.join(d, "encoder_batch.onnx"), 4, 2)
    assert len(report) == 3 and max(report.values()) <= TOL, (router, report)


def test_batched_check_fails_for_another_model(exported):
    """The check can fail: the graph against a model with one weight changed (every router)."""
    import copy
    from wenet_moe.export.verify import ParityError, verify_encoder_batch
    router, model, _, d = exported
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.encoder.encoders[1].conv_module.depthwise_conv.weight[:, :, 0] += 0.5
    with pytest.raises(ParityError, match="encoder_batch.onnx"):
        verify_encoder_batch(other, os.path.join(d, "encoder_batch.onnx"), 4, 2)


def test_offline_log_probs_equal_pytorch_at_many_lengths(exported):
    router, model, conf, d = exported
    sess = session(os.path.join(d, "model.onnx"))
    gen = torch.Generator().manual_seed(11)
    idle_experts_seen = False
    for t in LENGTHS:
        x = torch.randn(1, t, conf["input_dim"], generator=gen)
        with torch.no_grad():
            out, mask = model.encoder(x, torch.tensor([t]), -1, -1)
            want = torch.log_softmax(model.ctc.ctc_lo(out), dim=-1).numpy()
        if router != "dense":
            from wenet_moe.layers.moe import expert_load
            loads = [v for k, v in expert_load(model).items() if k.startswith("encoder")]
            idle_experts_seen |= any(int(v.min()) == 0 for v in loads)
        got, got_lens = sess.run(None, {"x": x.numpy(), "x_lens": np.array([t], np.int64)})
        assert got.shape == want.shape and got_lens.tolist() == [want.shape[1]]
        diff = float(np.abs(got - want).max())
        assert diff <= TOL, f"{router} T={t}: max |diff| {diff}"
    assert router == "dense" or idle_experts_seen


def test_offline_padded_batch(exported):
    router, model, conf, d = exported
    sess = session(os.path.join(d, "model.onnx"))
    gen = torch.Generator().manual_seed(5)
    lens = [150, 7, 61]
    x = torch.zeros(3, 150, conf["input_dim"])
    for b, t in enumerate(lens):
        x[b, :t] = torch.randn(t, conf["input_dim"], generator=gen)
    got, got_lens = sess.run(None, {"x": x.numpy(), "x_lens": np.array(lens, np.int64)})
    for b, t in enumerate(lens):
        with torch.no_grad():
            out, _ = model.encoder(x[b:b + 1, :t], torch.tensor([t]), -1, -1)
            want = model.ctc_activation(out)[0].numpy()
        assert got_lens[b] == want.shape[0]
        assert np.abs(got[b, :got_lens[b]] - want).max() <= TOL, f"{router} item {b}"


@pytest.mark.parametrize("chunk,left", [(4, 2), (1, -1), (3, 3)])
def test_streaming_loop_equals_chunk_by_chunk(exported, chunk, left):
    router, model, conf, d = exported
    sess = session(os.path.join(d, "encoder.onnx"))
    x = torch.randn(1, 203, conf["input_dim"], generator=torch.Generator().manual_seed(chunk))
    with torch.no_grad():
        want, _ = model.encoder.forward_chunk_by_chunk(x, chunk, left)
    required = chunk * left if left > 0 else -1
    blocks, heads = model.encoder.num_blocks, model.encoder.attention_heads
    d_k2 = 2 * model.encoder.output_size() // heads
    att = np.zeros((blocks, heads, 0, d_k2), np.float32)
    cnn = np.zeros((blocks, 1, model.encoder.output_size(), 3), np.float32)
    offset, outs = 0, []
    for start, end in chunk_windows(203, chunk, 4, 6):
        t_out = (end - start - 7) // 4 + 1
        out, att, cnn = sess.run(None, {
            "chunk": x[:, start:end].numpy(), "offset": np.array(offset, np.int64),
            "required_cache_size": np.array(required, np.int64), "att_cache": att,
            "cnn_cache": cnn, "att_mask": np.ones((1, 1, att.shape[2] + t_out), bool)})
        outs.append(out)
        offset += out.shape[1]
        if required > 0:
            assert att.shape[2] <= required
    got = np.concatenate(outs, axis=1)
    assert got.shape == tuple(want.shape)
    assert np.abs(got - want.numpy()).max() <= TOL, router


def test_decoder_rescoring_scores_equal_pytorch(exported):
    from wenet_moe.decode.search import decoder_scores
    router, model, conf, d = exported
    sess = session(os.path.join(d, "decoder.onnx"))
    gen = torch.Generator().manual_seed(2)
    enc_out = torch.randn(1, 17, model.encoder.output_size(), generator=gen)
    hyps = [[3, 4, 5], [3], [], [7, 7, 8, 9, 10, 3], [5, 6]]
    n, width = len(hyps), max(len(h) for h in hyps) + 1
    pad = np.full((n, width), model.eos_symbol(), np.int64)
    pad[:, 0] = model.sos_symbol()
    for i, h in enumerate(hyps):
        pad[i, 1:1 + len(h)] = h
    lens = np.array([len(h) + 1 for h in hyps], np.int64)
    for rw in (0.0, 0.3):
        score, r_score = sess.run(None, {"hyps": pad, "hyps_lens": lens,
                                         "encoder_out": enc_out.numpy(),
                                         "reverse_weight": np.array(rw, np.float32)})
        l2r = [sum(score[i, j, t] for j, t in enumerate(h)) + score[i, len(h), model.eos_symbol()]
               for i, h in enumerate(hyps)]
        r2l = [sum(r_score[i, j, t] for j, t in enumerate(h[::-1]))
               + r_score[i, len(h), model.eos_symbol()] for i, h in enumerate(hyps)]
        got = (1 - rw) * np.array(l2r) + rw * np.array(r2l)
        mask = torch.ones(1, 1, 17, dtype=torch.bool)
        with torch.no_grad():
            want_l, want_r = decoder_scores(model, hyps, [0] * n, enc_out, mask, rw)
        want = ((1 - rw) * want_l + rw * want_r).numpy()
        assert np.abs(got - want).max() <= TOL, f"{router} reverse_weight={rw}"
