"""Dataset pipeline: raw vs shard, batching bounds, partitions, skipped items, epochs, config."""
import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from wenet_moe.config import ConfigError
from wenet_moe.data import Dataset, build_dataloader, eval_dataset_conf, resolve_dataset_conf
from wenet_moe.data.features import fbank_options
from wenet_moe_runtime.features import compute_fbank

from data_corpus import make_corpus, write_list, write_shards

TRAIN_CONF = {
    "filter_conf": {"max_length": 2000, "min_length": 10},
    "speed_perturb": True,
    "fbank_conf": {"num_mel_bins": 40, "frame_shift": 10, "frame_length": 25, "dither": 1.0},
    "spec_aug": True, "spec_aug_conf": {"num_t_mask": 2, "num_f_mask": 2, "max_t": 10, "max_f": 5},
    "spec_sub": True, "spec_trim": True,
    "shuffle": True, "shuffle_conf": {"shuffle_size": 7},
    "sort": True, "sort_conf": {"sort_size": 4},
    "list_shuffle": False,
    "batch_conf": {"batch_type": "static", "batch_size": 3},
}


def _batches(ds):
    return list(iter(ds))


def _sum_skips(batches):
    total = {}
    for b in batches:
        for k, v in b["skipped"].items():
            total[k] = total.get(k, 0) + v
    return total


def test_batch_format_and_features(tmp_path, char_tokenizer):
    utts = make_corpus(tmp_path / "wav", n=5)
    lst = write_list(tmp_path / "data.list", utts)
    conf = eval_dataset_conf({"fbank_conf": {"num_mel_bins": 40}}, batch_size=2)
    batches = _batches(Dataset("raw", lst, char_tokenizer, conf))
    assert sorted(k for b in batches for k in b["keys"]) == [u[0] for u in utts]
    opts = fbank_options({"num_mel_bins": 40})
    by_key = {u[0]: u for u in utts}
    for b in batches:
        assert set(b) == {"keys", "feats", "feats_lengths", "target", "target_lengths", "skipped"}
        assert b["feats"].dtype == torch.float32 and b["target"].dtype == torch.int64
        assert b["feats"].shape[0] == len(b["keys"]) and b["feats"].shape[2] == 40
        assert b["feats_lengths"].tolist() == sorted(b["feats_lengths"].tolist(), reverse=True)
        for i, key in enumerate(b["keys"]):
            x, rate = sf.read(by_key[key][1], dtype="float32")
            ref = compute_fbank(x, rate, opts)
            n = int(b["feats_lengths"][i])
            assert n == ref.shape[0]
            np.testing.assert_allclose(b["feats"][i, :n].numpy(), ref, atol=1e-5)
            assert torch.all(b["feats"][i, n:] == 0)
            L = int(b["target_lengths"][i])
            assert char_tokenizer.detokenize(b["target"][i, :L].tolist()) == by_key[key][2]
            assert torch.all(b["target"][i, L:] == -1)
        assert not any(b["skipped"].values())


def test_raw_and_shard_give_identical_batches(tmp_path, char_tokenizer):
    utts = make_corpus(tmp_path / "wav", n=11)
    raw = write_list(tmp_path / "data.list", utts)
    shards = write_shards(str(tmp_path), utts, per_shard=4)
    a = _batches(Dataset("raw", raw, char_tokenizer, TRAIN_CONF, seed=5))
    b = _batches(Dataset("shard", shards, char_tokenizer, TRAIN_CONF, seed=5))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        for k in ("feats", "feats_lengths", "target", "target_lengths"):
            assert torch.equal(x[k], y[k]), k
    assert sorted(k for x in a for k in x["keys"]) == [u[0] for u in utts]


def test_dynamic_batches_never_exceed_max_frames(tmp_path, char_tokenizer):
    utts = make_corpus(tmp_path / "wav", n=25, min_s=0.2, max_s=2.5)
    lst = write_list(tmp_path / "data.list", utts)
    conf = dict(TRAIN_CONF, batch_conf={"batch_type": "dynamic", "max_frames_in_batch": 400})
    batches = _batches(Dataset("raw", lst, char_tokenizer, conf))
    seen = []
    for b in batches:
        assert b["feats"].shape[0] * b["feats"].shape[1] <= 400
        assert int(b["feats_lengths"].max()) == b["feats"].shape[1]
        seen += b["keys"]
    too_long = _sum_skips(batches)["too_long_for_batch"]
    assert len(seen) + too_long == 25 and len(set(seen)) == len(seen)
    assert any(b["feats"].shape[0] > 1 for b in batches)


