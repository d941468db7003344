"""MoE FFN: routing math, dispatch against a naive reference, gradients, sharing, losses."""
import math
import os
import shutil
import time

import pytest
import torch
from torch import nn

from wenet_moe.config import ConfigError
from wenet_moe.layers.ffn import FFNFactory, PositionwiseFeedForward
from wenet_moe.layers import cpu_kernel
from wenet_moe.layers import moe as moe_module
from wenet_moe.layers.moe import (MoEFactory, active_parameters, expert_load,
                                  expert_load_entropy, moe_aux_losses)
from wenet_moe.layers.moe_router import balance_loss, importance_loss, sparsity_loss

EMPTY = torch.zeros(0)


def make_layer(router="topk", n_expert=4, k=2, dim=6, hidden=10, frame_embedding=False, **conf):
    factory = MoEFactory(dim, hidden, 0.0, "relu", n_expert, k, dict(router=router, **conf),
                         frame_embedding)
    return factory, factory()


def naive_moe(layer, x, route_emb=None):
    """Frame by frame: sum over the k chosen experts of gate * expert(frame)."""
    flat = x.reshape(-1, x.size(-1))
    router_in = flat if route_emb is None else torch.cat(
        [route_emb.reshape(-1, route_emb.size(-1)), flat], -1)
    logits = router_in @ layer.router.gate.weight.t()
    if layer.router.gate.bias is not None:
        logits = logits + layer.router.gate.bias
    out = torch.zeros_like(flat)
    for t in range(flat.size(0)):
        order = sorted(range(layer.n_expert), key=lambda e: -logits[t, e].item())
        chosen = order[:layer.n_expert_activated]
        if layer.renormalize:
            z = sum(math.exp(logits[t, e].item()) for e in chosen)
            gates = [math.exp(logits[t, e].item()) / z for e in chosen]
        else:
            z = sum(math.exp(v) for v in logits[t].tolist())
            gates = [math.exp(logits[t, e].item()) / z for e in chosen]
        for e, g in zip(chosen, gates):
            h = torch.relu(flat[t] @ layer.w1[e] + layer.b1[e])
            out[t] += g * (h @ layer.w2[e] + layer.b2[e])
    return out.view_as(x)


def test_topk_gates_hand_computed():
    _, layer = make_layer("topk", n_expert=3, k=2, dim=2)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.router.gate.bias.copy_(torch.tensor([0.0, 0.5, -3.0]))
    x = torch.tensor([[2.0, 1.0], [-1.0, 0.0]])
    logits, top_idx, gates = layer.route(x, EMPTY)
    # frame 0: logits (2, 1.5, 0) -> experts 0, 1; frame 1: (-1, 0.5, -4) -> experts 1, 0
    assert top_idx.tolist() == [[0, 1], [1, 0]]
    g0 = math.exp(2.0) / (math.exp(2.0) + math.exp(1.5))
    g1 = math.exp(0.5) / (math.exp(0.5) + math.exp(-1.0))
    assert torch.allclose(gates, torch.tensor([[g0, 1 - g0], [g1, 1 - g1]]), atol=1e-6)
    assert torch.allclose(gates.sum(-1), torch.ones(2))


def test_switch_gate_is_full_softmax_probability():
    _, layer = make_layer("switch", n_expert=3, k=1, dim=2)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.router.gate.bias.zero_()
    x = torch.tensor([[2.0, 1.0]])
    _, top_idx, gates = layer.route(x, EMPTY)
    z = math.exp(2.0) + math.exp(1.0) + math.exp(3.0)
    assert top_idx.tolist() == [[2]]
    assert gates.item() == pytest.approx(math.exp(3.0) / z, abs=1e-6)


@pytest.mark.parametrize("router", ["topk", "omni"])
def test_top1_gate_is_full_softmax_probability_and_router_learns(router):
    """k = 1: a softmax over the one selected logit would be 1 for every frame, leaving
    the router without gradient from the main loss; the gate is the full-softmax
    probability of the chosen expert instead (Switch-style), for topk and omni alike."""
    torch.manual_seed(0)
    _, layer = make_layer(router, n_expert=3, k=1, dim=2, balance_weight=0.0)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.router.gate.bias.zero_()
    _, top_idx, gates = layer.route(torch.tensor([[2.0, 1.0]]), EMPTY)
    assert top_idx.tolist() == [[2]]
    z = math.exp(2.0) + math.exp(1.0) + math.exp(3.0)
    assert gates.item() == pytest.approx(math.exp(3.0) / z, abs=1e-6)
    # the main loss alone (no auxiliary loss) moves the router
    x = torch.randn(2, 5, 2)
    layer(x, EMPTY).pow(2).sum().backward()
    assert layer.router.gate.weight.grad.abs().sum().item() > 1e-4
    assert layer.router.gate.bias.grad.abs().sum().item() > 1e-4
    # k = 2 keeps the paper's gates: softmax over the two selected logits
    _, layer2 = make_layer(router, n_expert=3, k=2, dim=2)
    with torch.no_grad():
        layer2.router.gate.weight.copy_(layer.router.gate.weight)
        layer2.router.gate.bias.zero_()
    _, top2, gates2 = layer2.route(torch.tensor([[2.0, 1.0]]), EMPTY)
    assert top2.tolist() == [[2, 0]]
    g = math.exp(3.0) / (math.exp(3.0) + math.exp(2.0))
    assert torch.allclose(gates2, torch.tensor([[g, 1 - g]]), atol=1e-6)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("router,k", [("topk", 2), ("topk", 1), ("switch", 1), ("omni", 3),
                                      ("speechmoe", 2)])
def test_dispatch_matches_naive_reference(router, k, grad):
    """Both eager paths (autograd, and in-place without grad) and the TorchScript path."""
    torch.manual_seed(0)
    _, layer = make_layer(router, n_expert=5, k=k)
    layer.eval()
    x = torch.randn(3, 7, 6)
    with torch.set_grad_enabled(grad):
        got = layer(x, EMPTY)
        scripted = torch.jit.script(layer)(x, EMPTY)
    want = naive_moe(layer, x)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(scripted, want, atol=1e-5)


def test_speechmoe_router_sees_frame_embedding():
    torch.manual_seed(0)
    factory, layer = make_layer("speechmoe", frame_embedding=True, embed_dim=3)
    emb_net = factory.route_embedding()
    assert emb_net is factory.route_embedding()
    assert layer.router.gate.in_features == 6 + 3
    x = torch.randn(2, 5, 6)
    emb = emb_net(x)
    assert emb.shape == (2, 5, 3)
    assert torch.allclose(layer(x, emb), naive_moe(layer, x, emb), atol=1e-5)
    with pytest.raises(ValueError, match="route_emb must be the shared frame embedding"):
        layer(x, EMPTY)
    # decoders have no frame embedding: router sees the layer input alone
    dec_factory, dec_layer = make_layer("speechmoe", frame_embedding=False)
    assert dec_factory.route_embedding() is None
    assert dec_layer.router.gate.in_features == 6


def test_one_expert_equals_dense_ffn():
    torch.manual_seed(0)
    factory = FFNFactory(6, 10, 0.0, "swish", "moe", 1, 1, {"router": "topk"})
    moe = factory()
    dense = PositionwiseFeedForward(6, 10, 0.0, nn.SiLU())
    with torch.no_grad():
        dense.w_1.weight.copy_(moe.w1[0].t())
        dense.w_1.bias.copy_(moe.b1[0])
        dense.w_2.weight.copy_(moe.w2[0].t())
        dense.w_2.bias.copy_(moe.b2[0])
    x = torch.randn(2, 9, 6)
    assert torch.allclose(moe(x, EMPTY), dense(x, EMPTY), atol=1e-6)


