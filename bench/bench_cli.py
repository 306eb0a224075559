"""The CLI target: `blip2 caption` over a folder of images against the same loop written over
transformers (its processor, its model, generate, batch_decode), each as a fresh process, wall clock.

    python bench/bench_cli.py [--images 64] [--repeats 3] [--model DIR] [--dtype float32]

Both sides load the same checkpoint (default: the shipped demo model), read the same PNG files,
caption them in batches of 16 with the checkpoint's generation settings and `--max-new-tokens`,
and print one line per image; the captions must be equal. Runs alternate (ours, reference, ours,
...) and the median of each is compared; the load average is printed with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 16  # the CLI's default --batch-size


def reference_loop(args) -> None:
    """What a transformers user writes for `blip2 caption FOLDER`: prints `path: caption` lines."""
    import torch
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    processor = Blip2Processor.from_pretrained(args.model)
    model = Blip2ForConditionalGeneration.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype)).eval()
    paths = sorted(str(p) for p in Path(args.folder).iterdir() if p.suffix == ".png")
    for i in range(0, len(paths), BATCH):
        names = paths[i : i + BATCH]
        images = [Image.open(p).convert("RGB") for p in names]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            ids = model.generate(pixel_values=pixels, max_new_tokens=args.max_new_tokens)
        for name, text in zip(names, processor.batch_decode(ids, skip_special_tokens=True)):
            print(f"{name}: {text.strip()}", flush=True)


def write_images(folder: Path, n: int) -> None:
    from blip2.demo import world

    for i in range(n):
        world.render(world.sample_scene("test", i)).save(folder / f"{i:03d}.png")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str]) -> tuple[float, float, list[str]]:
    """(wall seconds, CPU seconds of the process, its output lines)."""
    env = {**os.environ, "PYTHONPATH": str(common.ROOT), "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(common.ROOT), timeout=900)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, cpu, [line for line in proc.stdout.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo model)")
    parser.add_argument("--dtype", default="float32", help="both sides (the CLI's --dtype)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--reference-loop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from blip2.demo import MODEL_DIR

        args.model = str(MODEL_DIR)
    if args.reference_loop:
        reference_loop(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_images(folder, args.images)
        ours = [sys.executable, "-m", "blip2.cli", "caption", str(folder), "--model", args.model, "--dtype", args.dtype,
                "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(BATCH), "--no-progress"]
        ref = [sys.executable, str(Path(__file__).resolve()), "--reference-loop", "--folder", str(folder),
               "--model", args.model, "--dtype", args.dtype, "--max-new-tokens", str(args.max_new_tokens)]
        times: dict[str, list[float]] = {"ours": [], "reference": []}
        cpu: dict[str, list[float]] = {"ours": [], "reference": []}
        lines: dict[str, list[str]] = {}
        for run in range(args.repeats):
            for name, cmd in (("ours", ours), ("reference", ref)):
                load = common.load_average()
                seconds, used, lines[name] = timed(cmd)
                times[name].append(seconds)
                cpu[name].append(used)
                print(f"run {run + 1} {name}: {seconds:.2f} s wall, {used:.2f} s CPU (load average {load:.2f})", flush=True)
    same = sum(a == b for a, b in zip(lines["ours"], lines["reference"]))
    _, version = common.reference()
    ours_s, ref_s = statistics.median(times["ours"]), statistics.median(times["reference"])
    ours_cpu, ref_cpu = statistics.median(cpu["ours"]), statistics.median(cpu["reference"])
    result = {"images": args.images, "dtype": args.dtype, "reference": version, "ours_s": ours_s,
              "reference_s": ref_s, "speedup": ref_s / ours_s, "ours_cpu_s": ours_cpu, "reference_cpu_s": ref_cpu, "same_captions": same,
              "lines": len(lines["ours"]), "load_end": common.load_average()}
    print(json.dumps(result))
    print(f"blip2 caption over {args.images} images ({args.dtype}): {ours_s:.2f} s vs transformers {version} loop "
          f"{ref_s:.2f} s = {ref_s / ours_s:.2f}x (medians of {args.repeats}, wall); CPU time {ours_cpu:.2f} s vs "
          f"{ref_cpu:.2f} s = {ref_cpu / ours_cpu:.2f}x; captions equal: {same} / {args.images}")


if __name__ == "__main__":
    main()
