"""`wenet-moe train` on bad input: one-line error, non-zero exit, nothing written."""
import subprocess
import sys

import pytest

from wenet_moe.cli import main as cli_main


def _train(tmp_path, config, capsys, *extra):
    (tmp_path / "train.list").write_text("")
    (tmp_path / "cv.list").write_text("")
    argv = ["train", "--config", str(config), "--train_data", str(tmp_path / "train.list"),
            "--cv_data", str(tmp_path / "cv.list"), "--model_dir", str(tmp_path / "exp"), *extra]
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize("yaml_text,msg", [
    (None, "config file not found"),
    ("max_epoch: 2\nmax_epochs: 3\n", "unknown key 'max_epochs' (did you mean 'max_epoch'?)"),
    ("optim: adam\noptim_conf:\n  lr: 0.001\n  warmup: 3\n", "unknown key 'optim_conf.warmup'"),
    ("scheduler: warmuplr\nscheduler_conf:\n  warmup_step: 3\n", "unknown key 'scheduler_conf.warmup_step'"),
    ("dtype: fp8\n", "'dtype' must be one of fp32, fp16, bf16"),
    ("accum_grad: 0\n", "'accum_grad' must be an integer >= 1"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("a: [\n", "invalid YAML"),
])
def test_bad_config_one_line_error(tmp_path, capsys, yaml_text, msg):
    config = tmp_path / "train.yaml"
    if yaml_text is not None:
        config.write_text(yaml_text)
    rc, err = _train(tmp_path, config, capsys)
    assert rc == 1
    assert len(err) == 1 and msg in err[0] and str(config) in err[0], err
    assert not (tmp_path / "exp").exists()


def test_missing_data_list(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("max_epoch: 1\n")
    rc = cli_main(["train", "--config", str(config), "--train_data", str(tmp_path / "none.list"),
                   "--cv_data", str(tmp_path / "none.list"), "--model_dir", str(tmp_path / "exp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--train_data" in err[0] and "none.list: file not found" in err[0]


def test_train_help_lists_wenet_arguments():
    out = subprocess.run([sys.executable, "-m", "wenet_moe", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for arg in ("--config", "--data_type", "--train_data", "--cv_data", "--model_dir", "--checkpoint",
                "--tensorboard_dir", "--num_workers", "--prefetch", "--pin_memory", "--seed", "--device",
                "--dist_backend"):
        assert arg in out.stdout
