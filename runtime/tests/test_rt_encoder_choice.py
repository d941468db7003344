"""kernel_experts="auto": the runtime times an MoE export's kernel graph against its
`.onnx` graph once on this CPU, keeps the faster, and caches the decision keyed by the
graphs' files (`encoder_choice`). Which graph wins depends on the CPU, so the tests
check the mechanism with given timings and that a real measurement is made, cached
and reused, never which graph it picks."""
from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import pytest

from test_rt_expert_kernel import _export, _stream, _windows, ATOL
from wenet_moe_runtime import encoder_choice, native
from wenet_moe_runtime.expert_encoder import ExpertSplitEncoder
from wenet_moe_runtime.model import OnnxAsrModel

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.skipif(native.library() is None,
                                 reason=f"no MoE CPU kernel: {native.disabled_reason()}")]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("choice"), "topk", verify=False)


@pytest.fixture
def auto(monkeypatch, tmp_path):
    """The auto policy, with the decisions cached under tmp_path (returned)."""
    monkeypatch.delenv(encoder_choice.ENV, raising=False)
    monkeypatch.setenv("WENET_MOE_KERNEL_CACHE", str(tmp_path))
    return tmp_path


def _given(monkeypatch, kernel_s: float, onnx_s: float):
    """encoder_choice.measure returns these times; returns the list of its calls."""
    calls = []

    def fake(run, kinds=("kernel", "onnx"), reps=encoder_choice.MEASURE_REPS):
        calls.append(kinds)
        return {"kernel": kernel_s, "onnx": onnx_s}
    monkeypatch.setattr(encoder_choice, "measure", fake)
    return calls


def test_a_real_measurement_is_made_cached_and_reused(export, auto, monkeypatch):
    model = OnnxAsrModel(export)
    assert model.encoder_choice.startswith("measured on this CPU: kernel graph ")
    assert model.kernel_experts in ("on", f"off ({model.encoder_choice})")
    assert model.single_calls == 0 and model.session_cpu_s["encoder"] == 0.0   # reset after it
    with open(auto / encoder_choice.CHOICES_FILE, encoding="utf-8") as f:
        entries = json.load(f)
    (entry,) = entries.values()
    assert entry["graph"] in ("kernel", "onnx") and entry["kernel_s"] > 0 and entry["onnx_s"] > 0
    assert entry["file"] == os.path.join(export, "encoder.onnx")
    assert (entry["graph"] == "kernel") == (model.kernel_experts == "on")

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")
    monkeypatch.setattr(encoder_choice, "measure", no_measuring)
    again = OnnxAsrModel(export)
    assert again.encoder_choice.startswith("cached measurement on this CPU")
    assert again.kernel_experts == model.kernel_experts.replace("measured", "cached measurement")
    assert isinstance(again.sessions["encoder"], ExpertSplitEncoder) == (entry["graph"] == "kernel")


def test_the_onnx_graph_is_taken_only_when_faster_by_the_margin(export, auto, monkeypatch):
    plain = OnnxAsrModel(export, kernel_experts=False)
    _given(monkeypatch, kernel_s=0.020, onnx_s=0.010)
    slow_kernel = OnnxAsrModel(export)
    assert slow_kernel.kernel_experts == ("off (measured on this CPU: kernel graph 20.0 ms, "
                                          ".onnx graph 10.0 ms)")
    assert slow_kernel.kernel_graph == "" and not isinstance(slow_kernel.sessions["encoder"], ExpertSplitEncoder)
    assert slow_kernel.paths["encoder"] == os.path.join(export, "encoder.onnx")
    windows = _windows(slow_kernel, 0, 5)
    for got, want in zip(_stream(slow_kernel, windows)[0], _stream(plain, windows)[0]):
        np.testing.assert_array_equal(got, want)        # the very same graph
    # within the margin: the kernel graph stays (another export file, so not cached)
    os.utime(os.path.join(export, "encoder.onnx"))
    _given(monkeypatch, kernel_s=0.0100, onnx_s=0.0100 / (1 + encoder_choice.MEASURE_MARGIN) + 1e-6)
    tie = OnnxAsrModel(export)
    assert tie.kernel_experts == "on" and tie.kernel_graph == "whole"
    for got, want in zip(_stream(tie, windows)[0], _stream(plain, windows)[0]):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)


def test_the_batched_encoder_is_chosen_the_same_way(export, auto, monkeypatch):
    _given(monkeypatch, kernel_s=0.03, onnx_s=0.01)
    model = OnnxAsrModel(export, batch_encoder=True)
    assert model.batched and not isinstance(model.sessions["encoder_batch"], ExpertSplitEncoder)
    assert model.paths["encoder_batch"] == os.path.join(export, "encoder_batch.onnx")
    states = [model.new_state(4) for _ in range(2)]
    outs = model.forward_encoder_chunks([_windows(model, s, 1)[0] for s in (1, 2)], states)
    assert [o.shape[1] for o in outs] == [model.info.output_size] * 2


def test_a_changed_graph_or_thread_count_is_measured_again(export, auto, monkeypatch):
    calls = _given(monkeypatch, kernel_s=0.01, onnx_s=0.02)
    OnnxAsrModel(export)
    OnnxAsrModel(export)
    assert len(calls) == 1
    OnnxAsrModel(export, num_threads=2)
    assert len(calls) == 2
    os.utime(os.path.join(export, "encoder.kernel", "experts.npz"))
    OnnxAsrModel(export)
    assert len(calls) == 3


