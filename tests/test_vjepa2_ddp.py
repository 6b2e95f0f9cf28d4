"""V-JEPA 2 under DDP and FSDP (2 gloo processes on the CPU): its per-group mask tokens, some of which a step (or a
rank) does not use, train as the official code trains them with find_unused_parameters=True: a token no rank used in
a step gets no gradient, so AdamW leaves its value, its state and its weight decay alone."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from helpers import V2_TINY, v2_tiny_config
from vjepa_fast.checkpoint import load_checkpoint
from vjepa_fast.distributed import DistEnv, full_model_state, full_optimizer_state, load_full_optimizer_state, wrap_ddp
from vjepa_fast.errors import UserError
from vjepa_fast.optim import build_optimizer, param_groups
from vjepa_fast.step import EMA, build_model, masks_generators, step_batches, train_step
from vjepa_fast.train import wrap_for_data_parallel


def _state_index(model, name):
    """The index of the predictor's parameter `name` in optimizer.state_dict() (optim.param_groups' order)."""
    param = dict(model.predictor.named_parameters())[name]
    flat = [p for g in param_groups(model.encoder, model.predictor) for p in g["params"]]
    return next(i for i, p in enumerate(flat) if p is param)


def test_vjepa2_recipe_trains_under_ddp_leaving_the_unused_mask_tokens_as_the_official_code(tiny_dataset, tmp_path):
    csv = tiny_dataset.motion_train_csv
    sets = [*V2_TINY, f"data.datasets=[{csv}, {csv}, {csv}]", "logging.log_every=1", "logging.checkpoint_every=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vjepa_fast.cli", "train", "--config", "vjepa2_vitl16", "--run-dir", str(tmp_path / "run"),
           "--max-steps", "3", "--no-progress", *[x for o in sets for x in ("--set", o)]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["step"] == 3
    cfg = v2_tiny_config(f"data.datasets=[{csv}, {csv}, {csv}]")
    init = build_model(cfg, torch.device("cpu"))  # the same seeded initialisation as the run's
    tokens = [f"mask_tokens.{i}" for i in range(6)]  # 2 mask configs x 3 datasets: the official layout
    assert [k for k in state["predictor"] if k.startswith("mask_tokens.")] == tokens
    adam = state["optimizer"]["state"]
    used = _state_index(init, "mask_tokens.0")
    assert int(adam[used]["step"]) == 3 and not torch.equal(state["predictor"]["mask_tokens.0"],
                                                            init.predictor.mask_tokens[0].detach())
    for name in tokens[1:]:  # one clip length: only token 0 is ever used
        assert torch.equal(state["predictor"][name], init.predictor.state_dict()[name]), name  # not decayed
        assert _state_index(init, name) not in adam, name  # no AdamW state, as the official run leaves them


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Clip-length groups present on (rank 0, rank 1) at each step: both lengths everywhere; the 2-frame clips on rank 0
# only (token 1 used there alone); one length on each rank (token 1 used nowhere); both again.
LAYOUTS = [((2, 4), (2, 4)), ((2, 4), (4,)), ((4,), (2,)), ((2, 4), (2, 4))]


def _mixed_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sets = ["data.dataset_fpcs=[2, 4, 4]", "data.datasets=[a.csv, b.csv, c.csv]", "optimization.weight_decay=0.1",
                "optimization.final_weight_decay=0.1"]
        cfg = v2_tiny_config(*sets)
        device, env = torch.device("cpu"), DistEnv(rank, 2, rank)
        ours = build_model(cfg, device)
        ours_ema = wrap_for_data_parallel(ours, cfg, env, device)
        official = build_model(cfg, device)  # the official wrapping: the predictor's graph walked every step
        official_ema = EMA(official, fused=True)
        official.encoder = wrap_ddp(official.encoder, device)
        official.predictor = DistributedDataParallel(official.predictor, find_unused_parameters=True)
        fsdp = build_model(cfg, device)
        fsdp_ema = wrap_for_data_parallel(fsdp, v2_tiny_config(*sets, "meta.data_parallel=fsdp"), env, device)
        reference = build_model(cfg, device)  # the official computation: a network call per clip-length group
        reference_ema = wrap_for_data_parallel(reference, v2_tiny_config(*sets, "meta.computation=reference"), env,
                                               device)
        masks = masks_generators(cfg)
        results = {}
        for name, model, ema in (("ours", ours, ours_ema), ("official", official, official_ema),
                                 ("fsdp", fsdp, fsdp_ema), ("reference", reference, reference_ema)):
            optimizer = build_optimizer(cfg.optimization, model.encoder, model.predictor)
            tokens = [[t.detach().clone() for t in model.unwrapped("predictor").mask_tokens]]  # then after each step
            losses, computation = [], "reference" if name == "reference" else "fast"
            for step, layout in enumerate(LAYOUTS):
                g = torch.Generator().manual_seed(100 * step + rank)
                clips = [torch.randn(2, 3, frames, 32, 32, generator=g) for frames in layout[rank]]
                batches = step_batches([clips], masks, cfg, step, device)
                result = train_step(model, optimizer, ema, batches, computation=computation,
                                    autocast=torch.autocast("cpu", enabled=False), max_norm=None, momentum=0.99)
                losses.append(float(result.loss))
                tokens.append([t.detach().clone() for t in model.unwrapped("predictor").mask_tokens])
            if name == "fsdp":  # gathered: on rank 0; and the official run's AdamW state loaded (resume, anneal)
                reloaded = build_optimizer(cfg.optimization, model.encoder, model.predictor)
                load_full_optimizer_state(model, reloaded, results["official"]["optimizer"])
                results[name] = {"predictor": full_model_state(model.predictor), "losses": losses,
                                 "optimizer": full_optimizer_state(model, optimizer),
                                 "reloaded": full_optimizer_state(model, reloaded)}
            else:
                results[name] = {"predictor": model.unwrapped("predictor").state_dict(), "tokens": tokens,
                                 "optimizer": optimizer.state_dict(), "losses": losses}
        results["encoder_params"] = len(list(ours.unwrapped("encoder").parameters()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_mask_tokens_some_ranks_or_steps_do_not_use_train_as_with_find_unused_parameters(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the workers take the kernels' PyTorch references
    mp.spawn(_mixed_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        ours, official = r["ours"], r["official"]
        for k, v in official["predictor"].items():
            assert torch.equal(ours["predictor"][k], v), k
        assert ours["optimizer"]["param_groups"] == official["optimizer"]["param_groups"]
        assert ours["optimizer"]["state"].keys() == official["optimizer"]["state"].keys()
        for i, state in official["optimizer"]["state"].items():
            for k, v in state.items():
                assert torch.equal(ours["optimizer"]["state"][i][k], v), (i, k)
        # what find_unused_parameters does, spelled out: token 1 (the 2-frame group's) moved at steps 0, 1 (used on
        # rank 0 only) and 3, not at step 2 (no rank used it); tokens 2-5 (one per mask config and dataset)
        # never moved and have no AdamW state
        moved = [[not torch.equal(after[t], before[t]) for t in range(6)]
                 for before, after in zip(ours["tokens"], ours["tokens"][1:])]
        assert moved == [[True, True] + [False] * 4, [True, True] + [False] * 4, [True] + [False] * 5,
                         [True, True] + [False] * 4]
        steps = sorted(int(s["step"]) for s in ours["optimizer"]["state"].values())
        trained = sum(1 for k in ours["predictor"] if not k.startswith("mask_tokens.")) + 2 + r["encoder_params"]
        assert steps == [3] + [4] * (trained - 1)  # token 1: three updates; tokens 2-5: none, no state
        assert r["fsdp"]["losses"] == official["losses"], rank  # FSDP: the same steps, bit for bit
        # the reference computation: the same steps in other kernels, the tokens trained alike
        assert r["reference"]["losses"] == pytest.approx(official["losses"], rel=1e-5, abs=0), rank
        assert r["reference"]["optimizer"]["state"].keys() == official["optimizer"]["state"].keys()
        assert [[not torch.equal(a, b) for a, b in zip(after, before)] for before, after in
                zip(r["reference"]["tokens"], r["reference"]["tokens"][1:])] == moved
    replicas = [torch.load(tmp_path / f"rank{rank}.pt")["reference"]["predictor"] for rank in (0, 1)]
    assert all(torch.equal(v, replicas[1][k]) for k, v in replicas[0].items())  # gradients averaged alike
    r = torch.load(tmp_path / "rank0.pt")  # FSDP's networks and AdamW state, gathered
    fsdp, official = r["fsdp"], r["official"]
    for k, v in official["predictor"].items():  # AdamW's fused CPU kernel rounds a shard's tail elements its own way
        torch.testing.assert_close(fsdp["predictor"][k], v, rtol=0, atol=1e-6, msg=k)
    assert fsdp["predictor"]["mask_tokens.2"].equal(official["predictor"]["mask_tokens.2"])  # never decayed
    assert fsdp["optimizer"]["param_groups"] == official["optimizer"]["param_groups"]
    assert fsdp["optimizer"]["state"].keys() == official["optimizer"]["state"].keys()  # tokens 2-5: no state
    for i, state in official["optimizer"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(fsdp["optimizer"]["state"][i][k], v, rtol=0, atol=1e-6, msg=f"{i} {k}")
    # loaded into FSDP's AdamW: exactly that state, the tokens without one still without
    assert fsdp["reloaded"]["param_groups"] == official["optimizer"]["param_groups"]
    assert fsdp["reloaded"]["state"].keys() == official["optimizer"]["state"].keys()
    for i, state in official["optimizer"]["state"].items():
        assert all(torch.equal(fsdp["reloaded"]["state"][i][k], v) for k, v in state.items()), i


def test_fsdp_refuses_the_reference_computation_over_several_clip_lengths():
    """Its network call per clip-length group would gather FSDP's shards as many times as a rank holds groups: a
    collective mismatch between ranks, so a one-line error instead."""
    cfg = v2_tiny_config("data.dataset_fpcs=[2, 4, 4]", "data.datasets=[a.csv, b.csv, c.csv]",
                         "meta.data_parallel=fsdp", "meta.computation=reference")
    model = build_model(cfg, torch.device("cpu"))
    with pytest.raises(UserError, match="meta.data_parallel=fsdp: the reference computation runs the networks"):
        wrap_for_data_parallel(model, cfg, DistEnv(0, 2, 0), torch.device("cpu"))
