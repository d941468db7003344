"""2-process gloo DDP on CPU equals one process with the same global batch, and
uneven shards end the epoch without hanging."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from train_standins import ToyCTCModel, ToyDataset, base_configs, ddp_worker, free_port, loader, make_utterances
from wenet_moe.train.launch import run_training

pytestmark = pytest.mark.timeout(240)


def _spawn(tmp_path, name, extra, configs, batch_size=2):
    result = str(tmp_path / f"{name}.pt")
    mp.start_processes(ddp_worker, args=(2, free_port(), str(tmp_path / name), batch_size, extra, configs, result),
                       nprocs=2, join=True, start_method="spawn")
    return torch.load(result, weights_only=False)


def _single(tmp_path, configs, batch_size=4):
    torch.manual_seed(configs["seed"])
    model = ToyCTCModel(dropout=0.0)
    utts = make_utterances(32)
    trainer = run_training(configs, model, loader(ToyDataset(utts, batch_size, seed=3)),
                           loader(ToyDataset(utts[:8], 4, shuffle=False)), str(tmp_path / "single"),
                           show_bar=False)
    return model, trainer


def test_ddp_two_ranks_match_single_process(tmp_path):
    configs = base_configs(max_epoch=2, accum_grad=2, optim_conf={"lr": 0.02})
    ddp = _spawn(tmp_path, "ddp", [0, 0], configs)
    model, trainer = _single(tmp_path, configs)
    assert ddp["step"] == trainer.step == 8                      # 32 utts / 4 = 8 batches, accum 2
    for k, v in model.state_dict().items():
        assert torch.allclose(ddp["model"][k], v, atol=1e-5), f"{k}: {(ddp['model'][k] - v).abs().max():.3g}"
    # cv losses recorded by rank 0 (all-reduced over both ranks' cv shards) agree with 1 process
    import yaml
    cv_ddp = yaml.safe_load(open(tmp_path / "ddp" / "1.yaml"))["cv_loss"]
    cv_one = yaml.safe_load(open(tmp_path / "single" / "1.yaml"))["cv_loss"]
    assert cv_ddp == pytest.approx(cv_one, rel=1e-4)


def test_ddp_uneven_shards_finish(tmp_path):
    configs = base_configs(max_epoch=2)
    out = _spawn(tmp_path, "uneven", [3, 0], configs)   # rank 0 has 3 extra batches
    # both ranks stop with the shorter partition: 32 / (2*2) = 8 steps per epoch
    assert out["step"] == 16
    assert sorted(os.listdir(tmp_path / "uneven")) == ["0.pt", "0.yaml", "1.pt", "1.yaml", "final.pt"]


@pytest.mark.slow
def test_fsdp_two_ranks_match_single_process_and_resume(tmp_path):
    """--train_engine fsdp (FSDP2 over gloo): same weights as one process; its
    checkpoints are full state dicts that resume (optimizer included) under FSDP."""
    configs = base_configs(max_epoch=2, accum_grad=2, optim_conf={"lr": 0.02}, save_interval=3)
    result = str(tmp_path / "fsdp.pt")
    args = (2, free_port(), str(tmp_path / "fsdp"), 2, [0, 1], configs, result, "fsdp", 1)
    mp.start_processes(ddp_worker, args=args, nprocs=2, join=True, start_method="spawn")
    out = torch.load(result, weights_only=False)
    torch.manual_seed(configs["seed"])
    model = ToyCTCModel(dropout=0.0, blocks=1)
    utts = make_utterances(32)
    run_training(configs, model, loader(ToyDataset(utts, 4, seed=3)), loader(ToyDataset(utts[:8], 4, shuffle=False)),
                 str(tmp_path / "single"), show_bar=False)
    assert out["step"] == 8
    for k, v in model.state_dict().items():
        assert torch.allclose(out["model"][k], v, atol=1e-5), k
    ep = torch.load(tmp_path / "fsdp" / "1.pt", weights_only=False)
    for k, v in model.state_dict().items():      # a plain full state dict on disk
        assert isinstance(ep["model"][k], torch.Tensor) and torch.allclose(ep["model"][k], v, atol=1e-5)
    # ... and the optimizer state is the single-process layout with the same Adam moments
    single = torch.load(tmp_path / "single" / "1.pt", weights_only=False)["optimizer"]
    assert ep["optimizer"]["param_groups"][0]["params"] == single["param_groups"][0]["params"]
    assert sorted(ep["optimizer"]["state"]) == sorted(single["state"])
    for idx, entry in single["state"].items():
        for name, value in entry.items():
            got = ep["optimizer"]["state"][idx][name]
            assert got.shape == value.shape and torch.allclose(got, value, atol=1e-6), (idx, name)

    # resume from the step-6 checkpoint (mid epoch 1) under FSDP: same end point
    result2 = str(tmp_path / "fsdp_resumed.pt")
    args = (2, free_port(), str(tmp_path / "fsdp"), 2, [0, 1], configs, result2, "fsdp", 1,
            str(tmp_path / "fsdp" / "step_6.pt"))
    mp.start_processes(ddp_worker, args=args, nprocs=2, join=True, start_method="spawn")
    resumed = torch.load(result2, weights_only=False)
    for k, v in out["model"].items():
        assert torch.allclose(resumed["model"][k], v, atol=1e-6), k


def test_load_optimizer_reads_name_keyed_state():
    """FSDP checkpoints written by torch's get_optimizer_state_dict (parameter names as
    keys) still load: the state lands on the same parameters."""
    from wenet_moe.train.fsdp import load_optimizer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).pow(2).sum().backward()
    opt.step()
    plain = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    named = {"state": {names[i]: entry for i, entry in plain["state"].items()},
             "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in plain["param_groups"]]}
    fresh = torch.optim.Adam(model.parameters(), lr=0.5)
    load_optimizer(model, fresh, named)
    loaded = fresh.state_dict()
    assert loaded["param_groups"][0]["lr"] == 0.1
    for i, p in enumerate(model.parameters()):
        assert torch.equal(fresh.state[p]["exp_avg"], plain["state"][i]["exp_avg"])
        assert torch.equal(fresh.state[p]["exp_avg_sq"], plain["state"][i]["exp_avg_sq"])


@pytest.mark.slow
def test_fsdp_omni_router_two_ranks_match_single_process_and_resume(tmp_path):
    """FSDP with an Omni-Router (one router module used by every block): 2 gloo ranks
    give one process's weights, the router's included, the checkpoint holds the shared
    router once per block with one value, and resuming mid-epoch under FSDP lands on
    the same end point."""
    from train_standins import ToyOmniMoEModel, omni_worker
    configs = base_configs(max_epoch=2, accum_grad=2, optim_conf={"lr": 0.02}, save_interval=3)
    torch.manual_seed(configs["seed"])
    model = ToyOmniMoEModel()
    utts = make_utterances(32)
    run_training(configs, model, loader(ToyDataset(utts, 4, seed=3)), loader(ToyDataset(utts[:8], 4, shuffle=False)),
                 str(tmp_path / "single"), show_bar=False)
    # routing is decided by a wide margin in every forward: the ~1e-6 differences between
    # the sharded and the single-process run cannot flip an expert choice
    assert min(model.route_gaps) > 1e-4, min(model.route_gaps)
    router_keys = [k for k in model.state_dict() if k.endswith("router.gate.weight")]
    assert router_keys == ["blocks.0.ffn.router.gate.weight", "blocks.1.ffn.router.gate.weight"]

    result = str(tmp_path / "fsdp.pt")
    mp.start_processes(omni_worker, args=(2, free_port(), str(tmp_path / "fsdp"), configs, result),
                       nprocs=2, join=True, start_method="spawn")
    out = torch.load(result, weights_only=False)
    assert out["step"] == 8
    assert sorted(out["model"]) == sorted(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.allclose(out["model"][k], v, atol=1e-5), f"{k}: {(out['model'][k] - v).abs().max():.3g}"
    torch.manual_seed(configs["seed"])
    start = ToyOmniMoEModel()
    moved = (model.blocks[0].ffn.router.gate.weight - start.blocks[0].ffn.router.gate.weight).abs().max()
    assert moved > 1e-3                                          # the router did train
    ep = torch.load(tmp_path / "fsdp" / "1.pt", weights_only=False)
    assert torch.equal(ep["model"][router_keys[0]], ep["model"][router_keys[1]])

    # resume from the step-6 checkpoint (mid epoch 1) under FSDP: same end point
    result2 = str(tmp_path / "fsdp_resumed.pt")
    mp.start_processes(omni_worker, args=(2, free_port(), str(tmp_path / "fsdp"), configs, result2,
                                          str(tmp_path / "fsdp" / "step_6.pt")),
                       nprocs=2, join=True, start_method="spawn")
    resumed = torch.load(result2, weights_only=False)
    for k, v in out["model"].items():
        assert torch.allclose(resumed["model"][k], v, atol=1e-6), k


def test_fsdp_shards_each_stacks_shared_router_as_its_own_unit():
    """A real omni encoder + U2++ decoder pair: the two shared routers (encoder's; both
    decoder directions') are the modules FSDP shards before the blocks; nothing else is."""
    from wenet_moe.model.decoder import BiTransformerDecoder
    from wenet_moe.model.encoder import ConformerEncoder
    from wenet_moe.train.fsdp import _outermost_blocks, _shared_modules
    moe = dict(mlp_type="moe", n_expert=3, n_expert_activated=2)
    model = torch.nn.ModuleDict({
        "encoder": ConformerEncoder(8, moe_conf={"router": "omni"}, output_size=16, attention_heads=2,
                                    linear_units=8, num_blocks=2, **moe),
        "decoder": BiTransformerDecoder(7, 16, attention_heads=2, linear_units=8, num_blocks=2, r_num_blocks=1,
                                        moe_conf={"router": "omni"}, **moe)})
    blocks = _outermost_blocks(model)
    assert len(blocks) == 2 + 2 + 1
    shared = _shared_modules(model, blocks)
    assert len(shared) == 2
    assert shared[0] is model["encoder"].encoders[1].feed_forward.router
    assert shared[1] is model["decoder"].right_decoder.decoders[0].feed_forward.router
    # per-layer routers (topk) are not shared: every block keeps its own
    dense = torch.nn.ModuleDict({"encoder": ConformerEncoder(8, moe_conf={"router": "topk"}, output_size=16,
                                                             attention_heads=2, linear_units=8, num_blocks=2,
                                                             **moe)})
    assert _shared_modules(dense, _outermost_blocks(dense)) == []
