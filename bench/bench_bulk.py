"""Bulk captioning: images/s of `blip2 caption SHARDS --output DIR` over 4 WebDataset shards, against
the same model's in-process batch rate (the same images already decoded, `generate` on batches, the
better of torch's default threads and one fewer), in one process. The ratio is what reading tars, decoding images and writing shard files cost.

    python bench/bench_bulk.py                       # 4 shards x 32 images, batch 16, 10 new tokens
    python bench/bench_bulk.py --per-shard 500       # the issue's size

Both sides use the demo's BLIP-2 model in the dtype `blip2 caption` picks (--dtype auto), and each
figure is the best of --repeats passes (the in-process rate is the best the command could reach).

Prints the load average: on a shared machine the figures are under that load.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from blip2.cli import main as cli_main
from blip2.commands import Loaded, batches, load_pixels, Failures
from blip2.demo import MODEL_DIR, world
from blip2.hf_compat import Blip2ForConditionalGeneration, fast_dtype
from blip2.processing import Blip2Processor


def write_shards(folder: Path, shards: int, per_shard: int) -> list[bytes]:
    """`shards` tars of `per_shard` PNGs in the img2dataset layout, every image a different scene of the
    demo world's test split (repeated images would let a cache flatter either side)."""
    images = []
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for n in range(per_shard):
                buffer = io.BytesIO()
                world.render(world.sample_scene("test", s * per_shard + n)).save(buffer, format="PNG")
                data = buffer.getvalue()
                images.append(data)
                info = tarfile.TarInfo(f"{s:05d}{n:04d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return images


def in_process_rate(images: list[bytes], total: int, batch: int, tokens: int, dtype: torch.dtype,
                    repeats: int) -> tuple[float, dict[int, float]]:
    """Images/s of generate alone on pre-decoded batches (the best the CLI could do), the same model
    (the demo's BLIP-2 model; the command is given it with --model); the best of `repeats` passes, at
    torch's default threads and at one fewer (what the command may run it with): the best of both,
    and each."""
    model = Blip2ForConditionalGeneration.from_pretrained(str(MODEL_DIR), torch_dtype=dtype)
    processor = Blip2Processor.from_pretrained(str(MODEL_DIR))
    m = Loaded(model, processor, torch.device("cpu"), dtype)
    _, pixels = load_pixels(list(enumerate(images)), processor.image_processor, Failures())
    chunks = [torch.stack(c).to(dtype) for c in batches(pixels, batch)]
    default = torch.get_num_threads()
    rates = {}
    with torch.inference_mode():
        for threads in sorted({default, max(1, default - 1)}, reverse=True):
            torch.set_num_threads(threads)
            m.model.generate(pixel_values=chunks[0], max_new_tokens=tokens)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                for chunk in chunks:
                    m.model.generate(pixel_values=chunk, max_new_tokens=tokens)
                best = min(best, time.perf_counter() - started)
            rates[threads] = total / best
    torch.set_num_threads(default)
    return max(rates.values()), rates


def cli_rate(shard_dir: Path, out: Path, total: int, batch: int, tokens: int, dtype: torch.dtype,
             workers: str) -> float:
    started = time.perf_counter()
    extra = [] if workers == "default" else ["--num-workers", workers]
    code = cli_main(["caption", str(shard_dir), "--model", str(MODEL_DIR), "--output", str(out), "--batch-size", str(batch),
                     "--max-new-tokens", str(tokens), "--no-progress", "--dtype", str(dtype).removeprefix("torch.")]
                    + extra)
    seconds = time.perf_counter() - started
    assert code == 0, f"blip2 caption exited with {code}"
    rows = sum(len(p.read_text().splitlines()) for p in out.glob("*.jsonl"))
    assert rows == total, f"{rows} rows for {total} images"
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="each side's best of this many passes")
    parser.add_argument("--num-workers", nargs="+", default=["default"],
                        help="the command's --num-workers, each measured in turn (default: its own default)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="both sides (auto: what `blip2 caption` picks on this machine)")
    args = parser.parse_args()
    dtype = fast_dtype("cpu") if args.dtype == "auto" else getattr(torch, args.dtype)
    total = args.shards * args.per_shard
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
          f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir, out = Path(tmp) / "shards", Path(tmp) / "out"
        shard_dir.mkdir()
        images = write_shards(shard_dir, args.shards, args.per_shard)
        batch_rate, by_threads = in_process_rate(images, total, args.batch_size, args.max_new_tokens, dtype, args.repeats)
        bulk_rates = {w: max(cli_rate(shard_dir, out / f"{w}-{n}", total, args.batch_size, args.max_new_tokens, dtype, w)
                             for n in range(args.repeats)) for w in args.num_workers}
    print(f"{args.shards} shards x {args.per_shard} images, batch {args.batch_size}, {args.max_new_tokens} new tokens, {dtype}")
    print(f"in-process generate on decoded batches: {batch_rate:.1f} images/s (best of {args.repeats} passes; "
          + ", ".join(f"{t} threads {r:.1f}" for t, r in by_threads.items()) + ")")
    for workers, rate in bulk_rates.items():
        print(f"blip2 caption --output, --num-workers {workers} (whole command, model load included):  {rate:.1f} "
              f"images/s (best of {args.repeats} runs)  ratio {rate / batch_rate:.2f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (figures are under this load)")


if __name__ == "__main__":
    main()
