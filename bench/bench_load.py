"""Workload c: loading the full-size blip2-opt-2.7b checkpoint (random float16 weights saved
by the reference, bench/make_full_checkpoint.py) as bfloat16 and as float32: time to the
first token and peak resident memory, ours against transformers.

    python bench/bench_load.py                          # ours and the newest reference, bf16 and fp32
    python bench/bench_load.py --dtypes bf16 --refs newest 4.37.2
    python bench/bench_load.py --load-only --touch      # the load alone, against its first-touch bound

Every measurement runs in a fresh process (peak RSS is per process: VmHWM, which counts
mapped file pages too). Before each, the checkpoint files are read once so that every run
finds them in the page cache. Time to first token runs from the `from_pretrained` call to the
first generated token of one image and a short prompt (`generate(max_new_tokens=1)`);
imports are timed apart. The model's size is the bytes of its parameters and buffers.
Each configuration runs --repeats times, ours and the references taking turns; each figure is the
median of its runs. The first-touch bound is the model's bytes over the rate at which this machine
hands out and fills new memory (bench/peak.py's first_touch_gbs, measured again after the runs):
no loader that fills fresh memory page by page beats it. On a virtual machine that rate depends on
what the memory did before (pages the host must hand out again are slow), so --touch also runs,
in turns with the loaders, a fresh process that only allocates and writes the model's tensors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = [45641, 35, 99, 16, 11, 5, 2170, 116, 31652, 35]  # "Question: what is in the picture? Answer:"


def touch_worker(args) -> dict:
    """The bound in the loaders' own conditions: a fresh process allocating a tensor of the requested
    dtype for every tensor of the checkpoint and writing it once (first touch), reading nothing."""
    import json as json_

    dtype = DTYPES[args.dtype]
    sizes = []
    for path in sorted(common.FULL_DIR.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json_.loads(f.read(int.from_bytes(f.read(8), "little")))
        sizes += [(end - begin) // 2 for key, e in header.items() if key != "__metadata__"
                  for begin, end in [e["data_offsets"]]]  # float16 in the file: 2 bytes each
    start = time.perf_counter()
    tensors = [torch.empty(n, dtype=dtype).fill_(1) for n in sizes]
    took = time.perf_counter() - start
    size = sum(t.numel() * t.element_size() for t in tensors)
    rss = common.peak_rss_bytes()
    return {"impl": "touch", "reference": "-", "dtype": args.dtype, "import_s": 0.0, "load_s": took,
            "first_token_compute_s": 0.0, "ttft_s": took, "load_peak_rss_gb": rss / 1e9, "peak_rss_gb": rss / 1e9,
            "model_gb": size / 1e9, "rss_over_model": rss / size, "token": 0, "load": common.load_average(),
            "clock": "wall"}


def worker(args) -> dict:
    if args.impl == "touch":
        return touch_worker(args)
    common.set_clock(args.clock)
    clock = common.CLOCK
    t0 = clock()
    dtype = DTYPES[args.dtype]
    if args.impl == "ours":
        import blip2  # noqa: F401
    else:
        common.reference()
    t_import = clock() - t0
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 224, 224)
    image_tokens = args.impl == "ours" or common.ref_major() >= 5
    ids = torch.tensor([common.prompt_ids(PROMPT, image_tokens=image_tokens)])
    start = clock()
    if args.impl == "ours":
        model = common.load_ours(common.FULL_DIR, dtype)
    else:
        model = common.load_reference(common.FULL_DIR, dtype)
    loaded = clock()
    size = common.model_bytes(model)  # before generating: asking a packed model for its parameters unpacks it
    load_rss = common.peak_rss_bytes()
    out = torch.zeros(1, 1, dtype=torch.long)
    if not args.load_only:
        with torch.inference_mode():
            out = model.generate(pixel_values=pixels.to(dtype), input_ids=ids, max_new_tokens=1)
    first = clock()
    rss = common.peak_rss_bytes()
    return {
        "impl": args.impl, "reference": common.reference()[1], "dtype": args.dtype,
        "import_s": t_import, "load_s": loaded - start, "first_token_compute_s": first - loaded,
        "ttft_s": first - start, "load_peak_rss_gb": load_rss / 1e9, "peak_rss_gb": rss / 1e9, "model_gb": size / 1e9, "rss_over_model": rss / size,
        "token": int(out[0, -1]), "load": common.load_average(), "clock": args.clock,
    }


def median_row(runs: list[dict]) -> dict:
    """Each number the median of the runs (the middle run for anything else)."""
    row = dict(runs[len(runs) // 2])
    for key, value in row.items():
        if isinstance(value, float):
            row[key] = statistics.median(r[key] for r in runs)
    row["runs"] = len(runs)
    return row


def warm_page_cache() -> None:
    for path in sorted(common.FULL_DIR.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--impl", choices=["ours", "ref", "touch"], default="ours")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--refs", nargs="+", default=["newest"], help="environments (names in $BLIP2_BENCH_PYTHONS)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: one thread, this process's CPU time (for a machine others are using)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration; medians count")
    parser.add_argument("--load-only", action="store_true", help="time the load alone (no first token)")
    parser.add_argument("--touch", action="store_true",
                        help="also time, in turns, a fresh process that only allocates and writes the model's tensors")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (common.FULL_DIR / "config.json").is_file():
        sys.exit(f"{common.FULL_DIR} is missing: run python bench/make_full_checkpoint.py")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    envs = common.pythons()
    here = sys.executable
    rows = []
    for dtype in args.dtypes:
        runs = [("ours", here)] + [("ref", envs[name]) for name in args.refs if name in envs]
        runs += [("touch", here)] * args.touch
        runs_of: dict[str, list[dict]] = {}
        for _ in range(args.repeats):  # taking turns, so a burst of other load hits all alike
            for impl, python in runs:
                warm_page_cache()
                print(f"{impl} {dtype} under {python} (load {common.load_average():.2f}) ...", flush=True)
                row = common.run_worker(python, Path(__file__), ["--impl", impl, "--dtype", dtype, "--clock", args.clock]
                                       + ["--load-only"] * args.load_only)
                print("  ", json.dumps(row), flush=True)
                runs_of.setdefault(f"{impl} {python}", []).append(row)
        rows += [median_row(r) for r in runs_of.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
    print()
    print(f"clock: {args.clock}{' (CPU seconds, one thread)' if args.clock == 'cpu' else ''}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peak

    cached = common.peaks().get("first_touch_gbs")
    touch = peak.first_touch_gbs()  # now, in the same conditions as the runs (free memory, page cache)
    print(f"medians of {args.repeats} runs taken in turns; first-touch rate {touch:.2f} GB/s measured now by "
          f"bench/peak.py's first_touch_gbs ({cached or float('nan'):.2f} GB/s in the cached peak.json)")
    print("| impl | dtype | load s | x first-touch bound | first token compute s | time to first token s | "
          "peak RSS GB (after load) | model GB | RSS / model | ours TTFT ratio | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ours = {r["dtype"]: r for r in rows if r["impl"] == "ours"}
    for r in rows:
        name = {"ours": "ours", "touch": "first touch alone"}.get(r["impl"], f"transformers {r['reference']}")
        ratio = f"{ours[r['dtype']]['ttft_s'] / r['ttft_s']:.2f}x" if r["impl"] == "ref" and r["dtype"] in ours else ""
        bound = f"{r['load_s'] / (r['model_gb'] / touch):.2f}x" if touch else "-"
        print(f"| {name} | {r['dtype']} | {r['load_s']:.2f} | {bound} | {r['first_token_compute_s']:.1f} | "
              f"{r['ttft_s']:.1f} | {r['peak_rss_gb']:.2f} ({r['load_peak_rss_gb']:.2f}) | {r['model_gb']:.2f} | "
              f"{r['rss_over_model']:.3f} | {ratio} | {r['load']:.2f} |")
    alone = {r["dtype"]: r["load_s"] for r in rows if r["impl"] == "touch"}
    for r in rows:
        if r["impl"] != "touch" and r["dtype"] in alone:
            name = "ours" if r["impl"] == "ours" else f"transformers {r['reference']}"
            print(f"{name} {r['dtype']}: {r['load_s'] / alone[r['dtype']]:.2f}x the first touch alone in the same turns")


if __name__ == "__main__":
    main()
