"""Triton kernels against their eager (and, with --compile, torch.compile'd) references, with achieved bandwidth.

    python -m bench.kernels [--out bench/out] [--quick] [--compile]

For each op at ViT-L (D=1024) and ViT-H (D=1280) sizes (B=24, N=1568; context masks K=368, 112; target masks
K=760, 1120; RoPE of the context rows' q and k at 16 heads; EMA over the encoder's parameter count), the median
time (triton.testing.do_bench), the bytes the op must move divided by that time, and that as a share of a measured
device-to-device copy. Targets (docs/design.md, section 7): faster than eager and compiled, >= 70% of copy
bandwidth. The compiled references are opt-in: their cold compilations take most of a run's time. Each row is
printed, and kernels.json / kernels.md under --out rewritten, as soon as it is measured. Without CUDA only --quick
runs: tiny sizes, the kernels in the Triton interpreter, no torch.compile, wall-clock timing: a smoke test of this
script, not numbers.
"""
import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors need the interpreter

import triton  # noqa: E402

from vjepa_fast import kernels  # noqa: E402
from vjepa_fast.bench.ceilings import copy_gbps, make_timer  # noqa: E402
from vjepa_fast.bench.report import write_results  # noqa: E402

FULL = {"batch": 24, "tokens": 1568, "context_k": (368, 112), "target_k": (760, 1120), "grid": (8, 14, 14),
        "sizes": {"vit_l": {"dim": 1024, "depth": 24, "heads": 16}, "vit_h": {"dim": 1280, "depth": 32, "heads": 16}},
        "patch": 16}
QUICK = {"batch": 2, "tokens": 16, "context_k": (5, 3), "target_k": (9, 12), "grid": (1, 4, 4),
         "sizes": {"tiny_64": {"dim": 64, "depth": 1, "heads": 4}, "tiny_80": {"dim": 80, "depth": 1, "heads": 4}},
         "patch": 2}


def vit_param_shapes(dim, depth, patch, tubelet=2, mlp_ratio=4):
    """Parameter shapes of a V-JEPA ViT encoder (patch embed, pre-norm blocks, final norm): what the EMA updates."""
    hidden = dim * mlp_ratio
    block = [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
             (dim,), (dim,), (hidden, dim), (hidden,), (dim, hidden), (dim,)]
    return [(dim, 3, tubelet, patch, patch), (dim,)] + block * depth + [(dim,), (dim,)]


def _grads(out, inputs, grad_out=None):
    return torch.autograd.grad(out, inputs, grad_out)


def _sorted_masks(batch, tokens, ks, g, device):
    """One int64 [batch, k] mask of distinct, sorted token indices per k (as the mask generator makes them)."""
    return [torch.stack([torch.randperm(tokens, generator=g)[:k].sort().values for _ in range(batch)]).to(device)
            for k in ks]


def pack_cases(cfg, dim, device, compiled):
    """[(pass, bytes, {impl: fn})] for the context gather with pos-embed add (bf16), and fn() -> forward diff."""
    batch, tokens, ks = cfg["batch"], cfg["tokens"], cfg["context_k"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, dim, generator=g).to(device, torch.bfloat16)
    pos = torch.randn(tokens, dim, generator=g).to(device, torch.bfloat16)
    idx = _sorted_masks(batch, tokens, ks, g, device)
    rows = batch * sum(ks)
    grad_out = torch.randn(rows, dim, generator=g).to(device, torch.bfloat16)
    xg = x.clone().requires_grad_()
    impls = {"triton": kernels.pack_tokens, "eager": kernels.pack_tokens_reference, "compiled": compiled}
    fwd_bytes = rows * dim * 2 * 3 + rows * 8  # x row, pos row, out row (bf16); the index
    bwd_bytes = rows * dim * 2 + batch * tokens * dim * 2  # grad rows in, grad x out
    return [
        ("fwd", fwd_bytes, {k: (lambda f=f: f(x, idx, pos)) if f else None for k, f in impls.items()}),
        ("fwd+bwd", fwd_bytes + bwd_bytes,
         {k: (lambda f=f: _grads(f(xg, idx, pos)[0], xg, grad_out)) if f else None for k, f in impls.items()}),
    ], lambda: (kernels.pack_tokens(x, idx, pos)[0].float() - kernels.pack_tokens_reference(x, idx, pos)[0].float())


