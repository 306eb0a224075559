"""Where the instruction-aware demo model miscounts: count questions split by what they count and by
the true answer.

    python bench/instruct_count_breakdown.py [--model DIR] [--per-kind 300] [--threads 2] [--copy-plurals]

Each cell asks the recipe's count questions (`blip2.demo.instructions`) on new images and on
held-out pairs, in seen and unseen wordings, and prints right/asked per (what is counted, answer):
"total" counts every shape, "shape" one shape kind ("how many circles?"), "colour" one colour.
A model that ignores the word it is asked to count answers every "shape" question the same way.
`--copy-plurals` first sets the Q-Former's rows of the shapes' plurals from their singulars
(`instruct.plurals_from_singulars`), untrained: does the model then read which shape it counts?
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch
from tokenizers import Tokenizer as FastTokenizer

from blip2.demo import DEMO_DIR, instruct, instructions, world
from blip2.instructblip import InstructBlipForConditionalGeneration


def counted(ins: instructions.Instruction) -> str:
    if not ins.one_kind:
        return "total"
    return "shape" if any(shape in ins.text for shape in world.SHAPES) else "colour"


def breakdown(model, tok, per_kind: int) -> dict:
    out = {}
    for split in ("test", "heldout"):
        for wording in ("seen", "unseen"):
            qs = instruct.build_questions(split, per_kind, wording, 64, 0)
            chosen = [(i, q) for i, q in qs.asked if q.kind == "count"]
            pixels = instruct.to_pixels(qs.images[[i for i, _ in chosen]])
            said = instruct.answer(model, tok, pixels, [q.prompt for _, q in chosen], 6, True)
            cells = defaultdict(lambda: [0, 0])
            for (i, q), s in zip(chosen, said):
                cell = cells[f"{counted(q)}:{q.answer}"]
                cell[0] += instructions.is_right(q, s, qs.scenes[i])
                cell[1] += 1
            right = sum(r for r, _ in cells.values())
            out[f"{split}/{wording}"] = {"right": f"{right}/{len(chosen)}",
                                         **{k: f"{r}/{n}" for k, (r, n) in sorted(cells.items())}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_DIR / instruct.INSTRUCT_DIR_NAME))
    parser.add_argument("--per-kind", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--copy-plurals", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = FastTokenizer.from_file(str(DEMO_DIR / "model" / "tokenizer.json"))
    model = InstructBlipForConditionalGeneration.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    copied = instruct.plurals_from_singulars(model, tok) if args.copy_plurals else []
    print(json.dumps({"model": os.path.basename(os.path.normpath(args.model)), "plurals_copied": copied,
                      "load": os.getloadavg(),
                      **breakdown(model, tok, args.per_kind)}, indent=1))


if __name__ == "__main__":
    main()