def test_gradients_reach_router_and_only_chosen_experts():
    torch.manual_seed(0)
    _, layer = make_layer("topk", n_expert=4, k=2)
    with torch.no_grad():
        layer.router.gate.weight.mul_(0.01)
        layer.router.gate.bias.copy_(torch.tensor([5.0, 4.0, -5.0, -5.0]))
    x = torch.randn(2, 6, 6)
    layer(x, EMPTY).pow(2).sum().backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    for p in (layer.w1, layer.b1, layer.w2, layer.b2):
        assert p.grad[:2].abs().sum() > 0
        assert torch.equal(p.grad[2:], torch.zeros_like(p.grad[2:]))


def test_omni_router_shared_once():
    factory = FFNFactory(6, 10, 0.0, "relu", "moe", 4, 2, {"router": "omni"}, frame_embedding=True)
    stack = nn.ModuleList([factory() for _ in range(3)])
    routers = {id(layer.router.gate.weight) for layer in stack}
    assert len(routers) == 1
    per_layer_experts = 4 * (6 * 10 + 10 + 10 * 6 + 6)
    router_params = 4 * 6 + 4
    assert sum(p.numel() for p in stack.parameters()) == 3 * per_layer_experts + router_params
    # a second stack (the decoders) gets its own router
    other = FFNFactory(6, 10, 0.0, "relu", "moe", 4, 2, {"router": "omni"})()
    assert other.router is not stack[0].router
    assert active_parameters(stack) == 3 * 2 * (6 * 10 + 10 + 10 * 6 + 6) + router_params


def test_capacity_factor_drops_overflow_in_training_only():
    torch.manual_seed(0)
    _, layer = make_layer("topk", n_expert=2, k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.bias.copy_(torch.tensor([1.0, 0.0]))    # every frame -> expert 0
    x = torch.randn(1, 6, 6)
    layer.eval()
    full = layer(x, EMPTY)
    layer.train()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            capped = layer(x, EMPTY)
        # capacity = ceil(1.0 * 6 / 2) = 3: the first three frames keep their output
        assert torch.allclose(capped[0, :3], full[0, :3], atol=1e-6)
        assert torch.equal(capped[0, 3:], torch.zeros(3, 6))


def capacity_reference(layer, x, lengths):
    """Independent frame loop: valid frames in flattened (utterance, time) order, each
    expert keeps its first ceil(cf * N_valid * k / E) assignments; padding is never kept."""
    batch, time, dim = x.shape
    flat = x.reshape(-1, dim)
    logits, top_idx, gates = layer.route(flat, EMPTY)
    n_valid = int(sum(lengths))
    cap = math.ceil(layer.capacity_factor * n_valid * layer.n_expert_activated / layer.n_expert)
    taken = [0] * layer.n_expert
    out = torch.zeros_like(flat)
    for b in range(batch):
        for t in range(lengths[b]):
            row = b * time + t
            for j in range(layer.n_expert_activated):
                e = int(top_idx[row, j])
                if taken[e] < cap:
                    taken[e] += 1
                    h = torch.relu(flat[row] @ layer.w1[e] + layer.b1[e])
                    out[row] += gates[row, j] * (h @ layer.w2[e] + layer.b2[e])
    return out.view(batch, time, dim)


def _padded(lengths, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), dim, generator=g)   # padding frames are not zero
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).unsqueeze(1)
    return x, mask


@pytest.mark.parametrize("grad", [True, False])
def test_capacity_counts_valid_frames_only(grad):
    """Every frame wants expert 0; capacity ceil(1.0 * 9 valid / 2) = 5. The first
    utterance's padding must not take the slots of the second utterance's real frames:
    its first two frames are kept exactly as when the batch has no padding at all."""
    torch.manual_seed(0)
    _, layer = make_layer("topk", n_expert=2, k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.bias.copy_(torch.tensor([1.0, 0.0]))
    x, mask = _padded([3, 6], 6)
    unpadded = torch.cat([x[0, :3], x[1]]).unsqueeze(0)          # (1, 9, 6), no padding
    layer.train()
    with torch.set_grad_enabled(grad):
        got = layer(x, EMPTY, mask)
        alone = layer(unpadded, EMPTY)
        want = capacity_reference(layer, x, [3, 6])
    assert torch.allclose(got[0, :3], alone[0, :3], atol=1e-6)
    assert torch.allclose(got[1], alone[0, 3:], atol=1e-6)
    assert got[1, :2].abs().min() > 0 and torch.equal(got[1, 2:], torch.zeros(4, 6))
    assert torch.equal(got[0, 3:], torch.zeros(3, 6))               # padding never kept
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1), ("omni", 3)])
def test_capacity_with_padding_matches_frame_loop(router, k):
    """Random routing, k of 5 experts, capacity 0.6: outputs and the router's and
    experts' gradients equal the independent frame loop; the unpadded concatenation of
    the same utterances gives the same outputs."""
    torch.manual_seed(1)
    _, layer = make_layer(router, n_expert=5, k=k, capacity_factor=0.6)
    lengths = [4, 9, 2]
    x, mask = _padded(lengths, 6, seed=3)
    layer.train()
    got = layer(x, EMPTY, mask)
    probe = torch.randn_like(got)
    (got * probe).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    want = capacity_reference(layer, x, lengths)
    (want * probe).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    for (name, p), g in zip(layer.named_parameters(), grads):
        assert torch.allclose(g, p.grad, atol=1e-5), name
    # the test is not vacuous: some valid assignment overflowed, some was kept
    valid = torch.cat([x[b, :n] for b, n in enumerate(lengths)]).unsqueeze(0)
    alone = layer(valid, EMPTY)
    assert torch.allclose(torch.cat([got[b, :n] for b, n in enumerate(lengths)]), alone[0], atol=1e-5)
    layer.capacity_factor = 0.0
    uncapped = layer(valid, EMPTY)
    assert not torch.allclose(uncapped, alone, atol=1e-3)
    for b, n in enumerate(lengths):
        assert torch.equal(got[b, n:], torch.zeros_like(got[b, n:]))


def test_capacity_mask_of_wrong_shape_is_an_error():
    _, layer = make_layer("topk", n_expert=2, k=1, capacity_factor=1.0)
    layer.train()
    with pytest.raises(ValueError, match=r"mask_pad of shape \(2, 1, 5\) does not mark the frames"):
        layer(torch.randn(2, 4, 6), EMPTY, torch.ones(2, 1, 5, dtype=torch.bool))


def independent_losses(logits, top_idx, mask):
    probs = torch.softmax(logits.double(), -1)
    n_expert = logits.size(-1)
    frames = [(b, t) for b in range(mask.size(0)) for t in range(mask.size(1)) if mask[b, t]]
    counts = [0.0] * n_expert
    mean_p = [0.0] * n_expert
    l1 = 0.0
    for b, t in frames:
        for e in top_idx[b, t].tolist():
            counts[e] += 1
        p = probs[b, t].tolist()
        norm = math.sqrt(sum(v * v for v in p))
        l1 += sum(v / norm for v in p)
        for e in range(n_expert):
            mean_p[e] += p[e] / len(frames)
    total = sum(counts)
    balance = n_expert * sum(counts[e] / total * mean_p[e] for e in range(n_expert))
    importance = n_expert * sum(v * v for v in mean_p)
    return balance, l1 / len(frames), importance


