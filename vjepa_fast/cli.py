"""`vjepa-fast` command line: train (default: the demo config on the embedded synthetic dataset)."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="pretrain V-JEPA (default: configs/demo.yaml on the embedded synthetic data)")
    p.add_argument("--config", default="demo", help="a YAML path or a shipped config name (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (parsed as YAML); repeatable, e.g. --set data.batch_size=8")
    p.add_argument("--run-dir", help="where config, metrics, plots and checkpoints go (default: runs/<config>)")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoints/latest.pt")
    p.add_argument("--overwrite", action="store_true", help="start again even if the run dir has a checkpoint")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (the schedules are unchanged)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_train(args) -> int:
    from .train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite, device=args.device,
                   max_steps=args.max_steps, progress=not args.no_progress)
    print(f"trained steps {result.start_step}->{result.end_step} in {result.seconds:.0f} s; "
          f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}\nrun dir: {result.run_dir} "
          f"(metrics.csv, loss.png, checkpoints/latest.pt)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vjepa-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    _add_train(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv or ["train"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"train": _run_train}[args.command](args)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"vjepa-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
