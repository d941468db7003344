"""`Dataset`: data list (raw JSON lines or tar shards) -> padded feature batches.

Pipeline (one per DataLoader worker): list-level shuffle -> partition by DDP
rank and worker -> source (raw | shard, the only stage that differs) -> decode
-> resample -> tokenize -> filter -> speed perturb -> reverb -> noise -> fbank
-> spec_aug -> spec_sub -> spec_trim -> shuffle -> sort -> batch -> pad.

Every random choice comes from generators seeded by (seed, epoch, rank, worker,
stage), so `set_epoch(e)` reproduces the same batches for epoch e.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wenet_moe.config import ConfigError
from wenet_moe.data import augment
from wenet_moe.data import processors as P
from wenet_moe.data.conf import resolve_dataset_conf
from wenet_moe.data.features import fbank_options

def read_list(path: str) -> List[Tuple[int, str]]:
    """Non-empty lines of a data/shard list as (lineno, text); errors name the file."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return [(i, line.rstrip("\n")) for i, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise ValueError(f"{path}: cannot read data list: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: data list is not UTF-8 ({e.reason})") from None


def partition_indices(n: int, rank: int, world_size: int, worker: int, num_workers: int) -> List[int]:
    """Positions of a list of n entries read by (rank, worker): round robin over
    world_size * num_workers readers, so each entry is read by exactly one."""
    readers = world_size * num_workers
    return list(range(rank * num_workers + worker, n, readers))