def test_bucket_batches(tmp_path, char_tokenizer):
    utts = make_corpus(tmp_path / "wav", n=20, min_s=0.2, max_s=2.0)
    lst = write_list(tmp_path / "data.list", utts)
    conf = eval_dataset_conf({}, batch_size=1)
    conf["batch_conf"] = {"batch_type": "bucket", "bucket_boundaries": [100], "bucket_batch_sizes": [4, 2]}
    batches = _batches(Dataset("raw", lst, char_tokenizer, conf))
    for b in batches:
        lens = b["feats_lengths"]
        assert bool(torch.all(lens < 100)) or bool(torch.all(lens >= 100))
        assert len(b["keys"]) <= (4 if lens[0] < 100 else 2)
    assert sum(len(b["keys"]) for b in batches) == 20


@pytest.mark.parametrize("data_type", ["raw", "shard"])
def test_partition_two_ranks_two_workers_covers_each_utterance_once(tmp_path, char_tokenizer, data_type):
    utts = make_corpus(tmp_path / "wav", n=13, max_s=0.5)
    lst = (write_list(tmp_path / "data.list", utts) if data_type == "raw"
           else write_shards(str(tmp_path), utts, per_shard=1))
    conf = dict(TRAIN_CONF, speed_perturb=False, list_shuffle=True)
    per_reader = []
    for rank in range(2):
        ds = Dataset(data_type, lst, char_tokenizer, conf, seed=3, rank=rank, world_size=2)
        ds.set_epoch(2)
        keys = [k for b in build_dataloader(ds, num_workers=2, prefetch=2) for k in b["keys"]]
        per_reader.append(keys)
        assert keys
    allk = per_reader[0] + per_reader[1]
    assert sorted(allk) == [u[0] for u in utts]


def test_set_epoch_reproduces_and_changes_order(tmp_path, char_tokenizer):
    utts = make_corpus(tmp_path / "wav", n=9, max_s=0.6)
    lst = write_list(tmp_path / "data.list", utts)
    conf = dict(TRAIN_CONF, list_shuffle=True, sort=False)
    ds = Dataset("raw", lst, char_tokenizer, conf, seed=1)
    ds.set_epoch(4)
    a = _batches(ds)
    ds.set_epoch(5)
    b = _batches(ds)
    ds.set_epoch(4)
    c = _batches(ds)
    assert [x["keys"] for x in a] == [x["keys"] for x in c]
    assert all(torch.equal(x["feats"], y["feats"]) for x, y in zip(a, c))
    assert [x["keys"] for x in a] != [x["keys"] for x in b]
    other_seed = Dataset("raw", lst, char_tokenizer, conf, seed=2)
    other_seed.set_epoch(4)
    assert [x["keys"] for x in _batches(other_seed)] != [x["keys"] for x in a]


def _bad_corpus(tmp_path):
    utts = make_corpus(tmp_path / "wav", n=6, max_s=0.6)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00garbage" * 20)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), 16000, subtype="PCM_16")
    rated = tmp_path / "rate11k.wav"
    sf.write(str(rated), np.zeros(11025, np.float32), 11025, subtype="PCM_16")
    extra = [
        json.dumps({"key": "c", "wav": str(corrupt), "txt": "你好"}),
        '{"key": "j", "wav": ',
        json.dumps({"key": "m", "wav": str(tmp_path / "missing.wav"), "txt": "你好"}),
        json.dumps({"key": "e", "wav": str(empty), "txt": "你好"}),
        json.dumps({"key": "r", "wav": str(rated), "txt": "你好"}),
        json.dumps({"key": "n", "txt": "你好"}),
    ]
    return utts, write_list(tmp_path / "data.list", utts[:3], extra + []), extra


def test_bad_items_are_skipped_and_counted(tmp_path, char_tokenizer, caplog):
    utts, _, extra = _bad_corpus(tmp_path)
    lst = write_list(tmp_path / "data.list", utts[:3], extra)
    with open(lst, "a") as f:  # good utterances after the bad lines too
        for key, wav, txt in utts[3:]:
            f.write(json.dumps({"key": key, "wav": wav, "txt": txt}) + "\n")
    conf = dict(TRAIN_CONF, resample_conf={"resample_rate": 16000, "allowed_rates": [8000, 16000, 22050]})
    with caplog.at_level(logging.WARNING):
        batches = _batches(Dataset("raw", lst, char_tokenizer, conf))
    assert sorted(k for b in batches for k in b["keys"]) == [u[0] for u in utts]
    counts = _sum_skips(batches)
    assert counts == {"bad_json": 2, "missing_wav": 1, "corrupt_wav": 1, "empty_wav": 1, "bad_rate": 1,
                      "bad_segment": 0, "bad_text": 0, "bad_shard": 0, "filtered": 0, "too_long_for_batch": 0}
    msgs = [r.getMessage() for r in caplog.records]
    assert any("data.list:5" in m and "bad JSON" in m for m in msgs)  # the truncated line
    assert any("data.list:9" in m and "field 'wav'" in m for m in msgs)
    assert any("missing.wav" in m and "no such file" in m for m in msgs)
    assert any("11025 Hz" in m for m in msgs)
    assert len([m for m in msgs if "corrupt.wav" in m]) == 1  # once per item


