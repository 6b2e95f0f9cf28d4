"""Smoke tests of the CPU-runnable benchmark commands (no timing asserts)."""
import dataclasses
import importlib.util
import json
import time

import pytest
import torch

from vjepa_fast.bench import step
from helpers import TINY, tiny_config
from vjepa_fast import cli
from vjepa_fast.step import build_model


def _sets(*extra):
    return [x for o in [*TINY, *extra] for x in ("--set", o)]


def test_bench_step_writes_results_and_parity(tmp_path, capsys):
    assert cli.main(["bench", "step", "--steps", "2", "--warmup", "1", "--out", str(tmp_path), *_sets()]) == 0
    result = json.loads((tmp_path / "step_demo.json").read_text())
    assert [v["label"] for v in result["variants"]] == ["reference", "fast"]
    fast = result["variants"][1]
    assert fast["loss_rel_err"] < 1e-5 and fast["grad_rel_err"] < 1e-4  # fp32 CPU: the same function
    assert set(fast["stages_ms"]) == {"h2d", "target", "context", "predictor", "loss", "backward", "optimizer",
                                      "ema", "other"}
    for v in result["variants"]:
        assert v["step_ms"] > 0 and v["mfu"] > 0 and v["build_s"] > 0 and v["first_step_s"] > 0
        assert v["step_ms"] >= v["device_step_ms"] * 0.5 and v["gaps_ms"] >= 0
        assert sum(v["stages_ms"].values()) == pytest.approx(v["step_ms"], rel=0.05)  # "other" closes the sum
    assert "host-to-device copy" in result["ms_per_iter"]
    assert "| predictor (fwd+bwd) |" in result["flops_table"]  # per network, linear vs attention
    assert (tmp_path / "step_demo.png").stat().st_size > 0
    assert "| fast | sdpa |" in capsys.readouterr().out


def test_each_variant_is_written_as_soon_as_it_is_measured(tmp_path):
    seen = []

    def on_variant(result):
        reporter(result)
        on_disk = json.loads((tmp_path / "step_demo.json").read_text())
        seen.append([v["label"] for v in on_disk["variants"]])

    reporter = step.Reporter(tmp_path, "step_demo")
    step.run(tiny_config(), steps=1, warmup=1, check_parity=False, on_variant=on_variant)
    assert seen == [["reference"], ["reference", "fast"]]


def test_any_exception_of_a_variant_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    real = step.time_variant

    def failing_reference(cfg, v, *args):
        if v.computation == "reference":
            raise Exception("triton.compiler.errors.CompilationError: a plain Exception")  # not a RuntimeError
        return real(cfg, v, *args)

    monkeypatch.setattr(step, "time_variant", failing_reference)
    result = step.run(tiny_config(), steps=1, warmup=1, check_parity=False)
    ref, fast = result["variants"]
    assert ref["error"].startswith("Exception: triton.compiler.errors.CompilationError") and ref["step_ms"] == 0
    assert fast["error"] is None and fast["step_ms"] > 0 and fast["speedup"] is None  # no reference to compare


def test_mask_drawing_is_timed_on_the_host_and_left_out_of_the_step():
    runner = step.SyntheticSteps(tiny_config(), "reference", "sdpa", torch.device("cpu"))
    drawn = []
    (generator,) = runner.masks.values()  # one clip length
    real = generator.gen

    def gen(*args, **kwargs):
        out = real(*args, **kwargs)
        drawn.append(time.perf_counter())
        return out

    generator.gen = gen
    masks_ms, _ = runner.run(0)
    marks = runner.timer.steps[-1]
    assert marks[-1][0] == "step" and masks_ms > 0  # the outermost stage, the step, ends last
    assert all(start >= drawn[0] for _, start, _ in marks)  # every timed stage began after the masks were drawn