def test_loss_formulas_against_independent_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)
    top_idx = torch.topk(logits, 2, -1).indices
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    balance, l1, importance = independent_losses(logits, top_idx, mask)
    assert balance_loss(logits, top_idx, mask).item() == pytest.approx(balance, rel=1e-5)
    assert sparsity_loss(logits, mask).item() == pytest.approx(l1, rel=1e-5)
    assert importance_loss(logits, mask).item() == pytest.approx(importance, rel=1e-5)
    # uniform routing: balance 1, importance 1, sparsity sqrt(n)
    flat = torch.zeros(1, 8, 4)
    idx = torch.arange(8).remainder(4).view(1, 8, 1)
    ones = torch.ones(1, 8, dtype=torch.bool)
    assert balance_loss(flat, idx, ones).item() == pytest.approx(1.0)
    assert importance_loss(flat, ones).item() == pytest.approx(1.0)
    assert sparsity_loss(flat, ones).item() == pytest.approx(2.0)


class FakeCTC(nn.Module):
    def __init__(self, dim, vocab):
        super().__init__()
        self.ctc_lo = nn.Linear(dim, vocab)

    def log_softmax(self, xs):
        return torch.log_softmax(self.ctc_lo(xs), dim=-1)


class TinyModel(nn.Module):
    """Encoder/decoder stand-in with the naming of the real model."""

    def __init__(self, router, **conf):
        super().__init__()
        enc = FFNFactory(6, 8, 0.0, "relu", "moe", 4, 1 if router == "switch" else 2,
                         dict(router=router, **conf), frame_embedding=True)
        dec = FFNFactory(6, 8, 0.0, "relu", "moe", 4, 1 if router == "switch" else 2,
                         dict(router=router, **conf), frame_embedding=False)
        self.encoder = nn.ModuleDict({"embed_route": enc.route_embedding() or nn.Identity(),
                                      "ffn": nn.ModuleList([enc(), enc()])})
        self.decoder = nn.ModuleDict({"ffn": dec()})
        self.ctc = FakeCTC(6, 5)
        self.has_emb = enc.route_embedding() is not None

    def forward(self, feats, ys):
        emb = self.encoder["embed_route"](feats) if self.has_emb else EMPTY
        h = feats
        for ffn in self.encoder["ffn"]:
            h = h + ffn(h, emb)
        return h, self.decoder["ffn"](ys, EMPTY)


@pytest.mark.parametrize("router", ["topk", "switch", "speechmoe", "omni"])
def test_moe_aux_losses_per_router(router):
    from wenet_moe.layers.moe_router import LAST_ROUTING
    torch.manual_seed(0)
    model = TinyModel(router, embed_dim=3)
    model.train()
    feats, ys = torch.randn(2, 7, 6), torch.randn(2, 4, 6)
    enc_lens, text = torch.tensor([7, 5]), torch.tensor([[1, 2, 3], [4, 2, -1]])
    text_lens = torch.tensor([3, 2])
    model(feats, ys)
    layers = [("enc", model.encoder["ffn"][0]), ("enc", model.encoder["ffn"][1]),
              ("dec", model.decoder["ffn"])]
    recorded = [(kind, LAST_ROUTING[layer][0].detach(), LAST_ROUTING[layer][1])
                for kind, layer in layers]
    aux = moe_aux_losses(model, enc_lens, text, text_lens)
    expected = {"topk": set(), "switch": {"loss_balance"}, "omni": {"loss_balance"},
                "speechmoe": {"loss_sparsity", "loss_importance", "loss_embed_ctc"}}[router]
    assert set(aux) == expected
    weights = {"loss_balance": 0.01, "loss_sparsity": 0.1, "loss_importance": 0.1,
               "loss_embed_ctc": 0.01}
    for name, (loss, weight) in aux.items():
        assert weight == pytest.approx(weights[name])
        assert torch.isfinite(loss) and loss.requires_grad
    # each loss = sum over the three layers of its formula, padding frames excluded
    totals = [0.0, 0.0, 0.0]
    for kind, logits, top_idx in recorded:
        lens = enc_lens if kind == "enc" else text_lens + 1
        mask = torch.arange(logits.size(1))[None] < lens[:, None]
        for i, value in enumerate(independent_losses(logits, top_idx, mask)):
            totals[i] += value
    if "loss_balance" in aux:
        assert aux["loss_balance"][0].item() == pytest.approx(totals[0], rel=1e-4)
    if router == "speechmoe":
        assert aux["loss_sparsity"][0].item() == pytest.approx(totals[1], rel=1e-4)
        assert aux["loss_importance"][0].item() == pytest.approx(totals[2], rel=1e-4)
    # consumed: a second call without a new forward has nothing to add
    assert moe_aux_losses(model, enc_lens, text, text_lens) == {}


def test_embed_ctc_loss_matches_torch_ctc():
    torch.manual_seed(0)
    model = TinyModel("speechmoe", embed_dim=3)
    feats = torch.randn(2, 7, 6)
    enc_lens, text, text_lens = torch.tensor([7, 6]), torch.tensor([[1, 2], [3, -1]]), torch.tensor([2, 1])
    model(feats, torch.randn(2, 3, 6))
    loss, weight = moe_aux_losses(model, enc_lens, text, text_lens)["loss_embed_ctc"]
    emb_net = model.encoder["embed_route"]
    logp = model.ctc.log_softmax(emb_net.ctc_proj(emb_net(feats)))
    want = sum(torch.nn.functional.ctc_loss(logp[b, :enc_lens[b]], text[b, :text_lens[b]],
                                            enc_lens[b:b + 1], text_lens[b:b + 1],
                                            reduction="sum") for b in range(2)) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert weight == pytest.approx(0.01)
    loss.backward()
    assert emb_net.net[0].weight.grad.abs().sum() > 0


def test_expert_load_and_entropy():
    torch.manual_seed(0)
    model = TinyModel("topk")
    model.eval()
    feats = torch.randn(2, 7, 6)
    with torch.no_grad():
        model(feats, torch.randn(2, 4, 6))
    loads = expert_load(model)
    assert set(loads) == {"encoder.ffn.0", "encoder.ffn.1", "decoder.ffn"}
    assert loads["encoder.ffn.0"].dtype == torch.int64
    assert loads["encoder.ffn.0"].sum().item() == 2 * 7 * 2
    masked = expert_load(model, torch.tensor([7, 3]), torch.tensor([3, 1]))
    assert masked["encoder.ffn.0"].sum().item() == (7 + 3) * 2
    assert masked["decoder.ffn"].sum().item() == (4 + 2) * 2
    ent = expert_load_entropy({"a": torch.tensor([5, 5, 5, 5]), "b": torch.tensor([8, 0, 0, 0])})
    assert ent["a"] == pytest.approx(math.log(4))
    assert ent["b"] == pytest.approx(0.0)
    assert expert_load(nn.Linear(2, 2)) == {}


@pytest.mark.parametrize("conf,message", [
    ({"router": "top2"}, "moe_conf.router"),
    ({"router": "topk", "balance_wieght": 0.1}, "moe_conf.balance_wieght"),
    ({"router": "switch", "balance_weight": -1}, "moe_conf.balance_weight"),
    ({"router": "speechmoe", "embed_dim": 0}, "moe_conf.embed_dim"),
])
def test_bad_moe_conf_names_the_key(conf, message):
    with pytest.raises(ConfigError, match=message):
        MoEFactory(6, 10, 0.0, "relu", 4, 2, conf, True)


def test_bad_expert_counts_name_the_field():
    with pytest.raises(ConfigError, match="decoder_conf.n_expert_activated"):
        MoEFactory(6, 10, 0.0, "relu", 4, 5, {}, False)
    with pytest.raises(ConfigError, match="encoder_conf.n_expert"):
        MoEFactory(6, 10, 0.0, "relu", 0, 1, {}, True)


