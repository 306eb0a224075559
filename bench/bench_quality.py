"""How many captions change when ours runs in bfloat16, unpacked, or with an int8 / int4 language
model, against float32 greedy (each as `from_pretrained` gives it), on the shipped demo model (trained weights: random weights
flip too easily to judge by) and the demo world's test scenes.

    python bench/bench_quality.py [--images 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def scenes(n: int):
    from blip2.demo import world

    return [world.sample_scene("test", i) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from blip2 import Blip2ForConditionalGeneration, Blip2Processor
    from blip2.demo import MODEL_DIR, world

    processor = Blip2Processor.from_pretrained(MODEL_DIR)
    shown = scenes(args.images)
    pixels = processor(images=[world.render(s) for s in shown], return_tensors="pt")["pixel_values"]
    variants = {  # name: (dtype, from_pretrained's quantize, prepacked)
        "fp32": (torch.float32, None, True),
        "fp32 unpacked": (torch.float32, None, False),
        "bf16": (torch.bfloat16, None, True),
        "bf16 unpacked": (torch.bfloat16, None, False),
        "bf16 int8 LM": (torch.bfloat16, "int8", True),
        "bf16 int4 LM": (torch.bfloat16, "int4", True),
    }
    captions, seconds = {}, {}
    for name, (dtype, quantize, pack) in variants.items():
        model = Blip2ForConditionalGeneration.from_pretrained(MODEL_DIR, torch_dtype=dtype, quantize=quantize)
        model.auto_pack = pack
        out, start = [], time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(pixels), args.batch):
                ids = model.generate(pixels[i : i + args.batch].to(dtype), max_new_tokens=30)
                out += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
        captions[name], seconds[name] = out, time.perf_counter() - start
    transformers, version = common.reference()
    if transformers is not None:  # the reference's own bf16 flips, for scale
        for name, dtype in (("reference fp32", torch.float32), ("reference bf16", torch.bfloat16)):
            model = common.load_reference(MODEL_DIR, dtype)
            out, start = [], time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(pixels), args.batch):
                    ids = model.generate(pixel_values=pixels[i : i + args.batch].to(dtype), max_new_tokens=30)
                    out += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
            captions[f"{name} ({version})"], seconds[f"{name} ({version})"] = out, time.perf_counter() - start
    base = captions["fp32"]
    correct = lambda caps: sum(world.caption_correct(c, s) for c, s in zip(caps, shown))
    print(f"demo model, {len(base)} test scenes, greedy, up to 30 new tokens; load average {common.load_average():.2f}")
    print("| variant | captions differing from ours fp32 | correct captions | seconds |")
    print("|---|---|---|---|")
    result = {}
    for name, caps in captions.items():
        diff = sum(a != b for a, b in zip(caps, base))
        result[name] = {"differ": diff, "correct": correct(caps), "seconds": seconds[name]}
        print(f"| {name} | {diff} / {len(base)} | {correct(caps)} / {len(base)} | {seconds[name]:.1f} |")
    same_tokens = sum(a == b for a, b in zip(captions["bf16"], captions["bf16 int4 LM"]))
    print(f"bf16 int4 LM captions equal to bf16's: {same_tokens} / {len(base)}")
    examples = [(a, b) for a, b in zip(base, captions["bf16"]) if a != b][:3]
    for a, b in examples:
        print(f"  fp32: {a!r}\n  bf16: {b!r}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
