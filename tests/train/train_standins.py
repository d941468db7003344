"""Small stand-ins for the model and data pipeline, with the same interfaces
(batch dicts, `model(feats, feats_lengths, target, target_lengths) -> dict`,
`dataset.set_epoch`), used to test the trainer on its own."""
from __future__ import annotations

import os
import socket
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class ToyCTCModel(torch.nn.Module):
    """Frame-wise MLP + CTC; loss is the per-utterance mean (sum over batch / B)."""

    def __init__(self, feat_dim: int = 8, vocab: int = 6, hidden: int = 16, dropout: float = 0.1,
                 blocks: int = 0):
        super().__init__()
        self.proj = torch.nn.Linear(feat_dim, hidden)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(hidden, hidden) for _ in range(blocks)])
        self.drop = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(hidden, vocab)
        self.unused = torch.nn.Linear(2, 2)   # like an idle expert: never gets a gradient

    def forward(self, feats, feats_lengths, target, target_lengths) -> Dict[str, torch.Tensor]:
        h = self.drop(torch.tanh(self.proj(feats)))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        logp = self.out(h).float().log_softmax(-1).transpose(0, 1)     # (T, B, V)
        tgt = target.clamp(min=0)
        ctc = F.ctc_loss(logp, tgt, feats_lengths, target_lengths, reduction="sum", zero_infinity=True)
        loss_ctc = ctc / feats.size(0)
        valid = (torch.arange(feats.size(1)).unsqueeze(0) < feats_lengths.unsqueeze(1)).float()
        frame_l2 = ((h ** 2).mean(-1) * valid).sum() / feats.size(0) / 100.0   # padding-invariant
        return {"loss": loss_ctc + 0.01 * frame_l2, "loss_ctc": loss_ctc, "loss_l2": frame_l2.detach(),
                "th_accuracy": None}


def make_utterances(num_utts: int, feat_dim: int = 8, vocab: int = 6, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    utts = []
    for i in range(num_utts):
        t = int(torch.randint(10, 21, (1,), generator=g))
        n = int(torch.randint(1, 5, (1,), generator=g))
        utts.append((f"utt{i:03d}", torch.randn(t, feat_dim, generator=g),
                     torch.randint(1, vocab, (n,), generator=g)))
    return utts


def collate(items) -> Dict[str, object]:
    feats = torch.nn.utils.rnn.pad_sequence([x for _, x, _ in items], batch_first=True)
    target = torch.nn.utils.rnn.pad_sequence([y for _, _, y in items], batch_first=True, padding_value=-1)
    return {"keys": [k for k, _, _ in items], "feats": feats,
            "feats_lengths": torch.tensor([x.size(0) for _, x, _ in items]),
            "target": target, "target_lengths": torch.tensor([y.size(0) for _, _, y in items]),
            "skipped": {"filtered": 1}}


class ToyDataset(IterableDataset):
    """Deterministic per (seed, epoch); global batches of `batch_size * world_size`
    utterances, of which rank r takes the r-th slice of `batch_size` (so a 2-rank run
    sees exactly the batches of a 1-rank run with twice the batch size). Workers take
    every num_workers-th batch, so the DataLoader order equals the 0-worker order.
    `extra_batches` gives this rank that many additional batches (uneven shards)."""

    def __init__(self, utts, batch_size: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                 extra_batches: int = 0, shuffle: bool = True):
        self.utts = utts
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.extra_batches = extra_batches
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> List[List[int]]:
        n = len(self.utts)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)).tolist()
        else:
            order = list(range(n))
        gb = self.batch_size * self.world_size
        out = []
        for start in range(0, n - gb + 1, gb):
            lo = start + self.rank * self.batch_size
            out.append(order[lo:lo + self.batch_size])
        for i in range(self.extra_batches):
            out.append(order[i * self.batch_size:(i + 1) * self.batch_size])
        return out

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, idx in enumerate(self.batches()):
            if i % nw == wid:
                yield collate([self.utts[j] for j in idx])


def loader(ds, num_workers: int = 0):
    return DataLoader(ds, batch_size=None, num_workers=num_workers,
                      prefetch_factor=2 if num_workers else None)


