"""examples/aishell2/s0/run.sh stages 0-7 on miniature synthesized corpora.

A tiny U2++ MoE (conf/train_demo_tiny.yaml) learns four short utterances
(repeated 128 times as the training set) and is tested on the same four: every
stage's outputs are checked, the CER of every decoding mode is bounded, the
torch-free runtime's fp32 hypotheses must equal `wenet-moe recognize`'s at the
same chunk size and mode, then the whole recipe is rerun and no file may change
(content and mtime).
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


REPEATS = 512     # copies of each easy utterance in the training set: 2 x 256 steps of 8


@pytest.fixture(scope="module")
def easy_corpus(tmp_path_factory):
    """Four short sentences over 12 characters, one voice (`dev`), and a training
    list of the same four utterances repeated REPEATS times (`train`)."""
    base = tmp_path_factory.mktemp("easy")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "synth_corpus.py"), str(base / "synth"),
                        "--hours", "0.001", "--dev_utts", "4", "--test_utts", "1", "--train_voices", "1",
                        "--dev_voices", "1", "--test_voices", "1", "--vocab_size", "12", "--min_chars", "3",
                        "--max_chars", "6", "--nj", "2"], capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr
    dev = base / "synth" / "iOS" / "dev"
    wavs = [line.split("\t") for line in (dev / "wav.scp").read_text(encoding="utf-8").splitlines()]
    texts = [line.split("\t") for line in (dev / "trans.txt").read_text(encoding="utf-8").splitlines()]
    assert len(wavs) == len(texts) == 4
    train = base / "train"
    train.mkdir()
    with open(train / "wav.scp", "w", encoding="utf-8") as w, open(train / "trans.txt", "w", encoding="utf-8") as t:
        for r_ in range(REPEATS):
            for (key, wav), (_, text) in zip(wavs, texts):
                w.write(f"{key}R{r_:03d}\t{dev / wav}\n")
                t.write(f"{key}R{r_:03d}\t{text}\n")
    return {"trn": train, "dev": dev, "tst": dev}


def run_recipe(ws, corpus, *extra, sets=None):
    trn, dev, tst = (sets["trn"], sets["dev"], sets["tst"]) if sets else \
        (corpus / "data", corpus / "dev", corpus / "test")
    args = ["bash", "run.sh", "--trn_set", str(trn), "--dev_set", str(dev),
            "--tst_set", str(tst), "--train_config", "conf/train_demo_tiny.yaml",
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


def read_hyps(path):
    return dict((line.split(" ", 1) + [""])[:2] for line in path.read_text(encoding="utf-8").splitlines())


# CER bounds (%) on the four training utterances (14 characters). Measured on this
# machine (AMD EPYC, 2 cores): 0.0 for ctc_greedy, ctc_prefix_beam and attention_rescoring
# (full and chunk 16, and the runtime's fp32 and int8), 7.1 for attention (its beam
# search without CTC drops a character); the CTC loss on them ends at 0.004, and the
# rescored best leads its runner-up by 8.6-13.4. An untrained model scores 90-270.
# Each bound leaves 2 characters' slack above the measurement.
CER_BOUND = {"attention_rescoring": 15.0, "ctc_greedy_search": 15.0, "ctc_prefix_beam_search": 15.0,
             "attention": 22.0}


def rescoring_gaps(ws, exp):
    """Per test utterance: score of the best attention-rescoring hypothesis minus the
    runner-up's (inf when the CTC n-best has one entry), with run.sh's settings (avg_1.pt,
    chunk 16, beam 3, ctc_weight 0.5, reverse_weight 0.5)."""
    import torch
    from wenet_moe.bin.transcribe import features, load_model_dir
    model, _, configs, _ = load_model_dir(str(exp), str(exp / "avg_1.pt"))
    model.eval()
    gaps = []
    for line in (ws / "data" / "test" / "wav.scp").read_text(encoding="utf-8").splitlines():
        x = features(line.split(maxsplit=1)[1], configs)[None]
        res = model.decode_results(["attention_rescoring"], x, torch.tensor([x.size(1)]), beam_size=3,
                                   decoding_chunk_size=16, ctc_weight=0.5, reverse_weight=0.5)
        scores = res["attention_rescoring"][0].nbest_scores
        gaps.append(scores[0] - scores[1] if len(scores) > 1 else float("inf"))
    return gaps


@pytest.mark.slow
def test_stages_0_to_7_then_rerun_changes_nothing(easy_corpus, tmp_path):
    ws = workspace(tmp_path / "ws")
    r = run_recipe(ws, None, "--stage", "0", "--stop_stage", "7", "--average_num", "1", sets=easy_corpus)
    # stage 0-3: data, CMVN, dictionary, lists
    for x in ("train", "dev", "test"):
        for f in ("wav.scp", "text", "data.list"):
            assert (ws / "data" / x / f).stat().st_size > 0, (x, f)
    n_train = len((ws / "data" / "train" / "text").read_text(encoding="utf-8").splitlines())
    assert n_train == 4 * REPEATS
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
    assert (exp / "avg_1.pt").is_file()
    refs = read_hyps(ws / "data" / "dev" / "text")
    for tag in ("full", "chunk16"):
        for mode in MODES:
            hyps = read_hyps(exp / f"decode_dev_{tag}" / mode / "text")
            assert sorted(hyps) == sorted(refs) and len(refs) == 4
            cer = overall_cer(exp / f"decode_dev_{tag}" / mode / "wer")
            assert cer <= CER_BOUND[mode], (tag, mode, cer, hyps, refs)
    assert "| attention_rescoring |" in r.stdout and "chunk 16" in r.stdout
    # stage 6: exports
    assert (exp / "export" / "torchscript" / "final.zip").is_file()
    onnx_files = os.listdir(exp / "export" / "onnx")
    for name in ("encoder.onnx", "ctc.onnx", "decoder.onnx", "units.txt"):
        assert name in onnx_files, onnx_files
    assert any("int8" in n for n in onnx_files), onnx_files
    # stage 7: the torch-free runtime on the test set (the same four utterances), chunk 16,
    # attention_rescoring (run.sh's runtime_mode): fp32 says exactly what recognize says
    runtime = read_hyps(exp / "runtime_test_chunk16_fp32" / "text")
    recognized = read_hyps(exp / "decode_dev_chunk16" / "attention_rescoring" / "text")
    assert runtime == recognized
    # ... decided by a wide margin: the rescored best leads the runner-up by >= 1 (log
    # score), where the two implementations differ by ~1e-6 in their log-probs
    assert min(rescoring_gaps(ws, exp)) >= 1.0
    assert overall_cer(exp / "runtime_test_chunk16_fp32" / "wer") <= CER_BOUND["attention_rescoring"]
    int8 = read_hyps(exp / "runtime_test_chunk16_int8" / "text")
    assert sorted(int8) == sorted(refs)
    assert overall_cer(exp / "runtime_test_chunk16_int8" / "wer") <= CER_BOUND["attention_rescoring"]

    before = snapshot(ws)
    r2 = run_recipe(ws, None, "--stage", "0", "--stop_stage", "7", "--average_num", "1", sets=easy_corpus)
    assert "skipping" in r2.stderr
    assert snapshot(ws) == before

    # stage 5 again with w8a8 experts (int8 weights and rows): its own result directory,
    # beside the fp32 ones, in the CER table
    r = run_recipe(ws, None, "--stage", "5", "--stop_stage", "5", "--average_num", "1",
                   "--decode_expert_precision", "w8a8", "--decode_sets", "dev", "--decode_chunks", "16",
                   "--decode_modes", "ctc_greedy_search", sets=easy_corpus)
    rdir = exp / "decode_dev@w8a8_chunk16" / "ctc_greedy_search"
    assert sorted(read_hyps(rdir / "text")) == sorted(refs)
    assert overall_cer(rdir / "wer") <= CER_BOUND["ctc_greedy_search"]
    assert "CER (%) on dev@w8a8" in r.stdout

    # stages 8-9: character LM + TLG graph from the training text, decoding with the
    # graph, with hotwords (phrases of the training transcripts) and with both; a rerun
    # changes nothing
    # (the LM packages are in requirements.txt)
    train_text = (ws / "data" / "train" / "text").read_text(encoding="utf-8").splitlines()
    hot = ws / "hotwords.txt"
    hot.write_text("".join(line.split(" ", 1)[1][:3] + "\n" for line in train_text[:2]), encoding="utf-8")
    extra = ("--stage", "8", "--stop_stage", "9", "--average_num", "1", "--context_path", str(hot))
    run_recipe(ws, None, *extra, sets=easy_corpus)
    lang = ws / "data" / "lang_char_3gram"
    assert (lang / "TLG.fst").stat().st_size > 0 and "\\3-grams:" in (lang / "lm.arpa").read_text(
        encoding="utf-8")
    for tag in ("full", "chunk16"):
        for kind, modes in (("lm", ("ctc_wfst", "ctc_wfst_rescoring")),
                            ("hotwords", ("ctc_prefix_beam_search", "attention_rescoring")),
                            ("lm_hotwords", ("ctc_wfst", "ctc_wfst_rescoring"))):
            for mode in modes:
                rdir = exp / f"decode_dev_{tag}_{kind}" / mode
                assert sorted(read_hyps(rdir / "text")) == sorted(refs)
                assert overall_cer(rdir / "wer") <= CER_BOUND["ctc_prefix_beam_search"], (tag, kind, mode)
    before = snapshot(ws)
    r3 = run_recipe(ws, None, *extra, sets=easy_corpus)
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
    tiny = yaml.safe_load(open(os.path.join(RECIPE, "conf", "train_demo_tiny.yaml"), encoding="utf-8"))
    assert p2["encoder_conf"]["use_dynamic_chunk"] is True and p2["max_epoch"] == tiny["max_epoch"] - 1
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