@pytest.mark.parametrize("grad", [True, False])
def test_autocast_bfloat16(grad):
    torch.manual_seed(0)
    _, layer = make_layer("switch", n_expert=4, k=1)
    layer.eval()
    x = torch.randn(2, 5, 6)
    want = naive_moe(layer, x)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x, EMPTY)
    assert got.shape == x.shape
    assert torch.allclose(got.float(), want, atol=0.05, rtol=0.05)


def differentiable_reference(layer, x, route_emb=None):
    """Frame by frame like `naive_moe`, but with gates computed by tensor ops so that
    gradients reach the router, the experts and the input."""
    flat = x.reshape(-1, x.size(-1))
    router_in = flat if route_emb is None else torch.cat(
        [route_emb.reshape(-1, route_emb.size(-1)), flat], -1)
    logits = router_in @ layer.router.gate.weight.t()
    if layer.router.gate.bias is not None:
        logits = logits + layer.router.gate.bias
    rows = []
    for t in range(flat.size(0)):
        order = sorted(range(layer.n_expert), key=lambda e: -logits[t, e].item())
        chosen = order[:layer.n_expert_activated]
        if layer.renormalize:
            gates = torch.softmax(logits[t, chosen], -1)
        else:
            gates = torch.softmax(logits[t], -1)[chosen]
        row = torch.zeros(flat.size(1))
        for g, e in zip(gates, chosen):
            h = layer.activation(flat[t] @ layer.w1[e] + layer.b1[e])
            row = row + g * (h @ layer.w2[e] + layer.b2[e])
        rows.append(row)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("rows", [0.0, 1e9])
@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1), ("omni", 3), ("speechmoe", 2)])
def test_all_frames_and_sorted_paths_match_reference_with_gradients(router, k, rows):
    """all_frames_rows 1e9 forces the all-frames path, 0 the sorted path: outputs and
    the gradients of every parameter and of the input equal the frame-by-frame reference."""
    torch.manual_seed(0)
    _, layer = make_layer(router, n_expert=5, k=k, all_frames_rows=rows)
    assert layer.all_frames_rows == rows
    x = torch.randn(2, 4, 6)
    probe = torch.randn(2, 4, 6)
    xa = x.clone().requires_grad_(True)
    got = layer(xa, EMPTY)
    (got * probe).sum().backward()
    got_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    xb = x.clone().requires_grad_(True)
    want = differentiable_reference(layer, xb)
    (want * probe).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    for (name, p), g in zip(layer.named_parameters(), got_grads):
        assert torch.allclose(g, p.grad, atol=1e-5), name
    with torch.no_grad():   # the in-place inference variant
        assert torch.allclose(layer(x, EMPTY), want, atol=1e-5)


def test_all_frames_path_gives_unchosen_experts_zero_gradient():
    torch.manual_seed(0)
    _, layer = make_layer("topk", n_expert=4, k=2, all_frames_rows=1e9)
    with torch.no_grad():
        layer.router.gate.weight.mul_(0.01)
        layer.router.gate.bias.copy_(torch.tensor([5.0, -5.0, 4.0, -5.0]))
    # frame 0 is pushed to expert 1 instead of 2: expert 2 is chosen by frames 1.. only,
    # so the all-frames path runs it on frame 0 with a zero gate
    x = torch.randn(1, 5, 6)
    with torch.no_grad():
        layer.router.gate.weight[1, 0] = 50.0
        x[0, 0, 0] = 3.0
        x[0, 1:, 0] = -x[0, 1:, 0].abs()
    _, top_idx, _ = layer.route(x.reshape(-1, 6), EMPTY)
    assert top_idx[0].tolist() == [1, 0] and all(set(r) == {0, 2} for r in top_idx[1:].tolist())
    layer(x, EMPTY).pow(2).sum().backward()
    assert torch.equal(layer.w1.grad[3], torch.zeros(6, 10))          # never chosen
    assert torch.equal(layer.b2.grad[3], torch.zeros(6))
    # expert 2 was run on frame 0 with gate 0: its gradient comes from frames 1.. only
    ref = make_layer("topk", n_expert=4, k=2, all_frames_rows=0.0)[1]
    ref.load_state_dict(layer.state_dict())
    ref(x[:, 1:], EMPTY).pow(2).sum().backward()
    ref_part = ref.w1.grad[2].clone()
    ref.zero_grad()
    assert torch.allclose(layer.w1.grad[2], ref_part, atol=1e-5)


def test_all_frames_rows_threshold_selects_the_path(monkeypatch):
    """N*k/E_used <= all_frames_rows runs the all-frames path, otherwise sorted."""
    torch.manual_seed(0)
    _, layer = make_layer("topk", n_expert=4, k=2, all_frames_rows=2.0)
    calls = []
    original = layer._dispatch_all_frames
    monkeypatch.setattr(layer, "_dispatch_all_frames",
                        lambda *a: calls.append(a[0].size(0)) or original(*a))
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.bias.copy_(torch.tensor([2.0, 1.0, 0.0, -1.0]))  # experts 0, 1
    for frames in (1, 2, 3):    # 2 used experts: rows per used expert = frames
        layer(torch.randn(1, frames, 6), EMPTY)
    assert calls == [1, 2]


def test_bad_all_frames_rows_names_the_key():
    with pytest.raises(ConfigError, match="moe_conf.all_frames_rows"):
        make_layer("topk", all_frames_rows=-1)


needs_onednn = pytest.mark.skipif(not moe_module._ONEDNN_LINEAR,
                                  reason="this torch build has no oneDNN linear ops")
# Skipped only without a C compiler (or when disabled on purpose): a kernel that fails
# to build where a compiler exists fails test_kernel_library_is_built_once_into_the_cache.
_CC = os.environ.get("CC") or "cc"
_NO_KERNEL = ("disabled by WENET_MOE_CPU_KERNEL=0" if os.environ.get("WENET_MOE_CPU_KERNEL") == "0"
              else f"no C compiler '{_CC}' on PATH" if shutil.which(_CC) is None else "")
needs_kernel = pytest.mark.skipif(bool(_NO_KERNEL), reason=f"MoE CPU kernel: {_NO_KERNEL}")
PACKED_KINDS = [pytest.param("onednn", marks=needs_onednn), pytest.param("kernel", marks=needs_kernel)]


@pytest.mark.parametrize("kind", PACKED_KINDS)
@pytest.mark.parametrize("activation", ["relu", "swish", "gelu", "tanh"])
@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1), ("speechmoe", 3)])
def test_packed_inference_matches_reference(kind, activation, router, k):
    """Eval-mode CPU inference takes the packed path (oneDNN: fused activation where it
    has one; the C kernel: 48 hidden units = an odd number of 16-column blocks, 1-25
    rows per expert = full 12-row tiles and remainders) and gives the frame-by-frame
    reference's outputs."""
    torch.manual_seed(0)
    factory = MoEFactory(16, 48, 0.1, activation, 5, k, {"router": router, "packed_experts": kind}, False)
    layer = factory().eval()
    x = torch.randn(2, 21, 16)
    with torch.no_grad():
        want = differentiable_reference(layer, x)
        assert layer._packed(x)[0] == kind
        got = layer(x, EMPTY)
        layer.packed_experts = False
        unpacked = layer(x, EMPTY)
        single = layer(x[:1, :1], EMPTY)
    with torch.inference_mode():
        layer.packed_experts = kind
        got_inference = layer(x, EMPTY)
        got_single = layer(x[:1, :1], EMPTY)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(unpacked, want, atol=1e-5)
    assert torch.allclose(got_inference, want, atol=1e-5)
    assert torch.allclose(got_single, single, atol=1e-5)


