"""`wenet-moe recognize` and `wenet-moe transcribe` on a tiny model: same hypotheses
through the data pipeline and through the single-file path; checkpoint choice;
a moved model directory still works; errors are one line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "examples", "aishell2", "s0", "conf", "train_demo_tiny.yaml")
CLI = [sys.executable, "-c", "import sys; from wenet_moe.cli import main; sys.exit(main())"]


def cli(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from wenet_moe.model import build_model
    d = tmp_path_factory.mktemp("model")
    units = ["<blank>", "<unk>", "<sos/eos>"] + list("你好世界今天气很")
    (d / "units.txt").write_text("".join(f"{u} {i}\n" for i, u in enumerate(units)), encoding="utf-8")
    rng = np.random.default_rng(0)
    (d / "global_cmvn").write_text(json.dumps({"mean_stat": (rng.standard_normal(40) * 100 + 1000).tolist(),
                                               "var_stat": (np.full(40, 1e5) + rng.random(40) * 1e4).tolist(),
                                               "frame_num": 100}))
    conf = yaml.safe_load(open(TINY, encoding="utf-8"))
    conf["tokenizer_conf"]["symbol_table_path"] = str(d / "units.txt")
    conf["cmvn_conf"]["cmvn_file"] = str(d / "global_cmvn")
    conf["input_dim"], conf["output_dim"] = 40, len(units)
    (d / "train.yaml").write_text(yaml.safe_dump(conf, allow_unicode=True), encoding="utf-8")
    torch.manual_seed(0)
    model = build_model(conf)
    with torch.no_grad():  # a bias towards non-blank output, so hypotheses are not empty
        model.ctc.ctc_lo.weight.mul_(10.0)
        model.ctc.ctc_lo.bias[:3] = -50.0  # never blank, <unk> or <sos/eos>
    torch.save(model.state_dict(), d / "0.pt")
    torch.save(model.state_dict(), d / "avg_1.pt")
    wavs = []
    for i, n in enumerate([16000, 24000, 12000]):
        p = d / f"utt{i}.wav"
        sf.write(str(p), (rng.standard_normal(n) * 2000).astype(np.int16), 16000, subtype="PCM_16")
        wavs.append(p)
    (d / "data.list").write_text("".join(json.dumps({"key": f"utt{i}", "wav": str(w), "txt": "你好"}) + "\n"
                                         for i, w in enumerate(wavs)), encoding="utf-8")
    return d, wavs


def read_text(path):
    return dict((ln.split(" ", 1) + [""])[:2] for ln in path.read_text(encoding="utf-8").splitlines())


def test_recognize_matches_transcribe(model_dir, tmp_path):
    """Batched (recognize) and single-file (transcribe) paths agree; the fixture decides
    both modes by a wide margin (measured: greedy CTC stable up to 2.0 nats, the rescored
    best 4.2 ahead of its runner-up), far above batching's ~1e-6 numerical noise."""
    from fixture_margins import greedy_ctc_margin
    from wenet_moe.bin.transcribe import features, load_model_dir
    d, wavs = model_dir
    model, _, configs, _ = load_model_dir(str(d), str(d / "avg_1.pt"))
    model.eval()
    for w in wavs:
        x = features(str(w), configs)[None]
        with torch.no_grad():
            enc, _ = model.encode(x, torch.tensor([x.size(1)]))
            assert greedy_ctc_margin(model.ctc_activation(enc)[0].numpy(), hi=0.5) >= 0.5, w
        scores = model.decode_results(["attention_rescoring"], x, torch.tensor([x.size(1)]),
                                      beam_size=3)["attention_rescoring"][0].nbest_scores
        assert len(scores) == 1 or scores[0] - scores[1] >= 0.5, (w, scores)
    modes = ["ctc_greedy_search", "attention_rescoring"]
    r = cli("recognize", "--config", d / "train.yaml", "--checkpoint", d / "avg_1.pt", "--test_data",
            d / "data.list", "--result_dir", tmp_path / "res", "--modes", *modes, "--beam_size", 3,
            "--batch_size", 2)
    assert r.returncode == 0, r.stderr
    for mode in modes:
        hyps = read_text(tmp_path / "res" / mode / "text")
        assert sorted(hyps) == ["utt0", "utt1", "utt2"]
        t = cli("transcribe", "--model_dir", d, "--mode", mode, "--beam_size", 3, *wavs)
        assert t.returncode == 0, t.stderr
        lines = t.stdout.splitlines()
        assert [ln.split("\t")[0] for ln in lines] == ["utt0", "utt1", "utt2"]
        assert {ln.split("\t")[0]: ln.split("\t")[1].strip() for ln in lines} == \
            {k: v.strip() for k, v in hyps.items()}
        assert "avg_1.pt" in t.stderr
    assert any(v.strip() for v in read_text(tmp_path / "res" / "ctc_greedy_search" / "text").values())


