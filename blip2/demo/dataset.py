"""World images as a dataset folder that `blip2 train` and `blip2 eval` read.

    python -m blip2.demo.dataset --split heldout --count 200 --out data/heldout-train
    python -m blip2.demo.dataset --split heldout --count 100 --start 10000 --out data/heldout-val

Writes the images (PNG) and a metadata.jsonl with one record per image: all of the scene's
caption phrasings (--plain: the plainest only), and (with --questions) one record per question with its answer. The
"heldout" split holds colour-shape pairs the shipped model's Q-Former never saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io import atomic_write_text
from . import world


def write_split(out: str | Path, split: str, count: int, start: int = 0, seed: int = 0,
                questions: bool = False, plain: bool = False) -> Path:
    """Scenes start .. start + count - 1 of `split` -> out/NNNNN.png + out/metadata.jsonl; returns the jsonl.
    plain: only the plainest caption (the shapes, left to right) instead of every phrasing."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(start, start + count):
        ex = world.example(split, index, seed)
        name = f"{split}-{index:05d}.png"
        ex.image.save(out / name)
        lines.append({"image": name, "caption": world.canonical_caption(ex.scene) if plain else ex.captions})
        if questions:
            lines += [{"image": name, "question": qa.question, "answer": qa.answer} for qa in ex.qa]
    metadata = out / "metadata.jsonl"
    atomic_write_text(metadata, "".join(json.dumps(line) + "\n" for line in lines))
    return metadata


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="heldout", choices=world.SPLITS)
    p.add_argument("--count", type=int, default=200, help="scenes")
    p.add_argument("--start", type=int, default=0, help="first scene index (different ranges do not overlap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--questions", action="store_true", help="also write question-answer records")
    p.add_argument("--plain", action="store_true", help="one caption per image, the plainest, not every phrasing")
    p.add_argument("--out", required=True, help="folder to write")
    args = p.parse_args(argv)
    print(write_split(args.out, args.split, args.count, args.start, args.seed, args.questions, args.plain))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