def test_skips_are_counted_across_workers_and_with_nothing_usable(tmp_path, char_tokenizer):
    utts, _, extra = _bad_corpus(tmp_path)
    lst = write_list(tmp_path / "data.list", utts, extra)
    conf = dict(TRAIN_CONF, resample_conf={"resample_rate": 16000, "allowed_rates": [16000]})
    ds = Dataset("raw", lst, char_tokenizer, conf)
    batches = list(build_dataloader(ds, num_workers=2, prefetch=2))
    counts = _sum_skips(batches)
    assert (counts["bad_json"], counts["missing_wav"], counts["corrupt_wav"], counts["empty_wav"],
            counts["bad_rate"]) == (2, 1, 1, 1, 1)
    assert sorted(k for b in batches for k in b["keys"]) == [u[0] for u in utts]
    only_bad = write_list(tmp_path / "bad.list", [], extra[:3])
    batches = _batches(Dataset("raw", only_bad, char_tokenizer, conf))
    assert len(batches) == 1 and batches[0]["keys"] == [] and batches[0]["feats"].shape == (0, 0, 40)
    assert _sum_skips(batches)["bad_json"] == 1 and _sum_skips(batches)["missing_wav"] == 1


def test_eval_conf_keeps_every_test_utterance(tmp_path, char_tokenizer):
    utts = make_corpus(tmp_path / "wav", n=3, min_s=0.05, max_s=0.08)  # under min_length 10 frames
    lines = [json.dumps({"key": "notext", "wav": utts[0][1], "txt": ""})]
    lst = write_list(tmp_path / "data.list", utts, lines)
    train = {"filter_conf": {"min_length": 10}}
    assert _sum_skips(_batches(Dataset("raw", lst, char_tokenizer, train)))["filtered"] == 4
    batches = _batches(Dataset("raw", lst, char_tokenizer, eval_dataset_conf(train, batch_size=8)))
    assert sorted(batches[0]["keys"]) == sorted([u[0] for u in utts] + ["notext"])
    assert not any(_sum_skips(batches).values())


def test_resampling_in_the_pipeline_and_segments(tmp_path, char_tokenizer):
    x = (0.3 * np.sin(2 * np.pi * 500 * np.arange(8000) / 8000)).astype(np.float32)
    sf.write(str(tmp_path / "a8k.wav"), x, 8000, subtype="PCM_16")
    lines = [json.dumps({"key": "a", "wav": str(tmp_path / "a8k.wav"), "txt": "你"}),
             json.dumps({"key": "b", "wav": str(tmp_path / "a8k.wav"), "txt": "好", "start": 0.25, "end": 0.75})]
    lst = write_list(tmp_path / "data.list", [], lines)
    batches = _batches(Dataset("raw", lst, char_tokenizer, eval_dataset_conf({}, batch_size=2)))
    b = batches[0]
    assert b["keys"] == ["a", "b"]
    assert b["feats_lengths"].tolist() == [100, 50]  # 1 s and 0.5 s at 10 ms


def test_filters_count_as_filtered(tmp_path, char_tokenizer):
    utts = make_corpus(tmp_path / "wav", n=8, min_s=0.2, max_s=1.5)
    lst = write_list(tmp_path / "data.list", utts)
    conf = eval_dataset_conf({}, batch_size=4)
    conf["filter_conf"] = {"max_length": 80, "token_max_length": 3}
    batches = _batches(Dataset("raw", lst, char_tokenizer, conf))
    kept = [k for b in batches for k in b["keys"]]
    expect = [u[0] for u in utts if sf.info(u[1]).frames / 160 <= 80 and len(u[2]) <= 3]
    assert sorted(kept) == sorted(expect)
    assert _sum_skips(batches)["filtered"] == 8 - len(expect)


def test_bad_shards_are_skipped(tmp_path, char_tokenizer):
    utts = make_corpus(tmp_path / "wav", n=4, max_s=0.5)
    lst = write_shards(str(tmp_path), utts, per_shard=2)
    paths = open(lst).read().split()
    with open(paths[1], "r+b") as f:  # cut the second shard in the middle of a member
        f.truncate(1500)
    with open(lst, "a") as f:
        f.write(str(tmp_path / "nope.tar") + "\n")
    batches = _batches(Dataset("shard", lst, char_tokenizer, eval_dataset_conf({}, batch_size=8)))
    keys = [k for b in batches for k in b["keys"]]
    assert keys[:2] == ["utt000", "utt001"] or sorted(keys[:2]) == ["utt000", "utt001"]
    assert "utt003" not in keys
    assert _sum_skips(batches)["bad_shard"] >= 2