def loss_cases(cfg, dim, device, compiled):
    """[(pass, bytes, {impl: fn})] for the target-norm + L1 loss over the target masks (bf16 pred and target), and
    fn() -> forward diff."""
    batch, tokens, ks = cfg["batch"], cfg["tokens"], cfg["target_k"]
    g = torch.Generator().manual_seed(1)
    target = torch.randn(batch, tokens, dim, generator=g).to(device, torch.bfloat16)
    idx = _sorted_masks(batch, tokens, ks, g, device)
    rows = batch * sum(ks)
    pred = torch.randn(rows, dim, generator=g).to(device, torch.bfloat16)
    pg = pred.clone().requires_grad_()
    impls = {"triton": kernels.masked_l1_loss, "eager": kernels.masked_l1_loss_reference, "compiled": compiled}
    fwd_bytes = rows * dim * 2 * 2 + rows * 8  # pred row, target row (bf16); the index
    bwd_bytes = rows * dim * 2 * 3  # pred row, target row in, grad row out
    return [
        ("fwd", fwd_bytes, {k: (lambda f=f: f(pred, target, idx)) if f else None for k, f in impls.items()}),
        ("fwd+bwd", fwd_bytes + bwd_bytes,
         {k: (lambda f=f: _grads(f(pg, target, idx), pg)) if f else None for k, f in impls.items()}),
    ], lambda: kernels.masked_l1_loss(pred, target, idx) - kernels.masked_l1_loss_reference(pred, target, idx).float()


def rope_cases(cfg, size, device, compiled):
    """[(pass, bytes, {impl: fn})] for V-JEPA 2's 3D RoPE of the queries and keys of the context encoder's packed
    rows (both masks; bf16 qkv, one launch over q and k), and fn() -> forward diff."""
    batch, ks, (t, h, w) = cfg["batch"], cfg["context_k"], cfg["grid"]
    heads, hd = size["heads"], size["dim"] // size["heads"]
    g = torch.Generator().manual_seed(2)
    ids = torch.cat([m.reshape(-1) for m in _sorted_masks(batch, t * h * w, ks, g, device)])
    pos = kernels.grid_positions(ids, h, w)
    rows = ids.numel()
    qkv = torch.randn(rows, 3 * heads, hd, generator=g).to(device, torch.bfloat16)
    qk = qkv[:, :2 * heads]  # the q and k heads of the packed qkv matrix, a strided view
    qkg = qk.detach().clone().requires_grad_()
    grad_out = torch.randn(rows, 2 * heads, hd, generator=g).to(device, torch.bfloat16)
    impls = {"triton": kernels.rope, "eager": kernels.rope_reference, "compiled": compiled}
    fwd_bytes = rows * (2 * size["dim"] * 2 * 2 + 3 * 4)  # q and k rows in and out (bf16); the positions
    bwd_bytes = rows * 2 * size["dim"] * 2 * 2  # grad rows in and out
    return [
        ("fwd", fwd_bytes, {k: (lambda f=f: f(qk, pos)) if f else None for k, f in impls.items()}),
        ("fwd+bwd", fwd_bytes + bwd_bytes,
         {k: (lambda f=f: _grads(f(qkg, pos), qkg, grad_out)) if f else None for k, f in impls.items()}),
    ], lambda: kernels.rope(qk, pos).float() - kernels.rope_reference(qk, pos).float()


def ema_cases(cfg, size, device, compiled):
    """[(pass, bytes, {impl: fn})] for the EMA of a ViT's fp32 parameters (Triton over one flat buffer, the
    references over the per-parameter tensors, views of the same buffer), and fn() -> update diff."""
    shapes = vit_param_shapes(size["dim"], size["depth"], cfg["patch"])
    numels = [torch.Size(s).numel() for s in shapes]
    target = torch.empty(sum(numels), device=device).normal_()
    source = torch.empty_like(target).normal_()
    views = lambda buf: [v.view(s) for v, s in zip(buf.split(numels), shapes)]  # noqa: E731
    t_views, s_views = views(target), views(source)
    momentum = torch.tensor(0.998, dtype=torch.float64, device=device)

    def parity():
        fast, ref = target.clone(), target.clone()
        kernels.ema_(fast, source, momentum)
        kernels.ema_reference_(ref, source, 0.998)
        return fast - ref

    return [("update", 3 * target.numel() * 4, {
        "triton": lambda: kernels.ema_(target, source, momentum),
        "eager": lambda: kernels.ema_reference_(t_views, s_views, 0.998),
        "compiled": (lambda: compiled(t_views, s_views, 0.998)) if compiled else None,
    })], parity