class Dataset(IterableDataset):
    """Iterable over batch dicts (see `processors.pad_batch`).

    Args:
        data_type: "raw" (JSON lines) or "shard" (one tar path per line).
        data_list_file: the list.
        tokenizer: from `build_tokenizer`.
        conf: `dataset_conf` (checked; defaults filled in).
        partition: split the list by DDP rank (torch.distributed) and worker.
        seed: base of every random choice.
        rank, world_size: override the DDP rank/size (None: from torch.distributed).
    """

    def __init__(self, data_type: str, data_list_file: str, tokenizer, conf: Optional[Dict[str, Any]],
                 partition: bool = True, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        super().__init__()
        if data_type not in ("raw", "shard"):
            raise ConfigError(f"data_type: '{data_type}' is not raw or shard")
        self.data_type = data_type
        self.data_list_file = data_list_file
        self.tokenizer = tokenizer
        self.conf = resolve_dataset_conf(conf)
        self.sample_rate = int(self.conf["resample_conf"]["resample_rate"])
        self.fbank_opts = fbank_options(self.conf["fbank_conf"], self.sample_rate)
        self.feat_dim = self.fbank_opts.num_mel_bins
        self.partition = partition
        self.seed = int(seed)
        self._rank, self._world = rank, world_size
        self.lines = read_list(data_list_file)
        self.epoch = 0
        if self.conf["add_noise"]:  # fail now (not in a worker) on a bad noise list
            nc = self.conf["noise_conf"]
            augment.NoiseSource(nc["noise_list"], self.sample_rate, nc["snr_db"])
        self.rir_bank: Optional[augment.RirBank] = None
        if self.conf["reverb"]:  # computed once here; DataLoader workers inherit it
            rc = self.conf["rir_conf"]
            self.rir_bank = augment.RirBank(self.sample_rate, rc["num_rirs"], rc["room_dim"], rc["rt60"], rc["seed"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rank_world(self) -> Tuple[int, int]:
        if not self.partition:
            return 0, 1
        if self._rank is not None:
            return int(self._rank), int(self._world or 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _rng(self, rank: int, worker: int, stage: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, rank, worker, stage])

    def _my_lines(self, rank: int, world: int, worker: int, num_workers: int) -> List[Tuple[str, int, str]]:
        order = np.arange(len(self.lines))
        if self.conf["list_shuffle"]:
            rng = np.random.default_rng([self.seed, self.epoch, 7919])  # same on every reader
            size = int(self.conf["list_shuffle_conf"]["shuffle_size"] or 0)
            if size <= 0 or size >= len(order):
                order = rng.permutation(order)
            else:
                order = np.concatenate([rng.permutation(order[i:i + size]) for i in range(0, len(order), size)])
        if not self.partition:
            rank, world, worker, num_workers = 0, 1, 0, 1
        picked = partition_indices(len(order), rank, world, worker, num_workers)
        return [(self.data_list_file,) + self.lines[order[i]] for i in picked]

    def _waveform_augment(self, data, rank: int, worker: int):
        conf, rate = self.conf, self.sample_rate
        if conf["speed_perturb"]:
            speeds = [float(x) for x in conf["speed_perturb_conf"]["speeds"]]

            def speed(s, rng):
                s["samples"] = augment.speed_perturb(s["samples"], speeds[int(rng.integers(0, len(speeds)))])
            data = P.map_stage(data, speed, self._rng(rank, worker, 1))
        if conf["reverb"] and self.rir_bank is not None:
            rc, bank = conf["rir_conf"], self.rir_bank

            def reverb(s, rng):
                if rng.random() < rc["prob"]:
                    s["samples"] = bank(s["samples"], rng)
            data = P.map_stage(data, reverb, self._rng(rank, worker, 2))
        if conf["add_noise"]:
            nc = conf["noise_conf"]
            noise = augment.NoiseSource(nc["noise_list"], rate, nc["snr_db"])

            def add_noise(s, rng):
                if rng.random() < nc["prob"]:
                    s["samples"] = noise(s["samples"], rng)
            data = P.map_stage(data, add_noise, self._rng(rank, worker, 3))
        return data

    def _feature_augment(self, data, rank: int, worker: int):
        conf = self.conf
        if conf["spec_aug"]:
            c = conf["spec_aug_conf"]

            def aug(s, rng):
                s["feats"] = augment.spec_aug(s["feats"], rng, c["num_t_mask"], c["num_f_mask"], c["max_t"], c["max_f"])
            data = P.map_stage(data, aug, self._rng(rank, worker, 5))
        if conf["spec_sub"]:
            c2 = conf["spec_sub_conf"]

            def sub(s, rng):
                s["feats"] = augment.spec_sub(s["feats"], rng, c2["max_t"], c2["num_t_sub"])
            data = P.map_stage(data, sub, self._rng(rank, worker, 6))
        if conf["spec_trim"]:
            c3 = conf["spec_trim_conf"]

            def trim(s, rng):
                s["feats"] = augment.spec_trim(s["feats"], rng, c3["max_t"])
            data = P.map_stage(data, trim, self._rng(rank, worker, 7))
        return data

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        rank, world = self.rank_world()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        conf = self.conf
        skips = P.SkipCounter()
        lines = self._my_lines(rank, world, worker, num_workers)
        source = P.raw_source if self.data_type == "raw" else P.shard_source
        data = source(lines, skips)
        data = P.decode_audio(data, skips)
        rc = conf["resample_conf"]
        data = P.resample_stage(data, skips, self.sample_rate, rc["allowed_rates"])
        data = P.tokenize_stage(data, skips, self.tokenizer)
        data = P.filter_stage(data, skips, **conf["filter_conf"])
        data = self._waveform_augment(data, rank, worker)
        data = P.fbank_stage(data, self.fbank_opts, self._rng(rank, worker, 4))
        data = self._feature_augment(data, rank, worker)
        if conf["shuffle"]:
            data = P.shuffle_stage(data, self._rng(rank, worker, 8), int(conf["shuffle_conf"]["shuffle_size"]))
        if conf["sort"]:
            data = P.sort_stage(data, int(conf["sort_conf"]["sort_size"]))
        bc = conf["batch_conf"]
        if bc["batch_type"] == "static":
            batches = P.static_batch(data, int(bc["batch_size"]))
        elif bc["batch_type"] == "bucket":
            batches = P.bucket_batch(data, bc["bucket_boundaries"], bc["bucket_batch_sizes"])
        else:
            batches = P.dynamic_batch(data, skips, int(bc["max_frames_in_batch"]))
        # One batch of look-ahead: the last batch is padded after the source is
        # exhausted, so it carries every trailing skip count.
        held = None
        for batch in batches:
            if held is not None:
                yield P.pad_batch(held, skips.take(), self.feat_dim)
            held = batch
        if held is not None:
            yield P.pad_batch(held, skips.take(), self.feat_dim)
        elif skips.any():
            # No usable utterance at all for this reader: report the counts in a
            # batch of zero utterances rather than losing them.
            logging.warning("data reader rank %d worker %d: no usable utterance", rank, worker)
            yield P.pad_batch([], skips.take(), self.feat_dim)


def build_dataloader(dataset: Dataset, num_workers: int = 0, prefetch: int = 2,
                     pin_memory: bool = False) -> DataLoader:
    """DataLoader over already-batched items (batch_size=None)."""
    kw: Dict[str, Any] = {}
    if num_workers > 0:
        kw["prefetch_factor"] = max(1, int(prefetch))
        kw["worker_init_fn"] = _worker_init
    return DataLoader(dataset, batch_size=None, num_workers=int(num_workers), pin_memory=pin_memory, **kw)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)
