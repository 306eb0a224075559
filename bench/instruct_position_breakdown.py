"""Does the instruction-aware demo model read which shape a position question measures from?

    python bench/instruct_position_breakdown.py [--model DIR] [--scenes 150] [--split test] [--threads 2]

On three-shape images of the world (new images, or held-out pairs with `--split heldout`), it picks a
shape a and two others b and c whose relations to a differ, and asks "where is the {a} relative to the
{b}?" and the same of c. A model that reads b answers the two differently. It prints how often the two
answers are the same, how often each is right, and how often the answer about b is a's relation to the
middle of b and c (what a model that reads only a can answer) or to the picture's centre. On
two-shape images it then asks three phrasings, one that names b first ("in which direction from the
{b} is the {a}?"): a model that reads which shape is a gets them all right. Last, where the
Q-Former's last cross-attention looks on the three-shape images (`instruct.look_loss` trains it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from types import SimpleNamespace

import numpy as np
import torch
from tokenizers import Tokenizer as FastTokenizer

from blip2.demo import DEMO_DIR, evaluate, instruct, instructions, world
from blip2.instructblip import InstructBlipForConditionalGeneration


def triples(split: str, count: int, seed: int = 11) -> tuple[list, list, list]:
    """(images, [(a, b, c)], scenes): three-shape scenes, a's relations to b and to c both clear and different."""
    rng, images, rows, scenes, i = random.Random(seed), [], [], [], 0
    while len(rows) < count:
        ex = world.example(split, i, seed)
        i += 1
        shapes = ex.scene.shapes
        options = [(a, b, c) for a in shapes for b in shapes for c in shapes if len({id(a), id(b), id(c)}) == 3
                   and world.relation(a, b) and world.relation(a, c) and world.relation(a, b) != world.relation(a, c)]
        if len(shapes) == 3 and options:
            images.append(evaluate.resized(ex.image, 64))
            rows.append(rng.choice(options))
            scenes.append(ex.scene)
    return images, rows, scenes


def relation_to(a: world.Shape, x: float, y: float) -> str | None:
    return world.relation(a, SimpleNamespace(x=x, y=y), margin=0.0)


def breakdown(model, tok, split: str, count: int) -> dict:
    images, rows, _ = triples(split, count)
    pixels = instruct.to_pixels(np.stack(images))
    ask = lambda a, b: instructions.QUESTION_TEMPLATE.format(  # noqa: E731
        f"where is the {a.colour} {a.shape} relative to the {b.colour} {b.shape}?")
    about_b = instruct.answer(model, tok, pixels, [ask(a, b) for a, b, _ in rows], 6, True)
    about_c = instruct.answer(model, tok, pixels, [ask(a, c) for a, _, c in rows], 6, True)
    tally = dict.fromkeys(("same answer", "b right", "c right", "both right", "b's answer = a to the middle of b and c",
                           "b's answer = a to the centre of the picture"), 0)
    for (a, b, c), sb, sc in zip(rows, about_b, about_c):
        tally["same answer"] += sb == sc
        tally["b right"] += sb == world.relation(a, b)
        tally["c right"] += sc == world.relation(a, c)
        tally["both right"] += sb == world.relation(a, b) and sc == world.relation(a, c)
        tally["b's answer = a to the middle of b and c"] += sb == relation_to(a, (b.x + c.x) / 2, (b.y + c.y) / 2)
        tally["b's answer = a to the centre of the picture"] += sb == relation_to(a, world.CANVAS / 2, world.CANVAS / 2)
    return {k: f"{v}/{len(rows)}" for k, v in tally.items()}


def roles(model, tok, split: str, count: int, seed: int = 5) -> dict:
    """Right answers per phrasing on two-shape images, and how often the answer is b's relation to a instead."""
    rng, images, rows, i = random.Random(seed), [], [], 0
    while len(rows) < count:
        ex = world.example(split, i, seed)
        i += 1
        if len(ex.scene.shapes) == 2 and world.relation(*ex.scene.shapes):
            images.append(evaluate.resized(ex.image, 64))
            rows.append(rng.sample(list(ex.scene.shapes), 2))
    pixels = instruct.to_pixels(np.stack(images))
    name = lambda s: f"{s.colour} {s.shape}"  # noqa: E731
    out = {}
    for template in ("where is the {a} relative to the {b}?", "in which direction from the {b} is the {a}?",
                     "where is the {a} compared to the {b}?"):
        prompts = [instructions.QUESTION_TEMPLATE.format(template.format(a=name(a), b=name(b))) for a, b in rows]
        said = instruct.answer(model, tok, pixels, prompts, 6, True)
        right = sum(s == world.relation(a, b) for s, (a, b) in zip(said, rows))
        swapped = sum(s == world.relation(b, a) for s, (a, b) in zip(said, rows))
        out[template] = f"right {right}/{len(rows)}, b's relation to a {swapped}/{len(rows)}"
    return out


@torch.no_grad()
def attention(model, tok, split: str, count: int) -> dict:
    """Share of the Q-Former's last cross-attention (mean over heads) on a's and on b's patches
    (`instruct.patch_masks`), for the queries the look loss trains (1-4 at a, 5-8 at b) and for all 16."""
    images, rows, scenes = triples(split, count)
    prompts = [instructions.QUESTION_TEMPLATE.format(f"where is the {a.colour} {a.shape} relative to the "
                                                     f"{b.colour} {b.shape}?") for a, b, _ in rows]
    ids, mask = instruct._right_padded(tok, prompts)
    image = model.vision_model(pixel_values=instruct.to_pixels(np.stack(images))).last_hidden_state  # (B, N, Dv)
    out = model.query_features(image, need_weights=True, qformer_input_ids=ids, qformer_attention_mask=mask)
    weights = out.cross_attentions[-1].float().mean(1)  # (B, Q, N)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    looks = torch.from_numpy(np.stack([instruct.patch_masks(scene, (scene.shapes.index(a), scene.shapes.index(b)), grid)
                                       for scene, (a, b, _) in zip(scenes, rows)]))  # (B, 2, N)
    share = lambda queries, k: float((weights[:, queries] * looks[:, k, None]).sum(-1).mean())  # noqa: E731
    groups = {"queries 1-4": instruct.LOOK_QUERIES[0], "queries 5-8": instruct.LOOK_QUERIES[1], "all": slice(None)}
    return {f"{name} on {'ab'[k]}": round(share(queries, k), 2) for name, queries in groups.items() for k in (0, 1)} | {
        "a uniform look on a": round(float(looks[:, 0].sum(-1).mean() / looks.shape[-1]), 2),
        "a uniform look on b": round(float(looks[:, 1].sum(-1).mean() / looks.shape[-1]), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_DIR / instruct.INSTRUCT_DIR_NAME))
    parser.add_argument("--scenes", type=int, default=150)
    parser.add_argument("--split", default="test", choices=("test", "heldout"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = FastTokenizer.from_file(str(DEMO_DIR / "model" / "tokenizer.json"))
    model = InstructBlipForConditionalGeneration.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    print(json.dumps({"model": os.path.basename(os.path.normpath(args.model)), "split": args.split,
                      "load": os.getloadavg(), "three shapes": breakdown(model, tok, args.split, args.scenes),
                      "two shapes": roles(model, tok, args.split, args.scenes),
                      "last cross-attention": attention(model, tok, args.split, args.scenes)}, indent=1))


if __name__ == "__main__":
    main()
