"""Per-step cost of V-JEPA 2's mask tokens under DDP on the CPU (2 gloo processes): our wrapping (the tokens some
steps do not use stay out of DDP's buckets; those of absent clip lengths averaged after the backward) against the
official one (`find_unused_parameters=True` on the predictor: a walk of its autograd graph every step).

    python -m bench.ddp_tokens --steps 100

A tiny V-JEPA 2 model with the recipe's 12-block predictor; one clip length ([4, 4, 4], the shipped recipes) and
two ([2, 4, 4], some steps without the 2-frame group). The two wrappings alternate step by step, so machine noise
falls on both alike; the table gives the fastest and the median ms per training step on rank 0 (one clip per
clip-length group and rank, so that the wrapping's overhead weighs as much as it can against the computation).
"""
import argparse
import os
import socket
import statistics
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TINY_V2 = ["model.embed_dim=48", "model.depth=2", "model.num_heads=2", "model.pred_embed_dim=24",
           "model.pred_num_heads=2", "model.use_activation_checkpointing=false", "data.crop_size=32",
           "data.patch_size=8", "data.num_frames=4", "data.fps=8"]
CASES = {"one clip length [4, 4, 4]": [4, 4, 4], "two clip lengths [2, 4, 4]": [2, 4, 4]}


def _worker(rank: int, port: int, steps: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from vjepa_fast.config import load_config
    from vjepa_fast.distributed import DistEnv, wrap_ddp
    from vjepa_fast.optim import build_optimizer
    from vjepa_fast.step import EMA, build_model, masks_generators, step_batches, train_step
    from vjepa_fast.train import wrap_for_data_parallel

    device, env = torch.device("cpu"), DistEnv(rank, 2, rank)
    try:
        for case, fpcs in CASES.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = load_config("vjepa2_vitl16", [*TINY_V2, f"data.dataset_fpcs={fpcs}",
                                                    "data.datasets=[a.csv, b.csv, c.csv]"])
            ours = build_model(cfg, device)
            variants = {"ours": (ours, wrap_for_data_parallel(ours, cfg, env, device))}
            official = build_model(cfg, device)
            official_ema = EMA(official, fused=True)
            official.encoder = wrap_ddp(official.encoder, device)
            official.predictor = DistributedDataParallel(official.predictor, find_unused_parameters=True)
            variants["find_unused_parameters=True"] = (official, official_ema)
            optimizers = {name: build_optimizer(cfg.optimization, m.encoder, m.predictor)
                          for name, (m, _) in variants.items()}
            masks = masks_generators(cfg)
            times = {name: [] for name in variants}
            lengths = sorted(set(fpcs))
            for step in range(steps + 3):
                # two lengths: every third step this rank's batch holds one length only (token 1 unused here)
                layout = lengths if step % 3 or len(lengths) == 1 else lengths[-1:]
                g = torch.Generator().manual_seed(step * 2 + rank)
                clips = [torch.randn(1, 3, f, 32, 32, generator=g) for f in layout]
                batches = step_batches([clips], masks, cfg, step, device)
                for name, (model, ema) in variants.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    train_step(model, optimizers[name], ema, batches, computation="fast",
                               autocast=torch.autocast("cpu", enabled=False), max_norm=None, momentum=0.99)
                    if step >= 3:  # warm-up steps left out
                        times[name].append(time.perf_counter() - t0)
            if rank == 0:
                results[case] = {name: (1e3 * min(t), 1e3 * statistics.median(t)) for name, t in times.items()}
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="timed steps per wrapping and case")
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels' PyTorch references on the CPU
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, args.steps, results), nprocs=2)
    print("| case | ours: fastest / median (ms/step) | find_unused_parameters=True: fastest / median | "
          "find_unused_parameters costs (fastest) |")
    print("|---|---|---|---|")
    for case, r in results.items():
        ours, official = r["ours"], r["find_unused_parameters=True"]
        print(f"| {case} | {ours[0]:.1f} / {ours[1]:.1f} | {official[0]:.1f} / {official[1]:.1f} | "
              f"{official[0] - ours[0]:+.1f} ms ({official[0] / ours[0] - 1:+.1%}) |")


if __name__ == "__main__":
    main()
