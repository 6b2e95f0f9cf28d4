"""The recipe matrix: every shipped config (vjepa_fast/configs/*.yaml, listed when the tests are collected, so a config
added later is covered without editing this file) at a tiny size, trained 3 steps as users run it: in one process,
with gradient accumulation, resumed after step 2, and under torchrun on 2 gloo processes with DDP and with FSDP, each
also resumed after step 2. A cooldown starts from a tiny run of its pretraining config (optimization.anneal_ckpt: our
checkpoint, and the same exported in the official layout), as the recipes say.

The one-process runs (this pytest process) see the same 4 clips per step, 4 at once or 2 x 2 accumulated, and must
give the same losses and weights; 2 ranks draw other clips, so the multi-process runs are compared with each other
(FSDP with DDP, each resumed run with its uninterrupted one). The multi-process runs of a config share one torchrun
launch (this file is its script). Those launches take most of the time: they are marked slow (CI runs them).
"""
import csv
import json
import os
import subprocess
import sys
import traceback
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import vjepa_fast.train as train_module
from vjepa_fast.checkpoint import export_official, load_checkpoint, load_training_state
from vjepa_fast.config import CONFIG_DIR, load_config
from vjepa_fast.kernels import _common as kernel_common
from vjepa_fast.model import NETWORKS
from vjepa_fast.train import train

CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
STEPS = 3
CLIPS = 4  # per step, in every way of running: 4 clips in one process, 2 x 2 accumulated, 2 on each of 2 ranks
FRAMES = 4  # the longest clip; a config's other clip lengths shrink in proportion
MULTI = {"fsdp": ["meta.data_parallel=fsdp"], "ddp": ["meta.data_parallel=ddp"]}
# The runs of one torchrun launch, in order: each mode uninterrupted, then stopped after step 2 and resumed.
MULTI_RUNS = {run: mode for mode in MULTI for run in (mode, f"{mode}_resume")}
LAUNCH_TIMEOUT_S = 600