def test_an_unreadable_cache_is_measured_again_and_rewritten(export, auto, monkeypatch, caplog):
    path = auto / encoder_choice.CHOICES_FILE
    path.write_text("{not json", encoding="utf-8")
    calls = _given(monkeypatch, kernel_s=0.01, onnx_s=0.02)
    with caplog.at_level(logging.WARNING, logger="wenet_moe_runtime.encoder_choice"):
        model = OnnxAsrModel(export)
    assert len(calls) == 1 and model.kernel_experts == "on"
    assert any(str(path) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert len(json.loads(path.read_text(encoding="utf-8"))) == 1


def test_on_and_off_do_not_measure(export, auto, monkeypatch):
    calls = _given(monkeypatch, kernel_s=0.02, onnx_s=0.01)
    on = OnnxAsrModel(export, kernel_experts="on")
    assert on.kernel_experts == "on" and on.encoder_choice == ""
    monkeypatch.setenv(encoder_choice.ENV, "off")
    off = OnnxAsrModel(export)
    assert off.kernel_experts == f"off ({encoder_choice.ENV}=off)" and off.encoder_choice == ""
    assert OnnxAsrModel(export, kernel_experts="off").kernel_experts == "off (kernel_experts=False)"
    assert calls == []


def test_bad_policies_name_what_is_wrong(monkeypatch):
    monkeypatch.setenv(encoder_choice.ENV, "fast")
    with pytest.raises(ValueError, match=r"WENET_MOE_KERNEL_EXPERTS: expected one of auto, on, off, got 'fast'"):
        encoder_choice.policy(True)
    with pytest.raises(ValueError, match=r"kernel_experts: expected a bool or one of auto, on, off, got 'yes'"):
        encoder_choice.policy("yes")
    assert encoder_choice.policy(False) == "off" and encoder_choice.policy("on") == "on"
    parser = argparse.ArgumentParser()
    encoder_choice.add_arguments(parser)
    assert encoder_choice.from_arguments(parser.parse_args([])) is True
    assert encoder_choice.from_arguments(parser.parse_args(["--no_kernel_experts"])) == "off"
    assert encoder_choice.from_arguments(parser.parse_args(["--kernel_experts", "on"])) == "on"
    with pytest.raises(ValueError, match="--no_kernel_experts contradicts --kernel_experts on"):
        encoder_choice.from_arguments(parser.parse_args(["--no_kernel_experts", "--kernel_experts", "on"]))


def test_measure_interleaves_and_takes_medians(monkeypatch):
    """One warm-up run of each kind, then `reps` rounds in alternating order; the
    medians of the given durations."""
    order, clock = [], [0.0]
    durations = {"kernel": iter([9.0, 1.0, 5.0, 3.0]), "onnx": iter([9.0, 2.0, 2.0, 8.0])}

    def run(kind):
        order.append(kind)
        clock[0] += next(durations[kind])
    monkeypatch.setattr(encoder_choice.time, "perf_counter", lambda: clock[0])
    times = encoder_choice.measure(run, reps=3)
    assert order == ["kernel", "onnx", "onnx", "kernel", "kernel", "onnx", "onnx", "kernel"]
    assert times == {"kernel": 3.0, "onnx": 2.0}
    assert encoder_choice.decide(times).graph == "onnx"
    assert encoder_choice.decide({"kernel": 1.0, "onnx": 0.96}).graph == "kernel"


def test_a_failing_measurement_is_a_model_error_naming_the_graphs(export, auto, monkeypatch):
    from wenet_moe_runtime.model import ModelError

    def broken(run, kinds=("kernel", "onnx"), reps=encoder_choice.MEASURE_REPS):
        run("kernel")
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : boom\nmore lines")
    monkeypatch.setattr(encoder_choice, "measure", broken)
    with pytest.raises(ModelError, match=r"encoder.kernel: timing it against encoder.onnx failed: "
                                         r"\[ONNXRuntimeError\] : 6 : RUNTIME_EXCEPTION : boom \(kernel_experts"):
        OnnxAsrModel(export)
    assert not os.path.exists(auto / encoder_choice.CHOICES_FILE)


def test_a_malformed_cache_entry_is_measured_again(export, auto, monkeypatch, caplog):
    """An entry without its times (or with another graph name) is logged by key and
    replaced by a new measurement."""
    key = encoder_choice.choice_key(os.path.join(export, "encoder.onnx"),
                                    os.path.join(export, "encoder.kernel"), 1)
    path = auto / encoder_choice.CHOICES_FILE
    path.write_text(json.dumps({key: {"graph": "kernel"}}), encoding="utf-8")
    calls = _given(monkeypatch, kernel_s=0.02, onnx_s=0.01)
    with caplog.at_level(logging.WARNING, logger="wenet_moe_runtime.encoder_choice"):
        model = OnnxAsrModel(export)
    assert len(calls) == 1 and model.kernel_experts.startswith("off (measured")
    assert any(key in r.getMessage() and "malformed" in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text(encoding="utf-8"))[key]["graph"] == "onnx"
