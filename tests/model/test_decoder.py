"""Attention decoders: incremental decoding, padding, TorchScript, MoE FFN slot."""
import pytest
import torch

from wenet_moe.model.decoder import BiTransformerDecoder, TransformerDecoder
from wenet_moe.model.masks import subsequent_mask

V, D = 11, 16


def _decoder(cls=TransformerDecoder, **kw):
    torch.manual_seed(0)
    args = dict(attention_heads=2, linear_units=24, num_blocks=2, dropout_rate=0.0,
                positional_dropout_rate=0.0)
    if cls is BiTransformerDecoder:
        args["r_num_blocks"] = 1
    args.update(kw)
    return cls(V, D, **args).eval()


def _inputs(batch=3, t=9, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch, t, D, generator=g)
    mem_lens = torch.tensor([t, t - 3, t - 5][:batch])
    memory_mask = (torch.arange(t).unsqueeze(0) < mem_lens.unsqueeze(1)).unsqueeze(1)
    ys = torch.randint(0, V, (batch, length), generator=g)
    ys_lens = torch.tensor([length, length - 2, 2][:batch])
    return memory, memory_mask, ys, ys_lens


@pytest.mark.parametrize("normalize_before", [True, False])
def test_incremental_steps_equal_teacher_forcing(normalize_before):
    dec = _decoder(normalize_before=normalize_before)
    memory, memory_mask, ys, _ = _inputs()
    full_lens = torch.full((3,), ys.size(1))
    with torch.no_grad():
        logits, r_logits, olens = dec(memory, memory_mask, ys, full_lens)
        full = torch.log_softmax(logits, -1)
        cache = []
        for i in range(1, ys.size(1) + 1):
            mask = subsequent_mask(i).unsqueeze(0).expand(3, i, i)
            logp, cache = dec.forward_one_step(memory, memory_mask, ys[:, :i], mask, cache)
            assert len(cache) == 2 and cache[0].shape == (3, i, D)
            torch.testing.assert_close(logp, full[:, i - 1], atol=1e-5, rtol=1e-5)
    assert r_logits.dim() == 0 and torch.equal(olens, full_lens)


def test_padding_does_not_change_valid_positions():
    dec = _decoder()
    memory, memory_mask, ys, ys_lens = _inputs()
    with torch.no_grad():
        batched = dec(memory, memory_mask, ys, ys_lens)[0]
        for b in range(3):
            t = int(memory_mask[b, 0].sum())
            n = int(ys_lens[b])
            alone = dec(memory[b:b + 1, :t], memory_mask[b:b + 1, :, :t], ys[b:b + 1, :n],
                        ys_lens[b:b + 1])[0]
            torch.testing.assert_close(batched[b, :n], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [TransformerDecoder, BiTransformerDecoder])
def test_targets_in_groups_share_a_memory_row(cls):
    """M memory rows serving M groups of consecutive targets (an utterance's n-best)
    give what one copy of the row per target gives, in teacher forcing (both
    directions), in incremental steps and scripted; a batch that does not split into
    equal groups is refused with a one-line error."""
    dec = _decoder(cls)
    memory, memory_mask, _, _ = _inputs(batch=2)
    g = torch.Generator().manual_seed(5)
    ys = torch.randint(0, V, (6, 5), generator=g)
    ys_lens = torch.tensor([5, 3, 1, 4, 5, 2])
    copies, copy_mask = memory.repeat_interleave(3, 0), memory_mask.repeat_interleave(3, 0)
    r_ys = torch.flip(ys, [1])
    scripted = torch.jit.script(dec)
    with torch.no_grad():
        for run in (dec, scripted):
            shared = run(memory, memory_mask, ys, ys_lens, r_ys, 0.5)
            alone = run(copies, copy_mask, ys, ys_lens, r_ys, 0.5)
            for a, b in zip(shared, alone):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            cache_a, cache_b = [], []
            for i in range(1, 4):
                mask = subsequent_mask(i).unsqueeze(0).expand(6, i, i)
                step_a, cache_a = run.forward_one_step(memory, memory_mask, ys[:, :i], mask, cache_a)
                step_b, cache_b = run.forward_one_step(copies, copy_mask, ys[:, :i], mask, cache_b)
                torch.testing.assert_close(step_a, step_b, atol=1e-5, rtol=1e-5)
        # the padded memory row 1 masks its last frames for its own group only
        changed = memory.clone()
        changed[1, 7:] += 100.0
        torch.testing.assert_close(dec(changed, memory_mask, ys, ys_lens, r_ys, 0.5)[0], shared[0])
        with pytest.raises(ValueError, match=r"5 target rows do not split into groups over memory "
                                             r"of shape \(2, 9, 16\)"):
            dec(memory, memory_mask, ys[:5], ys_lens[:5], r_ys[:5], 0.5)


def test_bidirectional_runs_right_decoder_only_with_reverse_weight():
    dec = _decoder(BiTransformerDecoder)
    memory, memory_mask, ys, ys_lens = _inputs()
    r_ys = torch.flip(ys, [1])
    with torch.no_grad():
        l0, r0, _ = dec(memory, memory_mask, ys, ys_lens, r_ys, 0.0)
        l1, r1, _ = dec(memory, memory_mask, ys, ys_lens, r_ys, 0.3)
        right = dec.right_decoder(memory, memory_mask, r_ys, ys_lens)[0]
        left = dec.left_decoder(memory, memory_mask, ys, ys_lens)[0]
    assert r0.dim() == 0
    torch.testing.assert_close(l0, l1)
    torch.testing.assert_close(l1, left)
    torch.testing.assert_close(r1, right)
    assert len(dec.left_decoder.decoders) == 2 and len(dec.right_decoder.decoders) == 1


