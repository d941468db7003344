"""A tiny model overfits a handful of synthetic utterances; then every decoding
mode returns the reference labels, decided by a wide margin: the CTC greedy output
is stable under any log-prob perturbation below 1 nat, each reference token leads
the teacher-forced decoder by >= 2 nats, and the decoded labels stay the same with
weights jittered by 1e-3, with 1 or 2 threads and with oneDNN off."""
import pytest
import torch

from fixture_margins import greedy_ctc_margin, jittered, perturbations
from wenet_moe.model import build_model

MODES = ["ctc_greedy_search", "ctc_prefix_beam_search", "attention", "attention_rescoring"]

V = 8  # 0 <blank>, 1 <unk>, 2..6 tokens, 7 <sos/eos>
F_DIM = 10
REFS = [[2, 3, 4], [5, 6, 2, 3], [4, 4, 6], [6, 5], [3, 2, 5, 4], [2, 6]]


def synthetic_batch(seed=0):
    """Each token is a fixed random feature pattern held for 12 frames, separated by
    8 frames of silence; small noise on top. Returns padded (B, T, F), lengths, text."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(V, F_DIM, generator=g) * 2.0
    utts = []
    for ref in REFS:
        parts = [torch.zeros(8, F_DIM)]
        for tok in ref:
            parts += [protos[tok].expand(12, F_DIM), torch.zeros(8, F_DIM)]
        x = torch.cat(parts)
        utts.append(x + 0.1 * torch.randn(x.shape, generator=g))
    lens = torch.tensor([u.size(0) for u in utts])
    feats = torch.nn.utils.rnn.pad_sequence(utts, batch_first=True)
    text = torch.full((len(REFS), max(map(len, REFS))), -1)
    for i, ref in enumerate(REFS):
        text[i, :len(ref)] = torch.tensor(ref)
    return feats, lens, text, torch.tensor([len(r) for r in REFS])


@pytest.mark.parametrize("mlp_type", [
    "position_wise_feed_forward", pytest.param("moe", marks=pytest.mark.slow)])
def test_tiny_model_overfits_and_all_modes_decode_references(mlp_type):
    torch.manual_seed(0)
    model = build_model({
        "input_dim": F_DIM, "output_dim": V,
        "encoder": "conformer",
        "encoder_conf": {"output_size": 32, "attention_heads": 2, "linear_units": 48,
                         "num_blocks": 2, "cnn_module_kernel": 3, "cnn_module_norm": "layer_norm",
                         "dropout_rate": 0.0,
                         "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0,
                         "mlp_type": mlp_type, "n_expert": 4, "n_expert_activated": 2},
        "decoder": "bitransformer",
        "decoder_conf": {"attention_heads": 2, "linear_units": 48, "num_blocks": 2,
                         "r_num_blocks": 1, "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
                         "mlp_type": mlp_type, "n_expert": 4, "n_expert_activated": 2},
        "model_conf": {"ctc_weight": 0.3, "reverse_weight": 0.3},
    })
    feats, lens, text, text_lens = synthetic_batch()
    opt = torch.optim.Adam(model.parameters(), lr=6e-3)
    first = last = None
    for step in range(350):
        loss = model(feats, lens, text, text_lens)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss) if first is None else first
        last = float(loss)
    assert last < 0.1 * first, (first, last)
    model.eval()
    # margins (measured: CTC 6.3-8.2 nats, decoder 7.4-9.3 nats on every utterance)
    with torch.no_grad():
        enc, mask = model.encode(feats, lens)
        log_probs = model.ctc_activation(enc)
        for i, ref in enumerate(REFS):
            n = int(mask[i, 0].sum())
            assert greedy_ctc_margin(log_probs[i, :n].numpy(), hi=2.0) >= 2.0, i
            hyp = torch.tensor([[model.sos_symbol()] + ref])
            l2r, r2l = model.forward_attention_decoder(hyp, torch.tensor([len(ref) + 1]), enc[i:i + 1, :n], 0.3)
            for logp, target in ((l2r, ref), (r2l, ref[::-1])):
                for j, tok in enumerate(target + [model.eos_symbol()]):
                    row = logp[0, j].clone()
                    lead = float(row[tok])
                    row[tok] = float("-inf")
                    assert lead - float(row.max()) >= 2.0, (i, j, lead, float(row.max()))
    for name, ctx in perturbations() + [("weights x (1 + 1e-3 N(0,1))", None)]:
        net = jittered(model, 1e-3) if ctx is None else model
        with ctx if ctx is not None else torch.no_grad():
            out = net.decode(MODES, feats, lens, beam_size=3)
        for method, hyps in out.items():
            assert hyps == REFS, (name, method)
