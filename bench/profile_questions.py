"""Where row b's time goes: one image, five questions, 10 tokens each (bench_caption's workload b),
ours only, split into image encoder, Q-Former + projection, prefill and decode steps.

    python bench/profile_questions.py [--dtype fp32|bf16] [--repeats 7]

Each part is the median of --repeats wall-clock runs at default threads; the load average is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_caption  # noqa: E402
import common  # noqa: E402
from blip2.generation import GenerationConfig  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(bench_caption.DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtype = bench_caption.DTYPES[args.dtype]
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 224, 224, dtype=dtype)
    model = common.load_ours(common.SMALL_DIR, dtype)
    ids, mask = common.left_pad(bench_caption.question_prompts(image_tokens=True))
    config = GenerationConfig(max_new_tokens=10, min_new_tokens=10, bos_token_id=2)
    tokens = torch.zeros(ids.shape[0], dtype=torch.long)

    def primed():
        stepper, _ = model.stepper(pixels, ids, mask, config)
        stepper.prefill()
        return stepper

    def primed_and_stepped():
        stepper = primed()
        for _ in range(9):  # the first of the 10 tokens comes from the prefill
            stepper.step(tokens)

    r = args.repeats
    with torch.inference_mode():
        total = median_time(lambda: model.generate(pixels, ids, mask, max_new_tokens=10, min_new_tokens=10), r)
        vision = median_time(lambda: model.vision_model(pixels), r)
        image = model.vision_model(pixels).last_hidden_state
        qformer = median_time(lambda: model.language_inputs_from_image(image), r)
        to_prefill = median_time(primed, r)
        step = (median_time(primed_and_stepped, r) - to_prefill) / 9
    print(f"{args.dtype}, {torch.get_num_threads()} threads, load {common.load_average():.2f}: generate {total:.3f} s = "
          f"image encoder {vision:.3f} + Q-Former and projection {qformer:.3f} + prefill {to_prefill - vision - qformer:.3f} "
          f"+ 9 decode steps x {step * 1e3:.1f} ms ({9 * step:.3f})")


if __name__ == "__main__":
    main()