def test_conf_errors_name_the_key(tmp_path, char_tokenizer):
    with pytest.raises(ConfigError, match="dataset_conf.spec_agu"):
        resolve_dataset_conf({"spec_agu": True})
    with pytest.raises(ConfigError, match="dataset_conf.fbank_conf.num_bins"):
        resolve_dataset_conf({"fbank_conf": {"num_bins": 80}})
    with pytest.raises(ConfigError, match="dataset_conf.batch_conf.batch_type: 'dyn'"):
        resolve_dataset_conf({"batch_conf": {"batch_type": "dyn"}})
    with pytest.raises(ConfigError, match="bucket_batch_sizes"):
        resolve_dataset_conf({"batch_conf": {"batch_type": "bucket", "bucket_boundaries": [1], "bucket_batch_sizes": [1]}})
    with pytest.raises(ConfigError, match="dataset_conf.fbank_conf: .*window_type"):
        resolve_dataset_conf({"fbank_conf": {"window_type": "kaiser"}})
    with pytest.raises(ConfigError, match="data_type: 'tar'"):
        Dataset("tar", "x", char_tokenizer, {})
    with pytest.raises(ValueError, match="nolist.txt: cannot read data list"):
        Dataset("raw", str(tmp_path / "nolist.txt"), char_tokenizer, {})


def test_eval_conf_turns_off_randomness():
    train = dict(TRAIN_CONF, add_noise=True, reverb=True)
    ev = eval_dataset_conf(train)
    r = resolve_dataset_conf(ev)
    for sw in ("speed_perturb", "spec_aug", "spec_sub", "spec_trim", "shuffle", "sort", "list_shuffle",
               "add_noise", "reverb"):
        assert r[sw] is False
    assert r["fbank_conf"]["dither"] == 0.0 and r["fbank_conf"]["num_mel_bins"] == 40
    assert r["batch_conf"]["batch_type"] == "static" and r["batch_conf"]["batch_size"] == 3
    assert r["filter_conf"]["max_length"] >= 102400 and r["filter_conf"]["token_min_length"] == 0
    assert train["fbank_conf"]["dither"] == 1.0  # input untouched
    assert eval_dataset_conf(train, batch_size=7)["batch_conf"]["batch_size"] == 7


def test_noise_and_reverb_in_the_pipeline(tmp_path, char_tokenizer):
    utts = make_corpus(tmp_path / "wav", n=3, max_s=0.5)
    lst = write_list(tmp_path / "data.list", utts)
    clean = _batches(Dataset("raw", lst, char_tokenizer, eval_dataset_conf({}, batch_size=3)))[0]
    conf = eval_dataset_conf({}, batch_size=3)
    conf.update(add_noise=True, noise_conf={"prob": 1.0, "snr_db": [0, 0]}, reverb=True,
                rir_conf={"prob": 1.0, "num_rirs": 2, "rt60": [0.2, 0.3], "room_dim": [[3, 4], [3, 4], [2.5, 3]]})
    noisy = _batches(Dataset("raw", lst, char_tokenizer, conf))[0]
    assert noisy["keys"] == clean["keys"]
    assert torch.equal(noisy["feats_lengths"], clean["feats_lengths"])  # timing kept
    assert not torch.allclose(noisy["feats"], clean["feats"], atol=0.5)


def test_bad_shard_members_are_skipped_and_named(tmp_path, char_tokenizer, caplog):
    import io
    import tarfile
    utts = make_corpus(tmp_path / "wav", n=2, max_s=0.5)
    tar_path = tmp_path / "mixed.tar"
    members = [("a.txt", "你好".encode()), ("a.wav", open(utts[0][1], "rb").read()),
               ("bad.txt", "你".encode()), ("bad.wav", b"RIFF....garbage" * 10),
               ("notext.wav", open(utts[1][1], "rb").read()),
               ("empty.txt", "好".encode()), ("empty.wav", b""),
               ("b.txt", "世界".encode()), ("b.flac", _flac_bytes(utts[1][1]))]
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    lst = tmp_path / "shards.list"
    lst.write_text(str(tar_path) + "\n")
    with caplog.at_level(logging.WARNING):
        batches = _batches(Dataset("shard", str(lst), char_tokenizer, eval_dataset_conf({}, batch_size=8)))
    assert sorted(k for b in batches for k in b["keys"]) == ["a", "b"]
    counts = _sum_skips(batches)
    assert (counts["corrupt_wav"], counts["bad_shard"], counts["empty_wav"]) == (1, 1, 1)
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "mixed.tar:bad.wav" in msgs and "mixed.tar:notext" in msgs and "no text (.txt)" in msgs


def _flac_bytes(wav_path):
    import io
    x, rate = sf.read(wav_path, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()
