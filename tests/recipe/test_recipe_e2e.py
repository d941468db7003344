"""examples/aishell2/s0/run.sh stages 0-7 on a miniature synthesized corpus.

A tiny U2++ MoE (conf/train_demo_tiny.yaml) trains for a few steps; the test
checks every stage's outputs, then reruns the whole recipe and checks that no
file changed (content and mtime).
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "examples", "aishell2", "s0")
MODES = ["ctc_greedy_search", "ctc_prefix_beam_search", "attention", "attention_rescoring"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}


def workspace(path):
    path.mkdir(parents=True, exist_ok=True)
    for name in ("run.sh", "path.sh", "local", "conf"):
        os.symlink(os.path.join(RECIPE, name), path / name)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "synth"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "synth_corpus.py"), str(out),
                        "--hours", "0.012", "--dev_utts", "4", "--test_utts", "4", "--train_voices", "4",
                        "--dev_voices", "1", "--test_voices", "1", "--vocab_size", "40", "--nj", "2"],
                       capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr
    return out / "iOS"


def run_recipe(ws, corpus, *extra):
    args = ["bash", "run.sh", "--trn_set", str(corpus / "data"), "--dev_set", str(corpus / "dev"),
            "--tst_set", str(corpus / "test"), "--train_config", "conf/train_demo_tiny.yaml",
            "--dir", "exp/tiny", "--nj", "1", "--num_workers", "0", "--average_num", "2", "--val_best", "false",
            "--decode_sets", "dev", "--beam_size", "3", "--batch_size", "4", *extra]
    r = subprocess.run(args, cwd=ws, capture_output=True, text=True, env=env())
    assert r.returncode == 0, f"run.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def snapshot(ws):
    out = {}
    for d, _, files in os.walk(ws):
        if "tensorboard" in d.split(os.sep):
            continue
        for f in files:
            p = os.path.join(d, f)
            if os.path.islink(p):
                continue
            st = os.stat(p)
            out[os.path.relpath(p, ws)] = (st.st_mtime_ns, hashlib.md5(open(p, "rb").read()).hexdigest())
    return out


def overall_cer(path):
    for line in open(path, encoding="utf-8"):
        if line.startswith("Overall -> "):
            return float(line.split()[2])
    raise AssertionError(f"{path}: no Overall line")


@pytest.mark.slow
def test_stages_0_to_7_then_rerun_changes_nothing(corpus, tmp_path):
    ws = workspace(tmp_path / "ws")
    r = run_recipe(ws, corpus, "--stage", "0", "--stop_stage", "7")
    # stage 0-3: data, CMVN, dictionary, lists
    for x in ("train", "dev", "test"):
        for f in ("wav.scp", "text", "data.list"):
            assert (ws / "data" / x / f).stat().st_size > 0, (x, f)
    n_train = len((ws / "data" / "train" / "text").read_text(encoding="utf-8").splitlines())
    assert n_train == len((corpus / "data" / "trans.txt").read_text(encoding="utf-8").splitlines())
    cmvn = json.loads((ws / "data" / "train" / "global_cmvn").read_text())
    assert len(cmvn["mean_stat"]) == 40 and cmvn["frame_num"] > 0
    units = (ws / "data" / "dict" / "units.txt").read_text(encoding="utf-8").splitlines()
    assert units[:3] == ["<blank> 0", "<unk> 1", "<sos/eos> 2"]
    assert [int(u.split()[1]) for u in units] == list(range(len(units)))
    chars = {c for line in (ws / "data" / "train" / "text").read_text(encoding="utf-8").splitlines()
             for c in line.split(" ", 1)[1]}
    assert {u.split()[0] for u in units[3:]} == chars
    # stage 4-5: training, averaging, decoding in 4 modes x 2 contexts, CER
    exp = ws / "exp" / "tiny"
    assert (exp / "train.yaml").is_file() and (exp / "0.pt").is_file() and (exp / "1.pt").is_file()
    assert (exp / "avg_2.pt").is_file()
    for tag in ("full", "chunk16"):
        for mode in MODES:
            hyp = (exp / f"decode_dev_{tag}" / mode / "text").read_text(encoding="utf-8").splitlines()
            assert len(hyp) == 4 and all(line.split()[0].startswith("ID") for line in hyp)
            assert 0.0 <= overall_cer(exp / f"decode_dev_{tag}" / mode / "wer")
    assert "| attention_rescoring |" in r.stdout and "chunk 16" in r.stdout
    # stage 6: exports
    assert (exp / "export" / "torchscript" / "final.zip").is_file()
    onnx_files = os.listdir(exp / "export" / "onnx")
    for name in ("encoder.onnx", "ctc.onnx", "decoder.onnx", "units.txt"):
        assert name in onnx_files, onnx_files
    assert any("int8" in n for n in onnx_files), onnx_files
    # stage 7: the torch-free runtime on the test set, fp32 and int8
    for variant in ("fp32", "int8"):
        rdir = exp / f"runtime_test_chunk16_{variant}"
        assert len((rdir / "text").read_text(encoding="utf-8").splitlines()) == 4
        overall_cer(rdir / "wer")

    before = snapshot(ws)
    r2 = run_recipe(ws, corpus, "--stage", "0", "--stop_stage", "7")
    assert "skipping" in r2.stderr
    assert snapshot(ws) == before

    # stages 8-9: character LM + TLG graph from the training text, decoding with the
    # graph and with hotwords (phrases of the training transcripts); a rerun changes nothing
    # (the LM packages are in requirements.txt)
    train_text = (ws / "data" / "train" / "text").read_text(encoding="utf-8").splitlines()
    hot = ws / "hotwords.txt"
    hot.write_text("".join(line.split(" ", 1)[1][:3] + "\n" for line in train_text[:2]), encoding="utf-8")
    extra = ("--stage", "8", "--stop_stage", "9", "--context_path", str(hot))
    run_recipe(ws, corpus, *extra)
    lang = ws / "data" / "lang_char_3gram"
    assert (lang / "TLG.fst").stat().st_size > 0 and "\\3-grams:" in (lang / "lm.arpa").read_text(
        encoding="utf-8")
    for tag in ("full", "chunk16"):
        for kind, modes in (("lm", ("ctc_wfst", "ctc_wfst_rescoring")),
                            ("hotwords", ("ctc_prefix_beam_search", "attention_rescoring"))):
            for mode in modes:
                rdir = exp / f"decode_dev_{tag}_{kind}" / mode
                assert len((rdir / "text").read_text(encoding="utf-8").splitlines()) == 4
                overall_cer(rdir / "wer")
    before = snapshot(ws)
    r3 = run_recipe(ws, corpus, *extra)
    assert "skipping" in r3.stderr and snapshot(ws) == before


@pytest.mark.slow
def test_shards_and_two_phase_training(corpus, tmp_path):
    ws = workspace(tmp_path / "ws")
    run_recipe(ws, corpus, "--stage", "0", "--stop_stage", "3", "--data_type", "shard",
               "--num_utts_per_shard", "3")
    shards = (ws / "data" / "train" / "data.list").read_text().split()
    n_train = len((ws / "data" / "train" / "text").read_text(encoding="utf-8").splitlines())
    assert len(shards) == -(-n_train // 3) and all(s.endswith(".tar") and os.path.isfile(s) for s in shards)
    # stage 4, two phases on shards: 1 epoch at full context, then 1 with dynamic chunks from its average
    r = run_recipe(ws, corpus, "--stage", "4", "--stop_stage", "4", "--data_type", "shard", "--two_phase", "true",
                   "--phase1_epochs", "1", "--phase1_average_num", "1")
    exp = ws / "exp" / "tiny"
    import yaml
    p1 = yaml.safe_load((exp / "phase1" / "train.yaml").read_text(encoding="utf-8"))
    p2 = yaml.safe_load((exp / "train.yaml").read_text(encoding="utf-8"))
    assert p1["encoder_conf"]["use_dynamic_chunk"] is False and p1["max_epoch"] == 1
    assert p2["encoder_conf"]["use_dynamic_chunk"] is True and p2["max_epoch"] == 1
    assert (exp / "phase1" / "0.pt").is_file() and (exp / "phase1" / "avg_1.pt").is_file()
    assert (exp / "0.pt").is_file()
    assert "loaded weights from exp/tiny/phase1/avg_1.pt" in r.stderr
    r = subprocess.run(["bash", "run.sh", "--stage", "0", "--no_such_option", "1"], cwd=ws, capture_output=True,
                       text=True, env=env())
    assert r.returncode == 1 and "unknown option --no_such_option" in r.stderr


@pytest.mark.slow
def test_upcycle_from(corpus, tmp_path):
    """Dense tiny model (1 epoch) -> `wenet-moe upcycle` (4 experts, top-2) -> stage 4
    with --upcycle_from: the MoE model comes from the upcycled train.yaml, training
    starts from its weights, training settings come from --train_config."""
    import yaml
    ws = workspace(tmp_path / "ws")
    run_recipe(ws, corpus, "--stage", "0", "--stop_stage", "3")
    r = subprocess.run([sys.executable, "local/fill_config.py", "conf/train_demo_tiny.yaml", "dense.yaml",
                        "encoder_conf.mlp_type=position_wise_feed_forward",
                        "decoder_conf.mlp_type=position_wise_feed_forward", "max_epoch=1"],
                       cwd=ws, capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr
    run_recipe(ws, corpus, "--stage", "4", "--stop_stage", "4", "--train_config", "dense.yaml",
               "--dir", "exp/dense")
    r = subprocess.run([sys.executable, "-m", "wenet_moe", "upcycle", "--config", "exp/dense/train.yaml",
                        "--checkpoint", "exp/dense/0.pt", "--output_dir", "exp/up", "--n_expert", "4",
                        "--n_expert_activated", "2", "--router", "topk"],
                       cwd=ws, capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr
    r = run_recipe(ws, corpus, "--stage", "4", "--stop_stage", "4", "--dir", "exp/moe_up",
                   "--upcycle_from", "exp/up")
    assert f"loaded weights from {ws / 'exp' / 'up' / 'final.pt'}" in r.stderr
    conf = yaml.safe_load((ws / "exp" / "moe_up" / "train.yaml").read_text(encoding="utf-8"))
    assert conf["encoder_conf"]["mlp_type"] == "moe" and conf["encoder_conf"]["n_expert"] == 4
    assert conf["decoder_conf"]["n_expert_activated"] == 2
    assert conf["max_epoch"] == 2            # from conf/train_demo_tiny.yaml, not the dense run
    assert conf["tokenizer_conf"]["symbol_table_path"] == str(ws / "exp" / "up" / "units.txt")
    assert (ws / "exp" / "moe_up" / "1.pt").is_file()
