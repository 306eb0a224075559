"""Batched VQA on the shipped demo model: how many rows of a batch answer as they would alone.

Batches of six (image, question) pairs, each question different, as a new user would send them.
"before" is transformers 4.37.2 with the processor's old default (the tokenizer file's right
padding), which is what this project did too; then ours with the processor's default (left for
OPT), ours given right-padded prompts (re-laid to the left inside `generate`), and ours in
bfloat16 against its own bfloat16 solo runs, greedy and with the paper's VQA beam search.

    python bench/bench_rows.py [--batches 20]      # writes bench/results/bench_rows_<date>.md
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blip2 import Blip2ForConditionalGeneration, Blip2Processor  # noqa: E402
from blip2.demo import MODEL_DIR, world  # noqa: E402

TEMPLATE = "Question: {} Answer:"
GREEDY = dict(max_new_tokens=10)
BEAM = dict(max_new_tokens=10, num_beams=5, length_penalty=-1.0)  # the paper's VQA settings


def pairs(batches: int, size: int = 6) -> list[list[tuple]]:
    """Batches of (image, question), the questions of a batch all different."""
    rng = random.Random(0)
    out, index = [], 0
    while len(out) < batches:
        batch = []
        while len(batch) < size:
            scene = world.sample_scene("test", index)
            index += 1
            qa = rng.choice(world.questions(scene, rng))
            if all(qa.question != q for _, q in batch):
                batch.append((world.render(scene), qa.question))
        out.append(batch)
    return out


def answers(model, processor, batch, side: str | None, dtype, settings) -> list[list[int]]:
    """Token ids of each row (up to its first padding), batched."""
    images, questions = zip(*batch)
    inputs = processor(images=list(images), text=[TEMPLATE.format(q) for q in questions], padding=True,
                       padding_side=side, return_tensors="pt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(pixel_values=inputs["pixel_values"].to(dtype), input_ids=inputs["input_ids"],
                             attention_mask=inputs["attention_mask"], **settings)
    pad = model.config.text_config.pad_token_id
    return [[t for t in row if t != pad] for row in out.tolist()]


def agreement(model, processor, batches, side, dtype, settings) -> tuple[int, int]:
    same = total = 0
    for batch in batches:
        together = answers(model, processor, batch, side, dtype, settings)
        for row, pair in zip(together, batch):
            alone = answers(model, processor, [pair], side, dtype, settings)[0]
            same += row == alone
            total += 1
    return same, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--out", default=None, help="results file (default bench/results/bench_rows_<date>.md)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = pairs(args.batches)
    processor = Blip2Processor.from_pretrained(MODEL_DIR)
    ours = Blip2ForConditionalGeneration.from_pretrained(MODEL_DIR).eval()
    bf16 = Blip2ForConditionalGeneration.from_pretrained(MODEL_DIR, torch_dtype=torch.bfloat16).eval()
    import transformers

    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(str(MODEL_DIR)).eval()
    rows = [
        (f"transformers {transformers.__version__}, right padding (the old default)", ref, "right", torch.float32),
        (f"transformers {transformers.__version__}, left padding", ref, "left", torch.float32),
        ("ours, the processor's default (left)", ours, None, torch.float32),
        ("ours, right padding given", ours, "right", torch.float32),
        ("ours bfloat16, the processor's default", bf16, None, torch.bfloat16),
        ("ours bfloat16, right padding given", bf16, "right", torch.bfloat16),
    ]
    lines = [f"# Batched VQA rows equal to the same question asked alone ({datetime.date.today()})", "",
             f"Shipped demo model, {args.batches} batches of 6 different (image, question) pairs; "
             "`python bench/bench_rows.py`.", "", "| model and padding | greedy | beam 5 |", "|---|---|---|"]
    for name, model, side, dtype in rows:
        cells = []
        for settings in (GREEDY, BEAM):
            same, total = agreement(model, processor, batches, side, dtype, settings)
            cells.append(f"{same}/{total} ({same / total:.1%})")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
        print(lines[-1], flush=True)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"bench_rows_{datetime.date.today()}.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
