"""The GPU check's final tables, from the result files it leaves: ceilings, the official step beside ours, every
step variant, the kernels.

    python -m bench.summary [--main vitl16] OUT

Prints `official ms/iter`, `ours ms/iter` (the fastest variant that ran, fast path or not) and their ratio, each
with its MFU, then the full tables of step_<config>.json, kernels.json and ceilings.json as they were measured.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import kernels, official
from vjepa_fast.bench import ceilings, step


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fastest(result: dict) -> dict | None:
    """The variant of a step result with the lowest ms/iter, among those that ran."""
    ran = [v for v in result["variants"] if v["error"] is None]
    return min(ran, key=lambda v: v["step_ms"]) if ran else None


def comparison(off: dict | None, ours: dict | None) -> str:
    """The official-vs-ours table of one config (either side may be missing: a stage that failed or ran out of time)."""
    lines = ["| step | ms/iter | clips/s | MFU | peak GiB |", "|---|---|---|---|---|"]
    if off:
        lines.append(f"| official | {off['step_ms']:.1f} | {off['clips_per_s']:.1f} | {off['mfu']:.1%} | "
                     f"{'-' if off['peak_mem_gb'] is None else format(off['peak_mem_gb'], '.1f')} |")
    best = fastest(ours) if ours else None
    for v in (ours or {"variants": []})["variants"]:
        if v["error"] is None:
            lines.append(f"| ours: {v['label']} ({v['backend']}) | {v['step_ms']:.1f} | {v['clips_per_s']:.1f} | "
                         f"{v['mfu']:.1%} | {'-' if v['peak_mem_gb'] is None else format(v['peak_mem_gb'], '.1f')} |")
    text = "\n".join(lines) + "\n\n"
    off_ms = f"{off['step_ms']:.1f} (MFU {off['mfu']:.1%})" if off else "not measured"
    ours_ms = f"{best['step_ms']:.1f} (MFU {best['mfu']:.1%}; {best['label']}, {best['backend']})" if best \
        else "not measured"
    ratio = f"{off['step_ms'] / best['step_ms']:.2f}x" if off and best else "n/a"
    return text + f"official ms/iter: {off_ms}\nours ms/iter: {ours_ms}\nratio (official / ours): {ratio}\n"


def summary(out: Path, main_config: str = "vitl16") -> str:
    """The tables; the official step is compared with step_<main_config>.json (else with whichever step ran)."""
    out = Path(out)
    parts = []
    ceil = _load(out / "ceilings.json")
    parts.append(ceilings.markdown(ceil) if ceil else "Ceilings: not measured\n")
    off = _load(out / "official.json")
    ours = {p.stem.removeprefix("step_"): _load(p) for p in sorted(out.glob("step_*.json"))}
    if main_config not in ours:
        main_config = off["config"] if off else next(iter(ours), main_config)
    parts.append(f"### Official vs ours: {main_config}\n\n" + comparison(off, ours.get(main_config)))
    if off:
        parts.append(official.markdown(off))
    for name, result in ours.items():
        if result:
            parts.append(step.markdown(result))
    kern = _load(out / "kernels.json")
    parts.append(kernels.markdown(kern) if kern else "Kernels: not measured\n")
    return "\n".join(parts)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the folder the GPU check wrote")
    p.add_argument("--main", default="vitl16", help="the config whose step is compared with the official one")
    a = p.parse_args(argv)
    text = summary(Path(a.out), a.main)
    print(text)
    return text


if __name__ == "__main__":
    main()