def base_configs(**over) -> Dict[str, object]:
    conf = {"max_epoch": 2, "accum_grad": 1, "grad_clip": 5.0, "log_interval": 1, "save_interval": 0,
            "dtype": "fp32", "seed": 7, "optim": "adam", "optim_conf": {"lr": 0.01},
            "scheduler": "warmuplr", "scheduler_conf": {"warmup_steps": 4}}
    conf.update(over)
    return conf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world_size: int, port: int, model_dir: str, batch_size: int,
               extra: List[int], configs: Dict[str, object], result_path: str, engine: str = "torch_ddp",
               blocks: int = 0, checkpoint: str = "") -> None:
    """One rank of a gloo DDP run over ToyDataset; rank 0 saves the final weights."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    from wenet_moe.train.dist import cleanup_distributed, init_distributed
    from wenet_moe.train.launch import run_training
    info = init_distributed("cpu")
    torch.manual_seed(configs["seed"])
    model = ToyCTCModel(dropout=0.0, blocks=blocks)
    utts = make_utterances(32)
    train = loader(ToyDataset(utts, batch_size, seed=3, rank=rank, world_size=world_size,
                              extra_batches=extra[rank]))
    cv = loader(ToyDataset(utts[:8], 2, rank=rank, world_size=world_size, shuffle=False))
    trainer = run_training(configs, model, train, cv, model_dir, "cpu", info, show_bar=False, engine=engine,
                           checkpoint=checkpoint or None)
    if engine == "fsdp":
        from wenet_moe.train.fsdp import full_states
        state = full_states(model, trainer.optimizer)["model"]
    else:
        state = model.state_dict()
    if rank == 0:
        torch.save({"model": state, "step": trainer.step}, result_path)
    cleanup_distributed(info)


class _MoEBlock(torch.nn.Module):
    """Pre-norm residual MoE FFN block: (B, T, D), mask (B, 1, T) -> (B, T, D)."""

    def __init__(self, hidden: int, ffn: torch.nn.Module):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.ffn = ffn

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return h + self.ffn(self.norm(h), torch.zeros(0), mask)


class ToyOmniMoEModel(torch.nn.Module):
    """Frame-wise CTC model whose blocks are Omni-Router MoE FFNs: one router module
    shared by every block (as in an encoder stack), top-2 of 3 experts, with the balance
    loss. `route_gaps` collects, per forward, the smallest gap between the k-th and the
    (k+1)-th router logit over the frames (how far routing is from a tie)."""

    def __init__(self, feat_dim: int = 8, vocab: int = 6, hidden: int = 16, blocks: int = 2):
        super().__init__()
        from wenet_moe.layers.moe import MoEFactory
        self.proj = torch.nn.Linear(feat_dim, hidden)
        factory = MoEFactory(hidden, 16, 0.0, "relu", 3, 2, {"router": "omni", "balance_weight": 0.0}, False)
        self.blocks = torch.nn.ModuleList([_MoEBlock(hidden, factory()) for _ in range(blocks)])
        self.out = torch.nn.Linear(hidden, vocab)
        self.route_gaps: List[float] = []
        self.blocks[0].ffn.router.register_forward_hook(self._gap)

    def _gap(self, module, args, logits) -> None:
        top = torch.topk(logits.detach(), 3, dim=-1).values
        self.route_gaps.append(float((top[:, 1] - top[:, 2]).min()))

    def forward(self, feats, feats_lengths, target, target_lengths) -> Dict[str, torch.Tensor]:
        from wenet_moe.layers.moe import moe_aux_losses
        h = torch.tanh(self.proj(feats))
        mask = (torch.arange(feats.size(1)).unsqueeze(0) < feats_lengths.unsqueeze(1)).unsqueeze(1)
        for block in self.blocks:
            h = block(h, mask)
        logp = self.out(h).float().log_softmax(-1).transpose(0, 1)
        ctc = F.ctc_loss(logp, target.clamp(min=0), feats_lengths, target_lengths, reduction="sum",
                         zero_infinity=True) / feats.size(0)
        out = {"loss_ctc": ctc, "th_accuracy": None}
        loss = ctc
        for name, (value, weight) in moe_aux_losses(self, feats_lengths, None, None).items():
            loss = loss + weight * value
            out[name] = value.detach()
        out["loss"] = loss
        return out


def omni_worker(rank: int, world_size: int, port: int, model_dir: str, configs: Dict[str, object],
                result_path: str, checkpoint: str = "") -> None:
    """One rank of a 2-process gloo FSDP run of ToyOmniMoEModel (global batch 4, 2 per
    rank); rank 0 saves the final full weights."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    from wenet_moe.train.dist import cleanup_distributed, init_distributed
    from wenet_moe.train.fsdp import full_states
    from wenet_moe.train.launch import run_training
    info = init_distributed("cpu")
    torch.manual_seed(configs["seed"])
    model = ToyOmniMoEModel()
    utts = make_utterances(32)
    train = loader(ToyDataset(utts, 2, seed=3, rank=rank, world_size=world_size))
    cv = loader(ToyDataset(utts[:8], 2, rank=rank, world_size=world_size, shuffle=False))
    trainer = run_training(configs, model, train, cv, model_dir, "cpu", info, show_bar=False, engine="fsdp",
                           checkpoint=checkpoint or None)
    state = full_states(model, trainer.optimizer)["model"]
    if rank == 0:
        torch.save({"model": state, "step": trainer.step}, result_path)
    cleanup_distributed(info)