def test_clips_of_several_lengths_are_timed_as_training_groups_them():
    cfg = tiny_config("model.use_rope=true", "model.embed_dim=48", "model.num_heads=2", "model.pred_embed_dim=24",
                      "model.pred_num_heads=2", "data.dataset_fpcs=[2, 4, 4]", "data.datasets=[a, b, c]",
                      "data.batch_size=5")
    assert step.clip_groups(cfg) == {2: 2, 4: 3}  # by the datasets' weights: 1/3 and 2/3 of 5 clips
    weighted = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, datasets_weights=[0.8, 0.1, 0.1]))
    assert step.clip_groups(weighted) == {2: 4, 4: 1}
    assert step.clip_groups(tiny_config("data.batch_size=5")) == {4: 5}
    batch = step.synthetic_batch(cfg, torch.device("cpu"), step=1)
    assert [c.shape[:3] for c in batch.clips] == [(2, 3, 2), (3, 3, 4)] and len(batch.masks_enc) == 2
    assert [[m.size(0) for m in masks] for masks in batch.masks_enc] == [[2, 2], [3, 3]]
    result = step.run(cfg, steps=1, warmup=1)
    assert result["clips_per_length"] == {2: 2, 4: 3} and "clips per length {2: 2, 4: 3}" in step.markdown(result)
    ref, fast = result["variants"]
    assert ref["error"] is None and fast["error"] is None and fast["loss_rel_err"] < 1e-5
    one_length = step.batch_flops(cfg, step.Batch(batch.clips[1], batch.masks_enc[1], batch.masks_pred[1])).total
    assert step.batch_flops(cfg, batch).total > one_length > 0  # both groups' work is counted


def test_variant_order_puts_compiled_variants_last():
    labels = [(v.label, v.backend) for v in step.plan_variants(["reference", "fast"], ["sdpa", "xformers"], "both")]
    assert labels == [("reference", "sdpa"), ("fast", "sdpa"), ("fast", "xformers"), ("fast compiled", "sdpa"),
                      ("fast compiled", "xformers")]
    assert [v.label for v in step.plan_variants(["reference", "fast"], ["sdpa"], "on")] == ["fast compiled"]
    with pytest.raises(ValueError, match="compile must be one of"):
        step.plan_variants(["fast"], ["sdpa"], "sometimes")


def test_models_are_built_on_the_device(monkeypatch):
    initialised = []
    real = torch.nn.init.trunc_normal_

    def recording(tensor, *args, **kwargs):
        initialised.append(tensor.device.type)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", recording)
    model = build_model(tiny_config(), torch.device("meta"))
    assert initialised and set(initialised) == {"meta"}  # initialised where they live, not on the CPU and moved
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_a_failing_backend_is_reported_without_losing_the_others(tmp_path, capsys):
    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed: its CPU failure mode differs")
    args = ["bench", "step", "--steps", "1", "--warmup", "0", "--no-parity", "--backends", "sdpa,xformers",
            "--out", str(tmp_path), *_sets()]
    assert cli.main(args) == 0
    variants = json.loads((tmp_path / "step_demo.json").read_text())["variants"]
    assert [(v["label"], v["backend"], v["error"] is None) for v in variants] == [
        ("reference", "sdpa", True), ("fast", "sdpa", True), ("fast", "xformers", False)]
    assert "needs the xformers package" in variants[2]["error"]
    assert "| fast | xformers | failed: RuntimeError" in capsys.readouterr().out


def test_profile_writes_a_chrome_trace_with_stage_ranges(tmp_path):
    assert cli.main(["profile", "--steps", "1", "--out", str(tmp_path), *_sets()]) == 0
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"target", "context", "predictor", "loss", "backward", "optimizer", "ema"} <= names


def test_pytest_benchmark_suite_runs(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "bench/bench_cpu.py", "--benchmark-disable",
                          "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "5 passed" in out.stdout


def test_mask_benchmark_reports_both_generators():
    from bench import masks

    result = masks.run(batch=4, steps=2)
    assert result["loop_ms"] > 0 and result["vectorised_ms"] > 0 and result["speedup"] > 0