@pytest.mark.parametrize("kind", PACKED_KINDS)
def test_packed_weights_follow_parameter_updates(kind):
    """A changed expert weight (in-place, or a new state_dict) rebuilds the packed copy;
    so does train() / eval() after a change that does not move the version counter
    (torch's fused Adam, writes through .data)."""
    torch.manual_seed(0)
    _, layer = make_layer("topk", n_expert=4, k=2, dim=16, hidden=32, packed_experts=kind)
    layer.eval()
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        before = layer(x, EMPTY)
        layer.w2.mul_(-2.0)
        after = layer(x, EMPTY)
        assert torch.allclose(after, differentiable_reference(layer, x), atol=1e-5)
        assert not torch.allclose(after, before, atol=1e-3)
        state = {name: value * 0.5 for name, value in layer.state_dict().items()}
        layer.load_state_dict(state)
        assert torch.allclose(layer(x, EMPTY), differentiable_reference(layer, x), atol=1e-5)
        before = layer(x, EMPTY)
        version = layer.w1._version
        layer.w1.data.mul_(2.0)                    # no version bump
        assert layer.w1._version == version
        assert torch.allclose(layer(x, EMPTY), before)      # the cache cannot see it ...
        layer.train()
        layer.eval()
        after = layer(x, EMPTY)                              # ... train() / eval() drops it
        assert torch.allclose(after, differentiable_reference(layer, x), atol=1e-5)
        assert not torch.allclose(after, before, atol=1e-3)


def test_packed_path_is_inference_only():
    """Training mode, autograd, fp64 or packed_experts false: no packed weights."""
    _, layer = make_layer("topk", n_expert=4, k=2, dim=16, hidden=32)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert layer._packed(x) is None                  # training mode
    layer.eval()
    assert layer._packed(x) is None                      # autograd on
    with torch.no_grad():
        assert layer._packed(x.double()) is None
        layer.packed_experts = False
        assert layer._packed(x) is None


@needs_onednn
def test_packed_true_uses_onednn_when_kernel_cannot_run(monkeypatch):
    """packed_experts true: the C kernel where it can run, else oneDNN (no kernel library,
    or dimensions that are not multiples of 16)."""
    _, layer = make_layer("topk", n_expert=4, k=2, dim=6, hidden=10)
    layer.eval()
    with torch.no_grad():
        assert layer._packed(torch.randn(3, 6))[0] == "onednn"           # 6 % 16 != 0
        _, layer = make_layer("topk", n_expert=4, k=2, dim=16, hidden=32)
        layer.eval()
        monkeypatch.setattr(cpu_kernel, "library", lambda: None)
        assert layer._packed(torch.randn(3, 16))[0] == "onednn"
        layer.packed_experts = "kernel"
        assert layer._packed(torch.randn(3, 16)) is None                  # unpacked addmm


@needs_kernel
@needs_onednn
def test_packed_true_picks_the_kernel_by_threads_and_rows(monkeypatch):
    """At every thread count: the kernel up to the measured `kernel_max_rows` rows per
    expert, oneDNN above; WENET_MOE_KERNEL_MAX_ROWS fixes the limit; the measurement
    is made once per shape and thread count."""
    _, layer = make_layer("topk", n_expert=4, k=2, dim=16, hidden=32)
    layer.eval()
    x = torch.randn(3, 16)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            act = layer._kernel_activation
            for n in (1, 2):
                torch.set_num_threads(n)
                limit = moe_module.kernel_max_rows(16, 32, act)
                assert limit in (0.0, math.inf) or limit in moe_module._PROBE_ROWS
                assert moe_module._KERNEL_MAX_ROWS[(16, 32, act, n, "fp32")] == limit
                if limit > 0:
                    assert layer._packed(x, min(limit, 500.0))[0] == "kernel"
                if limit < math.inf:
                    assert layer._packed(x, limit + 1)[0] == "onednn"
            monkeypatch.setenv("WENET_MOE_KERNEL_MAX_ROWS", "8")
            assert layer._packed(x, 8.0)[0] == "kernel"
            assert layer._packed(x, 9.0)[0] == "onednn"
            layer.packed_experts = "kernel"
            assert layer._packed(x, 500.0)[0] == "kernel"
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@needs_onednn
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_max_rows_stops_where_the_kernel_is_slower(monkeypatch, threads):
    """The limit is the last probed size before the one where the kernel is slower than
    oneDNN by more than the margin: a kernel made 30 ms slower from `slow_from` rows per
    expert on gives a limit below it (0.0 from the first size), at 1 and 2 threads."""
    real = cpu_kernel.segment_linear

    def slowed(lib, x, segments, *args, **kwargs):
        real(lib, x, segments, *args, **kwargs)
        if int(segments[1, 0]) >= slow_from:
            time.sleep(0.03)
    monkeypatch.setattr(cpu_kernel, "segment_linear", slowed)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for slow_from, allowed in ((moe_module._PROBE_ROWS[0], (0.0,)),
                                   (64, tuple(r for r in (0.0,) + moe_module._PROBE_ROWS if r < 64))):
            monkeypatch.setattr(moe_module, "_KERNEL_MAX_ROWS", {})
            assert moe_module.kernel_max_rows(16, 32, "relu") in allowed
    finally:
        torch.set_num_threads(previous)


@needs_kernel
def test_segment_linear_matches_matmul_and_leaves_other_rows():
    """Each segment's rows = rows @ W_e + b_e; rows outside segments are not written;
    1..30 rows cover full 12-row tiles and every remainder; x and out may be strided."""
    torch.manual_seed(1)
    n_expert, k_dim, n_dim = 3, 40, 80               # 80 = 5 column blocks (odd)
    weight = torch.randn(n_expert, k_dim, n_dim)
    bias = torch.randn(n_expert, n_dim)
    packed = cpu_kernel.pack_weight(weight)
    for rows in (1, 5, 12, 13, 25, 30):
        x_full = torch.randn(2 * rows + 4, k_dim + 3)
        x = x_full[:, :k_dim]                          # row stride k_dim + 3
        out = torch.full((2 * rows + 4, n_dim), 7.0)
        segments = torch.tensor([[1, rows + 2], [rows, rows], [2, 0]], dtype=torch.int64)
        cpu_kernel.segment_linear(cpu_kernel.library(), x, segments, packed, bias, out)
        want0 = x[1:1 + rows] @ weight[2] + bias[2]
        want1 = x[rows + 2:2 * rows + 2] @ weight[0] + bias[0]
        assert torch.allclose(out[1:1 + rows], want0, atol=1e-4)
        assert torch.allclose(out[rows + 2:2 * rows + 2], want1, atol=1e-4)
        assert torch.all(out[0] == 7.0) and torch.all(out[2 * rows + 2:] == 7.0)
        if rows > 1:
            assert torch.all(out[1 + rows] == 7.0)


@needs_kernel
@pytest.mark.parametrize("activation", ["relu", "swish"])
def test_kernel_fused_activation_matches_torch(activation):
    """The kernel's fused relu / swish (its own vector exp) against torch over the whole
    float range that matters (identity weights: out = act(x + b))."""
    x = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.5, -88.5,
                                                                  3.0e38, -3.0e38])])
    x = torch.nn.functional.pad(x, (0, (-x.numel()) % 16)).view(-1, 16)
    packed = cpu_kernel.pack_weight(torch.eye(16).unsqueeze(0))
    out = torch.empty_like(x)
    segments = torch.tensor([[0], [x.size(0)], [0]], dtype=torch.int64)
    cpu_kernel.segment_linear(cpu_kernel.library(), x, segments, packed, torch.zeros(1, 16), out, activation)
    want = torch.relu(x) if activation == "relu" else torch.nn.functional.silu(x)
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-30), (out - want).abs().max()