def test_scripted_decoder_matches_eager():
    dec = _decoder(BiTransformerDecoder)
    scripted = torch.jit.script(dec)
    memory, memory_mask, ys, ys_lens = _inputs()
    r_ys = torch.flip(ys, [1])
    with torch.no_grad():
        for a, b in zip(dec(memory, memory_mask, ys, ys_lens, r_ys, 0.5),
                        scripted(memory, memory_mask, ys, ys_lens, r_ys, 0.5)):
            torch.testing.assert_close(a, b)
        mask = subsequent_mask(2).unsqueeze(0).expand(3, 2, 2)
        e = dec.forward_one_step(memory, memory_mask, ys[:, :2], mask, [])
        s = scripted.forward_one_step(memory, memory_mask, ys[:, :2], mask, [])
        torch.testing.assert_close(e[0], s[0])


def test_moe_ffn_slot_one_factory_per_stack():
    from wenet_moe.layers.moe import MoEFFN
    dec = _decoder(BiTransformerDecoder, mlp_type="moe", n_expert=3, n_expert_activated=2)
    ffns = [layer.feed_forward for layer in dec.left_decoder.decoders]
    assert all(isinstance(f, MoEFFN) for f in ffns)
    assert isinstance(dec.right_decoder.decoders[0].feed_forward, MoEFFN)
    # Omni-Router: one router for the decoders, shared by every layer of both directions
    omni = _decoder(BiTransformerDecoder, mlp_type="moe", n_expert=3, n_expert_activated=1,
                    moe_conf={"router": "omni"})
    routers = [layer.feed_forward.router for stack in (omni.left_decoder, omni.right_decoder)
               for layer in stack.decoders]
    assert len(routers) == 3 and all(r is routers[0] for r in routers)
    memory, memory_mask, ys, ys_lens = _inputs()
    with torch.no_grad():
        out = omni(memory, memory_mask, ys, ys_lens, torch.flip(ys, [1]), 0.5)
    assert out[0].shape == (3, ys.size(1), V) and torch.isfinite(out[1]).all()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="input_layer"):
        _decoder(input_layer="conv1d")
    with pytest.raises(ValueError, match="r_num_blocks"):
        _decoder(BiTransformerDecoder, r_num_blocks=0)


def test_omni_router_shared_by_both_directions(tmp_path):
    """One Omni-Router for the decoders: counted once among the parameters, trained by
    both directions, saved under every layer's key with one value, and the scripted
    decoder equals the eager one."""
    from wenet_moe.checkpoint_io import load_model_weights
    omni = _decoder(BiTransformerDecoder, mlp_type="moe", n_expert=3, n_expert_activated=2,
                    moe_conf={"router": "omni", "balance_weight": 0.0}).train()
    router = omni.left_decoder.decoders[0].feed_forward.router
    per_layer = [n for n in omni.state_dict() if n.endswith("feed_forward.router.gate.weight")]
    assert len(per_layer) == 3
    named = [n for n, _ in omni.named_parameters() if "router" in n]
    assert named == ["left_decoder.decoders.0.feed_forward.router.gate.weight",
                     "left_decoder.decoders.0.feed_forward.router.gate.bias"]
    memory, memory_mask, ys, ys_lens = _inputs()
    r_ys = torch.flip(ys, [1])
    # the right-to-left direction alone moves the shared router
    _, r_logits, _ = omni(memory, memory_mask, ys, ys_lens, r_ys, 1.0)
    omni.zero_grad()
    r_logits.pow(2).sum().backward()
    assert router.gate.weight.grad.abs().sum().item() > 1e-6
    # a checkpoint round trip through state_dict keeps the sharing
    state = omni.state_dict()
    assert all(torch.equal(state[n], state[per_layer[0]]) for n in per_layer)
    other = _decoder(BiTransformerDecoder, mlp_type="moe", n_expert=3, n_expert_activated=2,
                     moe_conf={"router": "omni"})
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    torch.save(state, tmp_path / "dec.pt")
    load_model_weights(other, str(tmp_path / "dec.pt"))
    assert other.right_decoder.decoders[0].feed_forward.router is other.left_decoder.decoders[0].feed_forward.router
    assert torch.equal(other.right_decoder.decoders[0].feed_forward.router.gate.weight, router.gate.weight)
    omni.eval()
    scripted = torch.jit.script(omni)
    with torch.no_grad():
        for a, b in zip(omni(memory, memory_mask, ys, ys_lens, r_ys, 0.5),
                        scripted(memory, memory_mask, ys, ys_lens, r_ys, 0.5)):
            torch.testing.assert_close(a, b)


def test_decoder_hands_valid_positions_to_every_moe_ffn():
    """Teacher forcing: every MoE FFN of both directions gets the (B, 1, L) mask of the
    valid target positions (for the capacity limit)."""
    from wenet_moe.layers.moe import MoEFFN
    dec = _decoder(BiTransformerDecoder, mlp_type="moe", n_expert=3, n_expert_activated=2,
                   moe_conf={"router": "topk", "capacity_factor": 1.0}).train()
    seen = []
    for module in dec.modules():
        if isinstance(module, MoEFFN):
            module.register_forward_pre_hook(lambda m, args: seen.append(args[2].clone()))
    memory, memory_mask, ys, ys_lens = _inputs()
    dec(memory, memory_mask, ys, ys_lens, torch.flip(ys, [1]), 0.5)
    want = (torch.arange(ys.size(1))[None] < ys_lens[:, None]).unsqueeze(1)
    assert len(seen) == 3
    for mask in seen:
        assert torch.equal(mask, want)
