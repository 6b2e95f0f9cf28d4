"""`vjepa-fast` command line: train (default: the demo config on the embedded synthetic dataset)."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import load_config
from .errors import RunStopped, UserError

# What a user can act on: one line naming the culprit (--debug: the traceback too). Anything else is a bug.
EXPECTED_ERRORS = (UserError, RunStopped, FileNotFoundError, FileExistsError)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="pretrain V-JEPA (default: the demo config on the embedded synthetic data)")
    _add_config_args(p)
    p.add_argument("--run-dir", help="where config, metrics, plots and checkpoints go (default: the config's "
                   "logging.folder / folder, else runs/<config>)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the newest usable checkpoint in <run-dir>/checkpoints, or start fresh "
                            "when there is none: one command for a job's first start and every requeue")
    start.add_argument("--overwrite", action="store_true",
                       help="start again even if the run dir has a checkpoint (also where the config asks to "
                            "continue: meta.load_checkpoint, optimization.resume_anneal)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (the schedules are unchanged)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_train(args) -> int:
    from .train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite, device=args.device,
                   max_steps=args.max_steps, progress=not args.no_progress)
    print(f"trained steps {result.start_step}->{result.end_step} in {result.seconds:.0f} s; "
          f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}; {result.skipped_steps} skipped steps\n"
          f"run dir: {result.run_dir} (metrics.csv, loss.png, checkpoints/latest.pt)")
    if result.stopped_by:
        print(f"stopped by {result.stopped_by}: continue with --resume")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="frozen evaluation of a checkpoint: the official attentive-probe protocol "
                                    "(or our linear probe)")
    p.add_argument("--checkpoint", help="one of our checkpoints or an official V-JEPA one (with --config: "
                   "overrides the config's)")
    p.add_argument("--config", metavar="FILE.yaml", help="an official V-JEPA 1 or 2 eval config, unchanged: its "
                   "protocol, data and checkpoint (--train/--val/--image-folder/--checkpoint override them)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--train", help="training dataset file (official `path label` lines); needs --val")
    src.add_argument("--image-folder", metavar="DIR", help="images in DIR/train/<class>/ and DIR/val/<class>/")
    src.add_argument("--benchmark", choices=["synthetic"], help="the motion benchmark on the embedded synthetic data: "
                     "the checkpoint and its random init, both probes, motion and appearance labels")
    p.add_argument("--val", help="validation dataset file (with --train)")
    p.add_argument("--probe", choices=["attentive", "linear", "both"], default="attentive")
    p.add_argument("--key", choices=["target_encoder", "encoder"], default="target_encoder",
                   help="which encoder of the checkpoint (default: the target encoder, as the paper)")
    p.add_argument("--num-frames", type=int, help="official checkpoints: the frames the encoder takes (default 16)")
    p.add_argument("--num-heads", type=int, help="official checkpoints: the encoder's heads (default: by width)")
    p.add_argument("--use-rope", action=argparse.BooleanOptionalAction, default=None,
                   help="official checkpoints: a RoPE (V-JEPA 2) encoder or not (default: from the weights)")
    p.add_argument("--img-size", type=int, help="official RoPE checkpoints: the input size (default 256)")
    p.add_argument("--sampling-rate", type=int, help="frame step of eval clips (default: the checkpoint's, else 4)")
    p.add_argument("--num-segments", type=int, default=1, help="clips per video, tokens concatenated (K400: 8)")
    p.add_argument("--num-views", type=int, default=1, help="spatial views per clip, softmax averaged (paper: 3)")
    p.add_argument("--image-frames", type=int, help="frames each image is repeated into (default: the encoder's, "
                   "16, as the official image eval)")
    p.add_argument("--epochs", type=int, help="probe epochs (default 20, Table 6)")
    p.add_argument("--lr", type=float, help="peak lr, cosine to 0 without warmup (default 1e-3, Table 6; "
                   "benchmark 1e-2; refused with a config's multihead_kwargs sweep)")
    p.add_argument("--weight-decay", type=float, help="start of the cosine to 1e-6 (default 0.01; images 0.001; "
                   "refused with a config's sweep)")
    p.add_argument("--batch-size", type=int, help="probe batch (default 256; images 1024; benchmark 32)")
    p.add_argument("--micro-batch", type=int, help="items per encoder and probe forward, gradients accumulated "
                   "over a batch (the official per-GPU batch; default: the config's, else 4; images 16; "
                   "benchmark 32); does not change the result")
    p.add_argument("--cached-train", action="store_true", help="train the probes on cached features of the "
                   "un-augmented train views (ours: faster, not the official protocol, which augments every epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", help="per-epoch CSVs (default: runs/eval/<checkpoint's run name>)")
    p.add_argument("--cache-dir", help="feature cache (default: <user cache>/vjepa_fast/features)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=1, help="video/image decoding worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_eval(args) -> int:
    from dataclasses import replace

    from .eval.official_config import read_eval_config
    from .eval.protocols import IMAGE_PROTOCOL, ProbeSettings
    from .eval.run import dataset_file_split, image_folder_splits, load_frozen, probe_encoder, results_table
    from .eval.synthetic_benchmark import SYNTHETIC_PROBE, run_synthetic_benchmark
    from .eval.views import ViewSpec
    from .step import pick_device

    job = read_eval_config(args.config) if args.config else None
    if job and args.benchmark:
        raise UserError("--config and --benchmark exclude each other")
    if not job and not (args.train or args.image_folder or args.benchmark):
        raise UserError("give --config, --train (with --val), --image-folder or --benchmark")
    if args.train and not (args.val or job):
        raise UserError("--train needs --val")
    checkpoint = args.checkpoint or (job.checkpoint if job else None)
    if not checkpoint:
        raise UserError("--checkpoint is required")
    device, progress = pick_device(args.device), not args.no_progress
    base = (job.settings if job else SYNTHETIC_PROBE if args.benchmark else IMAGE_PROTOCOL if args.image_folder
            else ProbeSettings())
    head = {"lr": args.lr, "weight_decay": args.weight_decay}
    for key, value in head.items():
        if value is not None and base.sweep:
            raise UserError(f"--{key.replace('_', '-')} does not apply to {args.config}: its multihead_kwargs set "
                            f"each of its {len(base.sweep)} probes' {key}")
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "micro_batch": args.micro_batch,
             "head": replace(base.head, **{k: v for k, v in head.items() if v is not None})}
    settings = replace(base, seed=args.seed, **{k: v for k, v in given.items() if v is not None})
    rope_size = job.resolution if job and job.use_rope else None  # a RoPE encoder takes the config's resolution
    key = job.checkpoint_key if job else args.key
    frozen = load_frozen(checkpoint, key,
                         num_frames=job.encoder_frames if job else args.num_frames, num_heads=args.num_heads,
                         use_rope=job.use_rope if job else args.use_rope, img_size=rope_size or args.img_size)
    out_dir = args.out_dir or f"runs/eval/{frozen.name}{'-synthetic' if args.benchmark else ''}"
    if args.benchmark:
        report = run_synthetic_benchmark(frozen, out_dir=out_dir, cache_dir=args.cache_dir, device=device,
                                         settings=settings, num_workers=args.workers, progress=progress)
        print(report.table())
        print(f"per-epoch CSVs: {out_dir}")
        return 0
    image_folder = args.image_folder or (job.image_folder if job and not args.train else None)
    if image_folder:
        train, val, num_classes = image_folder_splits(image_folder)
        frames = job.frames_per_clip if job else args.image_frames or frozen.encoder.num_frames
        spec = ViewSpec(frames, 1, job.resolution if job else frozen.encoder.img_size, 1, args.num_views)
    else:
        train = dataset_file_split(args.train or job.train)
        val = dataset_file_split(args.val or job.val)
        num_classes = max(train.labels + val.labels) + 1
        if job:
            spec = ViewSpec(job.frames_per_clip, job.frame_step, job.resolution, job.num_segments, job.num_views)
        else:
            spec = ViewSpec(frozen.encoder.num_frames, args.sampling_rate or frozen.sampling_rate,
                            frozen.encoder.img_size, args.num_segments, args.num_views)
    num_classes = job.num_classes if job else num_classes
    probes = ["attentive", "linear"] if args.probe == "both" else [args.probe]
    results = probe_encoder(frozen.encoder, train, val, spec, num_classes=num_classes, probes=probes,
                            settings=settings, out_dir=out_dir, cache_dir=args.cache_dir, device=device,
                            num_workers=args.workers, progress=progress, cached_train=args.cached_train)
    protocol = f"V-JEPA {job.version} protocol of {args.config}" if job else "V-JEPA 1 protocol"
    print(f"{checkpoint} ({key}): {len(train.paths)} train / "
          f"{len(val.paths)} val items, {num_classes} classes, {protocol}"
          f"{f', best of {len(settings.heads())} probes' if len(settings.heads()) > 1 else ''}\n"
          f"{results_table(results)}")
    print(f"per-epoch CSVs: {out_dir}")
    return 0


def _add_data(sub) -> None:
    from .dali_pipelines.spec import ClipSpec  # no decoder import: the CLI stays light

    max_bytes = ClipSpec.filter_long_videos
    p = sub.add_parser("data", help="dataset tools: check videos, transcode for fast decoding")
    tools = p.add_subparsers(dest="tool", required=True)
    check = tools.add_parser("check", help="probe every video of dataset files: usable or why not, codec, size, "
                                           "frames, fps, keyframe spacing; exit status 1 if any would be skipped")
    check.add_argument("datasets", nargs="+", metavar="FILE.csv", help="dataset files (official `path label`)")
    check.add_argument("--min-frames", type=int, help="fewer frames is too short, as data.min_frames (default: none; "
                                                      "training pads short videos with their last frame)")
    check.add_argument("--max-bytes", type=int, default=max_bytes,
                       help=f"a larger video file is too large, as data.filter_long_videos ({max_bytes})")
    check.add_argument("--workers", type=int, help="parallel processes (default: all cores)")
    check.add_argument("--csv", help="also write the per-video results to this CSV file")
    transcode = tools.add_parser("transcode", help="re-encode a dataset's videos to a short side and a short "
                                                   "keyframe interval (fast NVDEC seeking); writes a new dataset file")
    transcode.add_argument("source", help="a dataset file, or a folder of videos (label = index of its subfolder)")
    transcode.add_argument("--out", required=True, help="output folder (an interrupted run continues there)")
    transcode.add_argument("--short-side", type=int, default=256, help="short side in pixels, never upscaled (256)")
    transcode.add_argument("--gop", type=int, default=16, help="frames between keyframes (16)")
    transcode.add_argument("--codec", default="libx264", help="encoder: libx264 (default), libvpx-vp9 or mjpeg")
    transcode.add_argument("--crf", type=int, help="constant quality (default: 23 for libx264, 32 for libvpx-vp9)")
    transcode.add_argument("--workers", type=int, help="parallel processes (default: all cores)")


def _run_data(args) -> int:
    from . import data_tools

    if args.tool == "check":
        checks = data_tools.check_dataset(args.datasets, args.min_frames, args.workers, args.max_bytes)
        print(data_tools.format_checks(checks))
        if args.csv:
            data_tools.write_checks_csv(checks, args.csv)
        return int(any(c.reason is not None for c in checks))
    result = data_tools.transcode_dataset(args.source, args.out, short_side=args.short_side, gop=args.gop,
                                          encoder=args.codec, quality=args.crf, workers=args.workers)
    for path, reason, detail in result.failures:
        print(f"skipped {path}: {reason} ({detail})")
    print(f"transcoded {result.transcoded}, reused {result.reused}, skipped {len(result.failures)}; "
          f"dataset file: {result.dataset_file}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write one of our checkpoints in the official V-JEPA format")
    p.add_argument("--checkpoint", required=True, help="e.g. runs/demo/checkpoints/latest.pt")
    p.add_argument("--out", required=True, help="the official-format file to write (e.g. jepa-latest.pth.tar)")


def _run_export(args) -> int:
    from .checkpoint import export_official, load_training_state

    state = load_training_state(args.checkpoint)  # official checkpoints need no export: refused, naming the file
    print(f"wrote {export_official(state, args.out)} (official layout: module.backbone.* keys, opt, epoch)")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: per-stage step time, throughput, MFU, fast vs reference parity")
    kinds = p.add_subparsers(dest="bench", required=True)
    step = kinds.add_parser("step", help="time every stage of a training step, reference and fast side by side")
    _add_model_args(step)
    step.add_argument("--computations", default="reference,fast", help="comma-separated: reference, fast")
    step.add_argument("--backends", default="sdpa", help="comma-separated attention backends: sdpa, xformers, eager")
    step.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                      help="torch.compile the fast path's blocks: off, on (--compile alone), or both (eager "
                           "variants first, then compiled ones)")
    step.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    step.add_argument("--warmup", type=int, default=3)
    step.add_argument("--peak-tflops", type=float, help="the peak for MFU (default: measured with a large matmul)")
    step.add_argument("--no-parity", action="store_true", help="skip the fast-vs-reference parity check")
    step.add_argument("--out", default="bench/out", help="folder for step_<config>.json/.md/.png")


def _add_config_args(p) -> None:
    """--config, --set and --device, as train, bench and profile take them."""
    p.add_argument("--config", default="demo", help="a YAML path or a shipped config name (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (parsed as YAML); repeatable, e.g. --set data.batch_size=8")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")


def _add_model_args(p) -> None:
    _add_config_args(p)
    p.add_argument("--batch", type=int, help="batch size (default: the config's)")


def _bench_config(args, compiled: bool = False):
    overrides = list(args.overrides)
    if args.batch:
        overrides.append(f"data.batch_size={args.batch}")
    if compiled:
        overrides.append("model.compile=true")
    return load_config(args.config, overrides)


def _run_bench(args) -> int:
    from pathlib import Path

    from .bench import step

    cfg = _bench_config(args)
    reporter = step.Reporter(Path(args.out), f"step_{cfg.name}")
    result = step.run(cfg, computations=args.computations.split(","), backends=args.backends.split(","),
                      compile_mode=args.compile, device=args.device, steps=args.steps, warmup=args.warmup,
                      peak_tflops=args.peak_tflops, check_parity=not args.no_parity, on_variant=reporter)
    print()
    print(step.markdown(result))
    print(f"written: {reporter.out / reporter.name}.json, .md, .png")
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="torch.profiler trace of training steps with named stages")
    _add_model_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's blocks")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--memory-snapshot", action="store_true", help="also dump a CUDA memory snapshot")
    p.add_argument("--out", default="runs/profile", help="output folder")


def _run_profile(args) -> int:
    from pathlib import Path

    from .bench import profile

    written = profile.run(_bench_config(args, args.compile), Path(args.out), steps=args.steps, device=args.device,
                          memory_snapshot=args.memory_snapshot)
    print(written["table"].read_text())
    print(f"trace: {written['trace']} (open in chrome://tracing or https://ui.perfetto.dev)")
    if "memory" in written:
        print(f"memory snapshot: {written['memory']} (open in https://pytorch.org/memory_viz)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vjepa-fast", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    sub = parser.add_subparsers(dest="command")
    _add_train(sub)
    _add_data(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_profile(sub)
    _add_export(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line, before or after the command
    argv = [a for a in argv if a != "--debug"]
    args = parser.parse_args(argv or ["train"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"train": _run_train, "eval": _run_eval, "data": _run_data, "bench": _run_bench,
                "profile": _run_profile, "export": _run_export}[args.command](args)
    except EXPECTED_ERRORS as e:
        if debug:
            raise
        print(f"vjepa-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