def test_moved_model_dir_and_errors(model_dir, tmp_path):
    d, wavs = model_dir
    moved = tmp_path / "moved"
    shutil.copytree(d, moved)
    # train.yaml still points at the old files: remove them from view by editing the paths
    conf = yaml.safe_load((moved / "train.yaml").read_text(encoding="utf-8"))
    conf["tokenizer_conf"]["symbol_table_path"] = "data/dict/units.txt"
    conf["cmvn_conf"]["cmvn_file"] = "/nonexistent/global_cmvn"
    (moved / "train.yaml").write_text(yaml.safe_dump(conf, allow_unicode=True), encoding="utf-8")
    os.unlink(moved / "global_cmvn")
    a = cli("transcribe", "--model_dir", d, "--mode", "ctc_greedy_search", wavs[0])
    b = cli("transcribe", "--model_dir", moved, "--mode", "ctc_greedy_search", wavs[0], cwd=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert a.stdout == b.stdout  # CMVN comes from the checkpoint, units from the directory
    r = cli("transcribe", "--model_dir", tmp_path, wavs[0])
    assert r.returncode == 1 and "no train.yaml" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("recognize", "--config", d / "train.yaml", "--checkpoint", d / "nope.pt", "--test_data",
            d / "data.list", "--result_dir", tmp_path / "r2")
    assert r.returncode == 1 and "nope.pt" in r.stderr and not (tmp_path / "r2").exists()


def test_pick_checkpoint(tmp_path):
    from wenet_moe.bin.transcribe import pick_checkpoint
    for name in ("3.pt", "12.pt", "final.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert pick_checkpoint(str(tmp_path)).endswith("final.pt")
    os.unlink(tmp_path / "final.pt")
    assert pick_checkpoint(str(tmp_path)).endswith("12.pt")
    (tmp_path / "avg_5.pt").write_bytes(b"x")
    assert pick_checkpoint(str(tmp_path)).endswith("avg_5.pt")
    with pytest.raises(FileNotFoundError, match="no avg"):
        pick_checkpoint(str(tmp_path / "empty_does_not_exist"))


def test_expert_precision_override(model_dir, tmp_path):
    """--expert_precision / load_model_dir(expert_precision=...) set every MoE layer's
    moe_conf.expert_precision for the decode (w8a8 and bf16a move the encoder output, by
    less than 5 % / 2 % of its range); a dense model or an unknown value is a one-line
    error."""
    from wenet_moe.bin.transcribe import features, load_model_dir
    from wenet_moe.config import ConfigError
    from wenet_moe.layers.moe import MoEFFN
    from wenet_moe.model.loading import with_expert_precision
    d, wavs = model_dir
    outs = {}
    for precision in (None, "w8a8", "bf16a"):
        model, _, configs, _ = load_model_dir(str(d), str(d / "avg_1.pt"), expert_precision=precision)
        moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
        assert moes and all(m.expert_precision == (precision or "fp32") for m in moes)
        x = features(str(wavs[0]), configs)[None]
        with torch.inference_mode():
            outs[precision] = model.encode(x, torch.tensor([x.size(1)]))[0]
    span = outs[None].abs().max().item()
    moved = {p: (outs[p] - outs[None]).abs().max().item() for p in ("w8a8", "bf16a")}
    assert 1e-5 < moved["w8a8"] < 0.05 * span
    assert 1e-6 < moved["bf16a"] < 0.02 * span, (moved, span)
    for precision in ("w8a8", "bf16a"):
        r = cli("transcribe", "--model_dir", d, "--mode", "ctc_greedy_search", "--expert_precision", precision,
                wavs[0])
        assert r.returncode == 0 and r.stdout.startswith("utt0\t"), r.stderr
    dense = yaml.safe_load((d / "train.yaml").read_text(encoding="utf-8"))
    for part in ("encoder_conf", "decoder_conf"):
        dense[part]["mlp_type"] = "dense"
    with pytest.raises(ConfigError, match="--expert_precision int8: the model has no MoE layers"):
        with_expert_precision(dense, "int8")
    with pytest.raises(ConfigError, match="--expert_precision: expected one of fp32, bf16, bf16a, int8, w8a8"):
        with_expert_precision(dense, "fp8")
    assert with_expert_precision(dense, None) is dense
