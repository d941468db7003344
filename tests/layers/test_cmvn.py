"""Global CMVN: JSON sums and Kaldi text against hand computations, errors."""
import json
import math

import numpy as np
import pytest
import torch

from wenet_moe.config import ConfigError
from wenet_moe.layers.cmvn import GlobalCMVN, load_cmvn

FRAMES = [[1.0, 2.0, 0.5], [3.0, 2.0, -0.5], [2.0, 2.0, 0.0], [6.0, 2.0, 2.0]]


def hand_stats():
    n = len(FRAMES)
    dims = len(FRAMES[0])
    mean = [sum(f[d] for f in FRAMES) / n for d in range(dims)]
    var = [sum((f[d] - mean[d]) ** 2 for f in FRAMES) / n for d in range(dims)]
    istd = [1.0 / math.sqrt(max(v, 1e-20)) for v in var]
    return mean, istd


def sums():
    return ([sum(f[d] for f in FRAMES) for d in range(3)],
            [sum(f[d] ** 2 for f in FRAMES) for d in range(3)])


def test_json_sums(tmp_path):
    s, sq = sums()
    p = tmp_path / "global_cmvn"
    p.write_text(json.dumps({"mean_stat": s, "var_stat": sq, "frame_num": len(FRAMES)}))
    mean, istd = load_cmvn(str(p), True)
    ref_mean, ref_istd = hand_stats()
    assert np.allclose(mean, ref_mean) and np.allclose(istd, ref_istd)
    # dim 1 is constant: variance floored at 1e-20 -> istd 1e10
    assert istd[1] == pytest.approx(1e10)


def test_kaldi_text(tmp_path):
    s, sq = sums()
    p = tmp_path / "cmvn.ark"
    p.write_text(" [\n  " + " ".join(map(str, s)) + f" {len(FRAMES)}\n  "
                 + " ".join(map(str, sq)) + " 0 ]\n")
    mean, istd = load_cmvn(str(p), False)
    ref_mean, ref_istd = hand_stats()
    assert np.allclose(mean, ref_mean) and np.allclose(istd, ref_istd)


@pytest.mark.parametrize("content,is_json,match", [
    ('{"mean_stat": [1, 2], "var_stat": [1, 2]', True, "invalid CMVN JSON at line 1"),
    ('{"mean_stat": [1, 2], "var_stat": [1, 2]}', True, "lacks 'frame_num'"),
    ('{"mean_stat": [1, 2], "var_stat": [1], "frame_num": 3}', True, "differ in length"),
    ('{"mean_stat": [1, "x"], "var_stat": [1, 2], "frame_num": 3}', True, "non-numeric"),
    ('{"mean_stat": [1, 2], "var_stat": [1, 2], "frame_num": 0}', True, "must be positive"),
    ("[ 1 2 3\n 4 5 ]", False, "same length"),
    ("1 2 3\n4 5 0", False, "not a Kaldi text CMVN matrix"),
    ("[ 1 2 3 ]", False, "must have 2 rows"),
])
def test_malformed_files_name_the_file(tmp_path, content, is_json, match):
    p = tmp_path / "bad_cmvn"
    p.write_text(content)
    with pytest.raises(ConfigError, match=match) as e:
        load_cmvn(str(p), is_json)
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read CMVN file"):
        load_cmvn(str(tmp_path / "nope"), True)


def test_module_normalises():
    mean, istd = hand_stats()
    cmvn = GlobalCMVN(np.array(mean), np.array(istd))
    x = torch.tensor([FRAMES])
    y = cmvn(x)
    assert torch.allclose(y[..., 0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(y[..., 0].std(unbiased=False), torch.tensor(1.0), atol=1e-5)
    assert set(dict(cmvn.named_buffers())) == {"mean", "istd"}
    s = torch.jit.script(cmvn)
    assert torch.allclose(s(x), y)
    assert torch.allclose(GlobalCMVN(mean, istd, norm_var=False)(x), x - torch.tensor(mean))
