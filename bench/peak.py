"""This machine's measured peaks: fp32 / bf16 matmul GFLOP/s and memory bandwidth.

The matmul peak is the best of PyTorch's default kernel (`F.linear`: MKL for fp32, oneDNN for
bf16) and oneDNN with the weight prepacked, at the default (all) threads, over several shapes.

The other benchmarks divide by these figures to say how close ours gets to the hardware.
Runs under any interpreter with torch; prints a table, or JSON with --json.

    python bench/peak.py [--json] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

# Square GEMMs and the shapes of the ViT-B/14 encoder at batch 8 (8 * 257 tokens).
GEMM_SHAPES = [(2048, 2048, 2048), (4096, 4096, 4096), (2056, 768, 2304), (2056, 768, 3072), (2056, 3072, 768)]


def best_time(fn, seconds: float, warmup: int = 2) -> float:
    """The fastest of as many calls as fit in `seconds` (the least disturbed by other load)."""
    for _ in range(warmup):
        fn()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return best


def matmul_gflops(dtype: torch.dtype, seconds: float) -> dict[str, dict[str, float]]:
    """GFLOP/s of (M, K) @ (K, N) for each shape in GEMM_SHAPES (nn.Linear's layout: weight is (N, K)),
    per kernel: "default" (F.linear) and, where PyTorch has oneDNN, "onednn packed"."""
    packed = hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()
    out = {}
    for M, K, N in GEMM_SHAPES:
        a = torch.randn(M, K, dtype=dtype)
        w = torch.randn(N, K, dtype=dtype)
        flop = 2 * M * K * N / 1e9
        out[f"{M}x{K}x{N}"] = {"default": flop / best_time(lambda: torch.nn.functional.linear(a, w), seconds)}
        if packed:
            pw = torch.ops.mkldnn._reorder_linear_weight(w, M)
            dt = best_time(lambda: torch.ops.mkldnn._linear_pointwise(a, pw, None, "none", [], ""), seconds)
            out[f"{M}x{K}x{N}"]["onednn packed"] = flop / dt
    return out


def best(per_shape: dict[str, dict[str, float]]) -> tuple[float, str]:
    """(GFLOP/s, "kernel at shape") of the fastest run."""
    return max((v, f"{kernel} at {shape}") for shape, kernels in per_shape.items() for kernel, v in kernels.items())


def bandwidth_gbs(seconds: float, nbytes: int = 1 << 30) -> dict[str, float]:
    """Read (a sum) and copy (read + write) bandwidth over buffers far larger than the caches."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    read = best_time(lambda: src.sum(), seconds)
    copy = best_time(lambda: dst.copy_(src), seconds)
    # A bf16 matrix-vector product: what decoding at batch 1 does with every weight.
    w = torch.ones(16384, nbytes // 2 // 16384, dtype=torch.bfloat16)
    x = torch.ones(1, w.shape[1], dtype=torch.bfloat16)
    gemv = best_time(lambda: torch.nn.functional.linear(x, w), seconds)
    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available():
        pw = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        gemv = min(gemv, best_time(lambda: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], ""), seconds))
    return {"read": nbytes / read / 1e9, "copy": 2 * nbytes / copy / 1e9, "bf16_gemv": nbytes / gemv / 1e9}


def first_touch_gbs(nbytes: int = 1 << 30, tries: int = 3) -> float:
    """GB/s of writing memory the process has just allocated: the kernel hands out (and zeroes)
    each page on first touch, which bounds how fast any loader can fill a model."""
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict:
    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "bf16": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "load": open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?",
    }


def measure(seconds: float = 1.0) -> dict:
    fp32 = matmul_gflops(torch.float32, seconds)
    bf16 = matmul_gflops(torch.bfloat16, seconds)
    bw = bandwidth_gbs(seconds)
    return {
        "machine": machine(),
        "fp32_gflops": best(fp32)[0],
        "bf16_gflops": best(bf16)[0],
        "fp32_best": best(fp32)[1],
        "bf16_best": best(bf16)[1],
        "read_gbs": bw["read"],
        "bandwidth_gbs": max(bw.values()),  # the best way found to stream memory
        "first_touch_gbs": first_touch_gbs(),
        "detail": {"fp32": fp32, "bf16": bf16, "bandwidth": bw},
    }


def cached(path: str | None = None, seconds: float = 1.0) -> dict:
    """The peaks, measured once per machine and kept in a small JSON file beside the checkpoints."""
    path = path or os.path.join(os.environ.get("BLIP2_BENCH_CACHE", os.path.expanduser("~/.cache/blip2-bench")), "peak.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = measure(seconds)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--save", metavar="PATH", help="also write the result here (the cache the other benches read)")
    args = parser.parse_args()
    result = measure(args.seconds)
    if args.save:
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        with open(args.save, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m = result["machine"]
    print(f"{m['cpu']}, {m['threads']} threads, bf16 flags {m['bf16']}, {m['mem_gib']} GiB, torch {m['torch']}, load {m['load']}")
    for dtype in ("fp32", "bf16"):
        shapes = "  ".join(f"{k}: " + "/".join(f"{v:.0f}" for v in kernels.values())
                           for k, kernels in result["detail"][dtype].items())
        print(f"{dtype} matmul GFLOP/s  peak {result[f'{dtype}_gflops']:.0f} ({result[f'{dtype}_best']})   "
              f"[default/onednn packed per shape: {shapes}]")
    bw = result["detail"]["bandwidth"]
    print(f"memory GB/s  read {bw['read']:.1f}  copy {bw['copy']:.1f}  bf16 gemv {bw['bf16_gemv']:.1f}  "
          f"first touch of new memory {result['first_touch_gbs']:.1f}")


if __name__ == "__main__":
    main()