def run(quick=False, use_compile=False, on_row=None):
    """Measure every (size, op, pass); `on_row(report)` is called after each row with the report so far."""
    cfg = QUICK if quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = make_timer(quick)
    use_compile = use_compile and device.type == "cuda"
    references = {"pack_tokens": kernels.pack_tokens_reference, "masked_l1_loss": kernels.masked_l1_loss_reference,
                  "rope": kernels.rope_reference, "ema": kernels.ema_reference_}
    compiled = {op: torch.compile(fn, dynamic=False) if use_compile else None for op, fn in references.items()}
    copy = copy_gbps(timer, device, (4 << 20) if quick else (1 << 30))
    results = []
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__, "triton": triton.__version__, "quick": quick,
        "batch": cfg["batch"], "tokens": cfg["tokens"], "context_k": cfg["context_k"], "target_k": cfg["target_k"],
        "copy_gbps": copy, "results": results,
    }
    for size_name, size in cfg["sizes"].items():
        for op, (cases, diff) in {
            "pack_tokens": pack_cases(cfg, size["dim"], device, compiled["pack_tokens"]),
            "masked_l1_loss": loss_cases(cfg, size["dim"], device, compiled["masked_l1_loss"]),
            "rope": rope_cases(cfg, size, device, compiled["rope"]),
            "ema": ema_cases(cfg, size, device, compiled["ema"]),
        }.items():
            max_diff = diff().abs().max().item()
            for pass_, nbytes, fns in cases:
                ms = {k: timer(fn) if fn else None for k, fn in fns.items()}
                gbps = {k: nbytes / (t * 1e-3) / 1e9 if t else None for k, t in ms.items()}
                results.append({
                    "op": op, "size": size_name, "dim": size["dim"], "pass": pass_, "bytes": nbytes, "ms": ms,
                    "gbps": gbps, "pct_of_copy": 100 * gbps["triton"] / copy,
                    "speedup_vs_eager": ms["eager"] / ms["triton"],
                    "speedup_vs_compiled": ms["compiled"] / ms["triton"] if ms["compiled"] else None,
                    "max_abs_diff_vs_eager": max_diff,
                })
                if on_row is not None:
                    on_row(report)
    return report


def header(report):
    return (f"Kernels on {report['device']} (torch {report['torch']}, triton {report['triton']}); "
            f"B={report['batch']}, N={report['tokens']}, context K={report['context_k']}, "
            f"target K={report['target_k']}; copy bandwidth {report['copy_gbps']:.0f} GB/s")


COLUMNS = ("| op | size | pass | triton ms | eager ms | compiled ms | triton GB/s | % of copy | x eager | x compiled "
           "| max abs diff |")


def row(r):
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    cells = [r["op"], r["size"], r["pass"], fmt(r["ms"]["triton"], ".4f"), fmt(r["ms"]["eager"], ".4f"),
             fmt(r["ms"]["compiled"], ".4f"), fmt(r["gbps"]["triton"], ".0f"), fmt(r["pct_of_copy"], ".0f"),
             fmt(r["speedup_vs_eager"], ".2f"), fmt(r["speedup_vs_compiled"], ".2f"),
             fmt(r["max_abs_diff_vs_eager"], ".2e")]
    return "| " + " | ".join(cells) + " |"


def markdown(report):
    lines = [header(report), "", COLUMNS, "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(r) for r in report["results"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the only mode without CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="also time the torch.compile'd references (cold compilations; never without CUDA)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() and not a.quick:
        raise SystemExit("bench.kernels: the full-size benchmark needs a CUDA GPU; without one only --quick runs "
                         "(tiny sizes in the Triton interpreter, a smoke test)")
    printed = []

    def on_row(report):
        if not printed:
            print(header(report), COLUMNS, sep="\n", flush=True)
        for r in report["results"][len(printed):]:
            print(row(r), flush=True)
            printed.append(r)
        write_results(a.out, "kernels", report, markdown(report))

    report = run(a.quick, a.compile, on_row)
    print(f"written {a.out}/kernels.json and kernels.md")
    return report


if __name__ == "__main__":
    main()