@needs_kernel
def test_kernel_moe_forward_matches_loop_and_rejects_bad_ids():
    """The one-call MoE forward (sort, gather, experts, gated add) against a loop over
    frames with torch matmuls, including experts that get no frame; an expert id out
    of range is an error, not a wild read."""
    torch.manual_seed(3)
    n_expert, dim, hidden, n_tok, k = 4, 16, 32, 9, 2
    w1, b1 = torch.randn(n_expert, dim, hidden), torch.randn(n_expert, hidden)
    w2, b2 = torch.randn(n_expert, hidden, dim), torch.randn(n_expert, dim)
    packs = (cpu_kernel.pack_weight(w1), b1, cpu_kernel.pack_weight(w2), b2)
    x = torch.randn(n_tok, dim)
    top_idx = torch.randint(0, 2, (n_tok, k))          # experts 2 and 3 get nothing
    top_idx[:, 1] = 1 - top_idx[:, 0]
    gates = torch.rand(n_tok, k)
    got = cpu_kernel.moe_forward(cpu_kernel.library(), x, top_idx, gates, packs, "relu")
    want = torch.zeros(n_tok, dim)
    for t in range(n_tok):
        for j in range(k):
            e = int(top_idx[t, j])
            want[t] += gates[t, j] * (torch.relu(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        cpu_kernel.moe_forward(cpu_kernel.library(), x, top_idx + 3, gates, packs, "relu")


@needs_kernel
@pytest.mark.parametrize("router,k,frame_embedding,n_expert", [
    ("topk", 2, False, 8), ("topk", 1, False, 8), ("switch", 1, False, 8), ("omni", 2, False, 8),
    ("speechmoe", 2, True, 8), ("topk", 2, False, 6), ("switch", 1, False, 12),
    ("speechmoe", 2, True, 12)])
def test_kernel_routing_in_c_matches_naive(router, k, frame_embedding, n_expert):
    """Eval CPU fp32 inference routes in C and runs the experts in the same call
    (`_kernel_forward`): outputs, chosen experts (largest logit first) and recorded
    routing against the frame-by-frame reference, for every router, k = 1 and 2, and
    the SpeechMoE router input [embedding, x]; routing by torch (`route`) agrees. The
    C router takes experts 8 at a time and frames 4 at a time: 6 and 12 experts and
    2 x 37 frames reach its remainders."""
    torch.manual_seed(11)
    factory, layer = make_layer(router, n_expert=n_expert, k=k, dim=32, hidden=48,
                                frame_embedding=frame_embedding)
    layer.eval()
    for frames in (1, 4, 16, 37):
        x = torch.randn(2, frames, 32)
        emb = torch.randn(2, frames, factory.conf["embed_dim"]) if frame_embedding else EMPTY
        with torch.no_grad():
            flat_emb = emb.reshape(-1, emb.size(-1)) if frame_embedding else EMPTY
            fused = layer._kernel_forward(x.reshape(-1, 32), flat_emb)
            assert fused is not None, "the C kernel path was not taken"
            got = layer(x, emb)
            want = naive_moe(layer, x, emb if frame_embedding else None)
            _, top_idx, _ = layer.route(x.reshape(-1, 32), flat_emb)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
        assert torch.equal(fused[1], top_idx)
        assert torch.equal(moe_module.LAST_ROUTING[layer][1], top_idx.view(2, frames, k))


@needs_kernel
def test_kernel_routing_rebuilt_on_weight_change_and_skipped_for_router_hooks():
    """The prepared C call follows in-place changes of the router's and the experts'
    weights (load_state_dict), and a forward hook on the router still sees every
    forward (routing in torch then)."""
    torch.manual_seed(12)
    _, layer = make_layer("topk", n_expert=8, k=2, dim=32, hidden=48)
    _, other = make_layer("topk", n_expert=8, k=2, dim=32, hidden=48)
    layer.eval()
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        before = layer(x, EMPTY)
        layer.load_state_dict(other.state_dict())
        after = layer(x, EMPTY)
        assert not torch.allclose(before, after, atol=1e-3)
        assert torch.allclose(after, naive_moe(other, x), rtol=1e-4, atol=1e-5)
        seen = []
        layer.router.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        assert layer._kernel_forward(x.reshape(-1, 32), EMPTY) is None
        hooked = layer(x, EMPTY)
    assert seen == [(5, 8)]
    assert torch.allclose(hooked, after, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_kernel_routing_ties_and_limits():
    """Equal logits choose the lower expert first, with gates 1/k (renormalised) or 1/E
    (full softmax); a router with more than 256 experts is refused with one line."""
    x = torch.randn(3, 16)
    packs = (cpu_kernel.pack_weight(torch.randn(8, 16, 16)), torch.zeros(8, 16),
             cpu_kernel.pack_weight(torch.randn(8, 16, 16)), torch.zeros(8, 16))
    lib = cpu_kernel.library()
    for renormalize, gate in ((True, 0.5), (False, 0.125)):
        out, top_idx = cpu_kernel.routed_moe_forward(lib, x, EMPTY, torch.zeros(16, 8), torch.zeros(8), 2,
                                                     renormalize, packs, "relu")
        assert top_idx.tolist() == [[0, 1]] * 3
        want = cpu_kernel.moe_forward(lib, x, top_idx, torch.full((3, 2), gate), packs, "relu")
        assert torch.allclose(out, want, rtol=1e-6, atol=1e-6)
    big = (packs[0].repeat(33, 1, 1, 1), packs[1].repeat(33, 1), packs[2].repeat(33, 1, 1, 1), packs[3].repeat(33, 1))
    with pytest.raises(ValueError, match="at most 256 experts"):
        cpu_kernel.routed_moe_forward(lib, x, EMPTY, torch.zeros(16, 264), None, 2, True, big, "relu")


def test_pack_weight_layout_and_errors():
    weight = torch.arange(2 * 3 * 32, dtype=torch.float32).view(2, 3, 32)
    packed = cpu_kernel.pack_weight(weight)
    assert packed.shape == (2, 2, 3, 16) and packed.is_contiguous()
    for e, j, k, c in [(0, 0, 0, 0), (1, 1, 2, 15), (0, 1, 1, 3), (1, 0, 2, 9)]:
        assert packed[e, j, k, c] == weight[e, k, 16 * j + c]
    with pytest.raises(ValueError, match="N % 16"):
        cpu_kernel.pack_weight(torch.zeros(1, 4, 20))


@needs_kernel
def test_segment_linear_rejects_mismatched_shapes():
    packed = cpu_kernel.pack_weight(torch.zeros(1, 8, 16))
    with pytest.raises(ValueError, match="bad shapes"):
        cpu_kernel.segment_linear(cpu_kernel.library(), torch.zeros(2, 9), torch.zeros(3, 1, dtype=torch.int64),
                                  packed, torch.zeros(1, 16), torch.zeros(2, 16))


def _fresh_kernel_state(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setenv("WENET_MOE_KERNEL_CACHE", str(tmp_path / "cache"))


@needs_kernel
def test_kernel_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    _fresh_kernel_state(monkeypatch, tmp_path)
    assert cpu_kernel.library() is not None
    built = sorted((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"       # no temporary left behind
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernel, "_state", {})
    calls = []
    monkeypatch.setattr(cpu_kernel._native.subprocess, "run", lambda *a, **k: calls.append(a))  # the build
    assert cpu_kernel.library() is not None and calls == []   # reused, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp


def test_kernel_without_compiler_falls_back_with_a_reason(monkeypatch, tmp_path, caplog):
    _fresh_kernel_state(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with caplog.at_level("WARNING"):
        assert cpu_kernel.library() is None
    assert "no-such-compiler-xyz" in cpu_kernel.disabled_reason()
    assert "no-such-compiler-xyz" in caplog.text and "oneDNN" in caplog.text
    _fresh_kernel_state(monkeypatch, tmp_path)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("WENET_MOE_CPU_KERNEL", "0")
    assert cpu_kernel.library() is None and "WENET_MOE_CPU_KERNEL=0" in cpu_kernel.disabled_reason()


def test_kernel_compile_error_names_the_source(monkeypatch, tmp_path):
    _fresh_kernel_state(monkeypatch, tmp_path)
    bad = tmp_path / "moe_cpu.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE", bad)
    assert cpu_kernel.library() is None
    assert "moe_cpu.c" in cpu_kernel.disabled_reason()
    assert list((tmp_path / "cache").iterdir()) == []          # nothing half-written


def test_bad_packed_experts_names_the_key():
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match="moe_conf.packed_experts"):
            make_layer("topk", packed_experts=bad)


@needs_kernel
@pytest.mark.parametrize("activation", ["relu", "swish", "gelu"])
def test_kernel_threads_give_identical_outputs(activation):
    """The C kernel shares its work items among torch's threads: 1 and 2 threads give
    bit-identical outputs (each frame sums its k rows in slot order), equal to the
    frame-by-frame reference, also when one expert gets most rows (split into blocks)."""
    torch.manual_seed(3)
    factory = MoEFactory(32, 64, 0.0, activation, 4, 2, {"router": "topk", "packed_experts": "kernel"},
                         False)
    layer = factory().eval()
    threads = torch.get_num_threads()
    try:
        for frames in (1, 5, 16, 120):
            x = torch.randn(1, frames, 32)
            if frames == 120:      # skew the routing: expert 0 gets nearly every frame
                with torch.no_grad():
                    layer.router.gate.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
            outs = []
            for n in (1, 2):
                torch.set_num_threads(n)
                with torch.inference_mode():
                    assert layer._packed(x.reshape(-1, 32), 500.0)[0] == "kernel"
                    outs.append(layer(x, torch.zeros(0)))
            assert torch.equal(outs[0], outs[1]), f"T={frames}: outputs differ between 1 and 2 threads"
            with torch.no_grad():   # frame by frame, with the layer's activation
                flat = x.reshape(-1, 32)
                _, top_idx, gates = layer.route(flat, torch.zeros(0))
                want = torch.zeros_like(flat)
                for t in range(frames):
                    for e, g in zip(top_idx[t].tolist(), gates[t]):
                        h = layer.activation(flat[t] @ layer.w1[e] + layer.b1[e])
                        want[t] += g * (h @ layer.w2[e] + layer.b2[e])
            assert torch.allclose(outs[0].reshape(-1, 32), want, atol=1e-5, rtol=1e-4), f"T={frames}"
    finally:
        torch.set_num_threads(threads)


def test_packed_experts_lie_in_huge_page_memory(monkeypatch):
    """Packed experts of >= 2 MiB are copied into memory advised for transparent huge
    pages (same values, contiguous, from a 2 MiB boundary) where Linux offers the
    advice; smaller tensors and WENET_MOE_HUGE_PAGES=0 keep the tensor itself."""
    import mmap
    w = torch.randn(4, 256, 1024)                     # 4 MiB of fp32 weights
    packed, _ = cpu_kernel.pack_expert_weight(w, "fp32")
    assert torch.equal(packed, cpu_kernel.pack_weight(w)) and packed.is_contiguous()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert packed.data_ptr() % cpu_kernel.HUGE_PAGE == 0
    q8, _ = cpu_kernel.pack_expert_weight(torch.cat([w, w]), "w8a8")     # 2 MiB of int8
    assert torch.equal(q8, cpu_kernel.pack_weight_q8(cpu_kernel.quantize_int8(torch.cat([w, w]))[0]))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert q8.data_ptr() % cpu_kernel.HUGE_PAGE == 0
    small = torch.randn(16, 16)
    assert cpu_kernel.in_huge_pages(small) is small
    monkeypatch.setenv("WENET_MOE_HUGE_PAGES", "0")
    big = torch.randn(1 << 20)
    assert cpu_kernel.in_huge_pages(big) is big


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
@pytest.mark.parametrize("precision", ["fp32", "int8", "w8a8"])
def test_packing_leaves_no_resident_temporaries(precision):
    """Packed experts cost their own bytes in resident memory: no contiguous copy before
    the huge-page copy, and the quantization temporaries go back to the OS (they stayed
    resident in glibc's heap: int8 / w8a8 packing grew RSS by 3-7x the packed bytes)."""
    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    w = torch.randn(8, 256, 1024)
    cpu_kernel.pack_expert_weight(w, precision)           # warm-up: allocator pools, library
    before = rss_mib()
    kept = [cpu_kernel.pack_expert_weight(w, precision) for _ in range(12)]
    grown = rss_mib() - before
    packed_mib = sum(p.numel() * p.element_size() + (0 if s is None else s.numel() * 4)
                     for p, s in kept) / 2 ** 20
    assert grown < 1.4 * packed_mib + 8, (grown, packed_mib)


# --- accelerator dispatch (grouped GEMM / dense experts): run here on the CPU ---------


def _dispatch_with_grads(layer, fn, x, probe):
    """fn(layer, x_flat, top_idx, gates) -> (out (N, D), grads of every parameter, of x)."""
    xa = x.clone().requires_grad_(True)
    flat = xa.reshape(-1, x.size(-1))
    _, top_idx, gates = layer.route(flat, EMPTY)
    out = fn(layer, flat, top_idx, gates).view_as(x)
    (out * probe).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    return out.detach(), grads, xa.grad


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
@pytest.mark.parametrize("path", ["grouped", "dense"])
@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1), ("omni", 3), ("speechmoe", 2)])
def test_accelerator_dispatch_matches_reference_with_gradients(path, router, k):
    """The grouped-GEMM and dense-experts dispatches (CUDA's, run here on the CPU):
    outputs and the gradients of every parameter and of the input equal the
    frame-by-frame reference; an expert no frame chose gets zero gradient."""
    torch.manual_seed(2)
    _, layer = make_layer(router, n_expert=6, k=k, dim=8, hidden=16)
    x = torch.randn(3, 7, 8)
    probe = torch.randn(3, 7, 8)
    if path == "grouped":
        fn = lambda m, xf, idx, g: m._dispatch_grouped(xf, idx, g)      # noqa: E731
    else:
        fn = lambda m, xf, idx, g: m._dispatch_dense(xf, idx, g)        # noqa: E731
    got, got_grads, got_xgrad = _dispatch_with_grads(layer, fn, x, probe)
    xb = x.clone().requires_grad_(True)
    want = differentiable_reference(layer, xb)
    (want * probe).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got_xgrad, xb.grad, atol=1e-5)
    for (name, p), g in zip(layer.named_parameters(), got_grads):
        assert torch.allclose(g, p.grad, atol=1e-5), name
    # one expert that no frame chooses: its weights get exactly zero gradient
    layer.zero_grad()
    with torch.no_grad():
        layer.router.gate.weight[5] = 0.0
        layer.router.gate.bias[5] = -1e4
    _, grads, _ = _dispatch_with_grads(layer, fn, x, probe)
    named = dict(zip([n for n, _ in layer.named_parameters()], grads))
    assert torch.equal(named["w1"][5], torch.zeros_like(named["w1"][5]))
    assert named["w1"][:5].abs().sum() > 0


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1), ("omni", 3)])
def test_grouped_dispatch_capacity_matches_frame_loop(router, k):
    """Training capacity in the grouped dispatch (kept slots decided on the device):
    outputs and gradients equal the independent frame loop, padding is never kept,
    and the result equals the sorted loop's (the CPU training path)."""
    torch.manual_seed(1)
    _, layer = make_layer(router, n_expert=5, k=k, dim=8, hidden=16, capacity_factor=0.6)
    lengths = [4, 9, 2]
    x, mask = _padded(lengths, 8, seed=3)
    layer.train()
    valid = mask.reshape(-1)
    probe = torch.randn_like(x)
    got, got_grads, _ = _dispatch_with_grads(
        layer, lambda m, xf, idx, g: m._dispatch_grouped(xf, idx, g, valid), x, probe)
    loop, loop_grads, _ = _dispatch_with_grads(
        layer, lambda m, xf, idx, g: m._dispatch_eager(xf, idx, g, valid), x, probe)
    want = capacity_reference(layer, x, lengths)
    (want * probe).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got, loop, atol=1e-5)
    for (name, p), g, gl in zip(layer.named_parameters(), got_grads, loop_grads):
        assert torch.allclose(g, p.grad, atol=1e-5), name
        assert torch.allclose(g, gl, atol=1e-5), name
    for b, n in enumerate(lengths):
        assert torch.equal(got[b, n:], torch.zeros_like(got[b, n:]))
    # not vacuous: some valid assignment overflowed
    layer.capacity_factor = 0.0
    uncapped = layer._dispatch_grouped(*(lambda f: (f,) + layer.route(f, EMPTY)[1:])(x.reshape(-1, 8)), valid)
    assert not torch.allclose(uncapped.view_as(x), got, atol=1e-3)


