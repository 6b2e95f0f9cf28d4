"""The two ceilings every other number is read against: a large matmul's TFLOP/s in the compute dtype (the MFU
peak) and a device-to-device copy's GB/s (the kernels' bandwidth ceiling), both on random data.

    python -m bench.ceilings [--out bench/out]

On CUDA: an 8192^3 bf16 matmul and a 1 GiB copy (bytes read + written), medians of triton.testing.do_bench. On the
CPU (a smoke test, not a number to report): a 1024^3 fp32 matmul and a 64 MiB copy, wall-clock medians.
Writes ceilings.json under --out.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .report import write_results


def make_timer(quick: bool = False):
    """Median milliseconds of fn(): do_bench on CUDA, a few wall-clock runs on CPU."""
    if torch.cuda.is_available():
        import triton

        return lambda fn: triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 200,
                                                  return_mode="median")

    def wall(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    return wall


def matmul_size(device: torch.device) -> int:
    """The side of the square matmul that measures the peak: 8192 on CUDA, 1024 on a CPU."""
    return 8192 if device.type == "cuda" else 1024


def matmul_tflops(device: torch.device, dtype: torch.dtype, timer=None) -> float:
    """Achieved TFLOP/s of a matmul_size(device) square matmul on random data."""
    timer = timer or make_timer()
    n = matmul_size(device)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    return 2 * n ** 3 / (timer(lambda: a @ b) * 1e-3) / 1e12


def copy_gbps(timer, device: torch.device, nbytes: int) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written) of an nbytes buffer."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (timer(lambda: dst.copy_(src)) * 1e-3) / 1e9


def measure(device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = make_timer()
    nbytes = (1 << 30) if cuda else (64 << 20)
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_n": matmul_size(device),
        "matmul_tflops": matmul_tflops(device, dtype, timer),
        "copy_bytes": nbytes,
        "copy_gbps": copy_gbps(timer, device, nbytes),
    }


def markdown(c: dict) -> str:
    return (f"Ceilings on {c['device']} (torch {c['torch']}): {c['matmul_dtype']} {c['matmul_n']}^3 matmul "
            f"{c['matmul_tflops']:.1f} TFLOP/s; device copy of {c['copy_bytes'] >> 20} MiB {c['copy_gbps']:.0f} GB/s "
            f"(read + write)\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out")
    a = p.parse_args(argv)
    result = measure()
    write_results(a.out, "ceilings", result, markdown(result))
    print(markdown(result), end="")
    return result


if __name__ == "__main__":
    main()