def _load(name, overrides=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the V-JEPA 2 configs' report of their unused cluster keys
        return load_config(name, overrides)


@lru_cache(None)
def _is_cooldown(name):
    return _load(name).optimization.is_anneal


def _pretraining_of(name):
    """The config a cooldown's anneal checkpoint comes from: the pretraining one it is named after (vjepa2_vitl16 for
    vjepa2_vitl16_cooldown_256px_64f), else the cooldown itself without annealing."""
    prefix = name.split("_cooldown")[0]
    return prefix if prefix in CONFIGS and not _is_cooldown(prefix) else name


def _tiny(name, dataset):
    """Overrides shrinking config `name` to a 2-block width-32 model at 64 px and <= 4 frames, on the tiny synthetic
    dataset (as many dataset files as the config names), with no loader workers; everything else as shipped."""
    d = _load(name).data
    files = [dataset.motion_train_csv, dataset.appearance_train_csv]
    sets = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pred_depth=1",
            "model.pred_embed_dim=16", "model.pred_num_heads=2", "data.crop_size=64", "data.num_workers=0",
            f"data.datasets=[{', '.join(files[i % 2] for i in range(max(1, len(d.datasets))))}]"]
    if d.dataset_fpcs:
        longest = max(d.dataset_fpcs)
        fpcs = [max(d.tubelet_size, f * FRAMES // longest // d.tubelet_size * d.tubelet_size) for f in d.dataset_fpcs]
        sets += [f"data.dataset_fpcs=[{', '.join(map(str, fpcs))}]", f"data.num_frames={max(fpcs)}"]
    else:
        sets.append(f"data.num_frames={FRAMES}")
    return sets


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def _final_state(run_dir):
    """The networks' weights and AdamW's state in the run's last checkpoint, by name."""
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    tensors = {f"{net}.{k}": v for net in NETWORKS for k, v in state[net].items()}
    tensors.update({f"adamw.{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()})
    return tensors, state["optimizer"]["param_groups"]


def _assert_same_run(run_dir, reference_dir, loss_rtol, atol):
    """The run in `run_dir` took the steps of the one in `reference_dir`: the same losses (to `loss_rtol`), then
    the same weights and AdamW state (to `atol`)."""
    got, want = _losses(run_dir), _losses(reference_dir)
    assert got.keys() == want.keys() == set(range(STEPS))
    assert all(abs(got[s] - want[s]) <= loss_rtol * abs(want[s]) for s in want), (got, want)
    (tensors, groups), (reference, reference_groups) = _final_state(run_dir), _final_state(reference_dir)
    assert tensors.keys() == reference.keys() and groups == reference_groups
    for k, v in tensors.items():
        assert (v.float() - reference[k].float()).abs().max() <= atol, k


class Matrix:
    """The runs of the matrix, each made once, on first use, in one folder per config."""

    def __init__(self, dataset, root):
        self.dataset, self.root = dataset, root
        self.single = lru_cache(None)(self._single)
        self.anneal = lru_cache(None)(self._anneal)
        self.launch = lru_cache(None)(self._launch)

    def overrides(self, name, *extra, anneal=None):
        """Overrides of a tiny run of `name`, a cooldown's starting from `anneal` (default: our checkpoint)."""
        sets = [*_tiny(name, self.dataset), f"data.batch_size={CLIPS}", *extra]
        if _is_cooldown(name):
            sets.append(f"optimization.anneal_ckpt={anneal or self.anneal(name)[0]}")
        return sets

    def _single(self, name):
        """The uninterrupted one-process run of `name`: its run directory."""
        run_dir = self.root / name / "single"
        train(_load(name, self.overrides(name)), run_dir, max_steps=STEPS, progress=False)
        return run_dir

    def _anneal(self, name):
        """A cooldown's anneal checkpoints: its pretraining config's one-process run (2 steps), ours and exported
        in the official layout (`vjepa-fast export`)."""
        source = _pretraining_of(name)
        run_dir = self.root / name / "pretraining"
        sets = [*_tiny(source, self.dataset), f"data.batch_size={CLIPS}"]
        if source == name:
            sets.append("optimization.is_anneal=false")
        train(_load(source, sets), run_dir, max_steps=2, progress=False)
        ours = run_dir / "checkpoints" / "latest.pt"
        return ours, export_official(load_training_state(ours), self.root / name / "pretraining-official.pth.tar")

    def _launch(self, name):
        """The MULTI_RUNS on 2 gloo processes, one torchrun launch: {run: None, or what stopped it}."""
        folder = self.root / name
        sets = self.overrides(name, f"data.batch_size={CLIPS // 2}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               name, str(folder), json.dumps(sets)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("TRITON_INTERPRET", None)  # CPU subprocesses take the kernels' PyTorch references: faster
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
        log = (out.stdout + out.stderr)[-3000:]
        results = folder / "multi.json"
        assert results.exists(), f"torchrun exited {out.returncode} before reporting: {log}"
        return {run: error and f"{error}\n--- launch output ---\n{log}"
                for run, error in json.loads(results.read_text()).items()}


def _no_loss_plot(*args, **kwargs):
    """What train() calls to draw loss.png here: nothing (matplotlib takes ~1 s a run; tests/test_train.py checks
    the plot)."""


@pytest.fixture(autouse=True)
def cpu_run(monkeypatch):
    """Runs as a CPU makes them, on one thread (tiny matrices), with the kernels' PyTorch references (a CPU run takes
    them; the Triton interpreter of the test session would take most of the matrix's time, the kernels have their
    own tests) and no loss plot."""
    monkeypatch.setattr(kernel_common, "INTERPRET", False)
    monkeypatch.setattr(train_module, "plot_loss", _no_loss_plot)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def matrix(tiny_dataset, tmp_path_factory):
    return Matrix(tiny_dataset, tmp_path_factory.mktemp("matrix"))


def _assert_trained(run_dir):
    """The run made STEPS steps with plausible losses and checkpointed the last."""
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(STEPS)) and all(0 < loss < 10 for loss in losses.values()), losses
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["step"] == STEPS


CASES = [pytest.param(name, case, id=f"{name}-{case}", marks=[pytest.mark.slow] if case in MULTI_RUNS else [])
         for name in CONFIGS for case in ("single", "accumulation", "resume", *MULTI_RUNS,
                                          *(("anneal_official",) if _is_cooldown(name) else ()))]


@pytest.mark.parametrize("name,case", CASES)
def test_recipe(matrix, name, case, tmp_path):
    single = matrix.single(name)
    if case == "single":
        _assert_trained(single)
    elif case == "accumulation":
        cfg = _load(name, matrix.overrides(name, f"data.batch_size={CLIPS // 2}", "optimization.accumulation_steps=2"))
        train(cfg, tmp_path, max_steps=STEPS, progress=False)
        _assert_same_run(tmp_path, single, loss_rtol=1e-6, atol=1e-6)
    elif case == "resume":
        cfg = _load(name, matrix.overrides(name))
        train(cfg, tmp_path, max_steps=2, progress=False)
        train(cfg, tmp_path, max_steps=STEPS, resume=True, progress=False)
        _assert_same_run(tmp_path, single, loss_rtol=0, atol=0)
    elif case == "anneal_official":  # the cooldown from the same anneal checkpoint in the official layout
        cfg = _load(name, matrix.overrides(name, anneal=matrix.anneal(name)[1]))
        train(cfg, tmp_path, max_steps=STEPS, progress=False)
        _assert_same_run(tmp_path, single, loss_rtol=0, atol=0)
    else:  # 2 ranks draw other clips than one process: the multi-process runs are compared with each other
        results, folder = matrix.launch(name), matrix.root / name
        assert results[case] is None, results[case]
        _assert_trained(folder / case)
        straight = MULTI_RUNS[case]
        if straight != case:  # resumed after step 2: exactly the uninterrupted run
            assert results[straight] is None, f"the uninterrupted {straight} run failed: {results[straight]}"
            _assert_same_run(folder / case, folder / straight, loss_rtol=0, atol=0)
        elif case == "fsdp":  # sharded, the same sums in the same order as DDP's: the losses bit for bit; the CPU's
            # fused AdamW rounds the last bit of a shard of an odd-sized tensor (ViT-g's tiny MLP width 139) apart
            # from the whole tensor's, ~1e-10 in a weight
            assert results["ddp"] is None, f"the DDP run to compare with failed: {results['ddp']}"
            _assert_same_run(folder / "fsdp", folder / "ddp", loss_rtol=0, atol=1e-8)


def _launched(name, folder, sets):
    """A torchrun rank (this file run as a script): the MULTI_RUNS one after the other in one process group, each
    rank catching what stops a run (both ranks stop alike, so the next run still finds its partner); rank 0 writes
    {run: None, or the error} to folder/multi.json."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(minutes=2))  # train() keeps a group it did not create
    train_module.plot_loss = _no_loss_plot
    results = {}
    for run, straight in MULTI_RUNS.items():
        cfg = _load(name, [*sets, *MULTI[straight]])
        try:
            for i, max_steps in enumerate((STEPS,) if run == straight else (2, STEPS)):
                train(cfg, Path(folder) / run, max_steps=max_steps, resume=i > 0, progress=False)
            results[run] = None
        except Exception as e:  # noqa: BLE001 - reported to the test of this run
            results[run] = "".join(traceback.format_exception_only(e)).strip()
            traceback.print_exc()
    if dist.get_rank() == 0:
        (Path(folder) / "multi.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    _launched(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