def test_accelerator_path_choice(monkeypatch):
    """auto: dense for inference on few frames, grouped where the fused grouped GEMM
    runs (bf16 on CUDA 9.0+), else the loop; capacity never takes dense; the override
    is obeyed; unaligned widths never take grouped."""
    _, layer = make_layer("topk", n_expert=4, k=2, dim=8, hidden=16, capacity_factor=1.0)
    small, big = torch.zeros(moe_module.DENSE_MAX_FRAMES, 8), torch.zeros(moe_module.DENSE_MAX_FRAMES + 1, 8)
    monkeypatch.setattr(moe_module, "_grouped_mm_fast", lambda device, dtype: dtype == torch.bfloat16)
    layer.eval()
    assert layer._accelerator_path(small) == "dense"
    assert layer._accelerator_path(big) == "loop"
    assert layer._accelerator_path(big.bfloat16()) == "grouped"
    layer.train()                                   # capacity in force
    assert layer._accelerator_path(small) == "loop"
    assert layer._accelerator_path(small.bfloat16()) == "grouped"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._accelerator_path(big) == "grouped"
    monkeypatch.setattr(moe_module, "ACCELERATOR_DISPATCH", "dense")
    assert layer._accelerator_path(big) == "loop"      # capped: dense cannot drop
    layer.eval()
    assert layer._accelerator_path(big) == "dense"
    monkeypatch.setattr(moe_module, "ACCELERATOR_DISPATCH", "grouped")
    _, odd = make_layer("topk", n_expert=4, k=2, dim=6, hidden=10)
    assert odd._accelerator_path(big[:, :6]) == "loop"
    assert layer._accelerator_path(small) == "grouped"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1), ("speechmoe", 2)])
@pytest.mark.parametrize("frames", [5, 40, 600])
def test_cuda_dispatch_matches_cpu(router, k, frames):
    """On CUDA every dispatch (auto, loop, grouped, dense) in fp32 gives the CPU
    layer's outputs and gradients; under bf16 autocast (auto: dense for few frames,
    grouped for many) frames stay within bf16 rounding, but for the few whose top-k
    choice a rounded logit may flip."""
    torch.manual_seed(0)
    factory, layer = make_layer(router, n_expert=8, k=k, dim=64, hidden=128,
                                frame_embedding=router == "speechmoe")
    layer.eval()                                   # (no dropout either way; auto may pick dense)
    emb = torch.randn(1, frames, factory.router_in - 64) if layer.use_route_emb else EMPTY
    x = torch.randn(1, frames, 64)
    probe = torch.randn_like(x)
    want = layer(x, emb)
    (want * probe).sum().backward()
    want_grads = [p.grad.clone() for p in layer.parameters()]
    cuda = layer.cuda()
    for path in moe_module.ACCELERATOR_PATHS:
        moe_module.ACCELERATOR_DISPATCH = path
        try:
            cuda.zero_grad()
            got = cuda(x.cuda(), emb.cuda())
            (got * probe.cuda()).sum().backward()
            assert torch.allclose(got.cpu(), want, atol=1e-4), path
            for (name, p), g in zip(cuda.named_parameters(), want_grads):
                assert torch.allclose(p.grad.cpu(), g, atol=1e-4), (path, name)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = cuda(x.cuda(), emb.cuda()).float().cpu()
            rel = (low - want).norm(dim=-1) / want.norm(dim=-1)
            assert rel.median() < 0.02 and (rel > 0.05).float().mean() <= 0.05, (path, rel.max())
        finally:
            moe_module.ACCELERATOR_DISPATCH = "auto"


@pytest.mark.parametrize("multiple", [1, 16])
def test_bf16_training_rows_padded_to_a_multiple(multiple, monkeypatch):
    """bf16 autocast training on the CPU pads each expert's rows to BF16_ROW_MULTIPLE
    (every expert GEMM then has a row count that is a multiple of it): the outputs
    and gradients equal those of the unpadded dispatch up to bf16 rounding and the
    frame-by-frame float32 reference within bf16 error."""
    torch.manual_seed(0)
    _, layer = make_layer("topk", n_expert=4, k=2, dim=32, hidden=64)
    x = torch.randn(2, 23, 32)
    probe = torch.randn_like(x)

    def run(mult):
        monkeypatch.setattr(moe_module, "BF16_ROW_MULTIPLE", mult)
        layer.zero_grad()
        xa = x.clone().requires_grad_(True)
        with torch.profiler.profile(record_shapes=True) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(xa, EMPTY)
            (out.float() * probe).sum().backward()
        # the experts' forward GEMMs: addmm(bias, rows (n, K), weight (K, N)), K, N in {D, H}
        rows = [shapes[1][0] for e in prof.key_averages(group_by_input_shape=True)
                if e.key == "aten::addmm" for shapes in [e.input_shapes] if len(shapes) >= 3
                and len(shapes[2]) == 2 and set(shapes[2]) <= {32, 64}]
        return out.float(), [p.grad.clone() for p in layer.parameters()], xa.grad.clone(), rows

    got, grads, xgrad, rows = run(multiple)
    plain, plain_grads, plain_xgrad, plain_rows = run(1)
    assert rows and all(r % multiple == 0 for r in rows), rows
    if multiple > 1:
        assert any(r % multiple for r in plain_rows)   # the batch does need padding
    scale = plain.abs().max()
    assert (got - plain).abs().max() < 0.02 * scale
    for g, h in zip(grads + [xgrad], plain_grads + [plain_xgrad]):
        assert (g - h).abs().max() <= 0.02 * h.abs().max() + 1e-6
    want = differentiable_reference(layer, x)
    assert (got - want.detach()).abs().max() < 0.05 * scale


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
@pytest.mark.parametrize("k", [1, 2])
def test_accelerator_dispatch_of_no_frames(k):
    """No frames (an empty chunk): both accelerator dispatches return (0, D)."""
    _, layer = make_layer("topk", n_expert=4, k=k, dim=8, hidden=16)
    x = torch.zeros(0, 8)
    _, top_idx, gates = layer.route(x, EMPTY)
    assert layer._dispatch_grouped(x, top_idx, gates).shape == (0, 8)
    assert layer._dispatch_dense(x, top_idx, gates).shape == (0, 8)
