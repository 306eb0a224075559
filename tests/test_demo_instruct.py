"""The shipped instruction-aware demo model (blip2/demo/instruct): its answers per question kind on
pictures drawn here, by code that knows nothing of blip2.demo.world (PIL primitives, plain
backgrounds, other sizes, anti-aliasing, shapes touching the border, colours near the named ones),
and that `blip2 ask` and the server use it by default. The recipe's own figures are in
blip2/demo/REPORT.md."""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from blip2.auto import load_model, load_processor
from blip2.cli import main
from blip2.demo import INSTRUCT_DIR

# ---------------------------------------------------------------- drawing, independent of the world
COLOURS = {"red": (220, 30, 30), "orange": (245, 140, 25), "yellow": (240, 215, 40), "green": (45, 155, 55),
           "blue": (35, 75, 210), "purple": (125, 45, 175), "pink": (245, 125, 190), "black": (20, 20, 20),
           "gray": (130, 130, 130), "white": (250, 250, 250)}
KINDS = ("circle", "square", "rectangle", "triangle")
NUMBERS = ("zero", "one", "two", "three")


@dataclass
class Drawn:
    colour: str
    kind: str
    x: float  # centre, as a fraction of the picture's width
    y: float
    r: float  # half the size, as a fraction of the width


def near(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    """A colour close to the named one, not the same."""
    return tuple(min(255, max(0, v + rng.randint(-18, 18))) for v in rgb)


def draw(shapes: list[Drawn], size: int, background: tuple[int, int, int], antialias: bool,
         rng: random.Random) -> Image.Image:
    """PIL's own primitives on a plain background; drawn 4x larger and reduced when anti-aliased."""
    scale = 4 if antialias else 1
    n = size * scale
    image = Image.new("RGB", (n, n), background)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        x, y, r = s.x * n, s.y * n, s.r * n
        fill = near(COLOURS[s.colour], rng)
        if s.kind == "circle":
            pen.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif s.kind == "square":
            pen.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        elif s.kind == "rectangle":
            pen.rectangle([x - r, y - 0.5 * r, x + r, y + 0.5 * r], fill=fill)
        else:
            pen.regular_polygon((x, y + 0.2 * r, 1.15 * r), 3, rotation=0, fill=fill)
    return image.resize((size, size), Image.LANCZOS) if antialias else image


def scenes(count: int, seed: int) -> list[tuple[Image.Image, list[Drawn]]]:
    """Pictures of one to three shapes (distinct colour-kind pairs, any pair), some touching the border."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        pairs = rng.sample([(c, k) for c in COLOURS for k in KINDS], rng.choice((1, 2, 3)))
        colours = {c for c, _ in pairs}
        if {"black", "white"} <= colours:
            continue
        dark = "white" in colours or ("black" not in colours and rng.random() < 0.4)
        placed: list[Drawn] = []
        for colour, kind in pairs:
            r = rng.uniform(0.08, 0.16)
            for _ in range(200):
                x, y = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)  # up to the border, not over it
                if all(math.hypot(x - o.x, y - o.y) > 1.5 * (r + o.r) + 0.02 for o in placed):
                    placed.append(Drawn(colour, kind, x, y, r))
                    break
        if len(placed) < len(pairs):
            continue
        base = rng.randint(20, 60) if dark else rng.randint(205, 245)
        background = tuple(min(255, base + rng.randint(-12, 12)) for _ in range(3))
        image = draw(placed, rng.choice((40, 56, 100, 150, 224)), background, rng.random() < 0.6, rng)
        out.append((image, sorted(placed, key=lambda s: s.x)))
    return out


# ---------------------------------------------------------------- questions, with their answers
def where(a: Drawn, b: Drawn) -> str | None:
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > abs(dy) + 0.06:
        return "left" if dx < 0 else "right"
    if abs(dy) > abs(dx) + 0.06:
        return "above" if dy < 0 else "below"
    return None


def question(kind: str, shapes: list[Drawn], rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of `kind`, in words of this file (some the recipe never trains on)."""
    kinds, colours = [s.kind for s in shapes], [s.colour for s in shapes]
    if kind == "colour":
        unique = [s for s in shapes if kinds.count(s.kind) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        return rng.choice(["what colour is the {}?", "which color is the {}?"]).format(s.kind), s.colour
    if kind == "shape":
        unique = [s for s in shapes if colours.count(s.colour) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        return rng.choice(["what shape is the {} one?", "what is the {} shape?"]).format(s.colour), s.kind
    if kind == "count":
        if rng.random() < 0.5:
            return "how many shapes are there?", NUMBERS[len(shapes)]
        k = rng.choice(KINDS)
        return f"how many {k}s are there?", NUMBERS[kinds.count(k)]
    if kind == "exist":
        colour, k = rng.choice(list(COLOURS)), rng.choice(KINDS)
        if rng.random() < 0.5:
            colour, k = rng.choice([(s.colour, s.kind) for s in shapes])
        present = (colour, k) in zip(colours, kinds)
        if rng.random() < 0.5:
            return f"is there a {colour} {k}?", "yes" if present else "no"
        return f"is there no {colour} {k}?", "no" if present else "yes"
    if kind == "position":
        pairs = [(a, b, where(a, b)) for a in shapes for b in shapes if a is not b and where(a, b)]
        if not pairs:
            return None
        a, b, rel = rng.choice(pairs)
        return f"where is the {a.colour} {a.kind} relative to the {b.colour} {b.kind}?", rel
    raise ValueError(kind)


WORDS = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(KINDS) + r")s?\b")


def names_all(text: str, shapes: list[Drawn]) -> bool:
    return sorted(WORDS.findall(text.lower())) == sorted((s.colour, s.kind) for s in shapes)


# ---------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def shipped():
    return load_model(INSTRUCT_DIR, torch_dtype=torch.float32), load_processor(INSTRUCT_DIR)


def ask(model, processor, images: list[Image.Image], questions: list[str], max_new_tokens: int = 6) -> list[str]:
    prompts = [f"Question: {q} Answer:" for q in questions]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return [t.strip().lower().rstrip(".") for t in processor.batch_decode(ids, skip_special_tokens=True)]


def test_shipped_files_and_size():
    from blip2.demo import MODEL_DIR, RETRIEVAL_DIR

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "preprocessor_config.json", "qformer_tokenizer/tokenizer.json"):
        assert (INSTRUCT_DIR / name).is_file(), name
    assert json.loads((INSTRUCT_DIR / "config.json").read_text())["model_type"] == "instructblip"
    total = sum(p.stat().st_size for d in (MODEL_DIR, RETRIEVAL_DIR, INSTRUCT_DIR) for p in d.rglob("*") if p.is_file())
    assert total <= 25 * 2**20, f"the shipped models take {total / 2**20:.1f} MiB"


# What the shipped model reaches on these pictures (`measure`: 120 per kind, seed 5; README.md),
# asserted with a margin on 40 per kind; the 90% per kind is in tests/pending_demo_quality.py.
FLOORS = {"colour": 0.9, "shape": 0.8, "count": 0.8, "exist": 0.75, "position": 0.8}
PENDING: tuple[str, ...] = ()


@pytest.mark.parametrize("kind", sorted(FLOORS))
def test_answers_on_pictures_drawn_by_other_code(shipped, kind):
    model, processor = shipped
    rng = random.Random(f"instruct-{kind}")
    asked = []
    for image, shapes in scenes(80, seed=11):
        qa = question(kind, shapes, rng)
        if qa is not None and len(asked) < 40:
            asked.append((image, *qa))
    said = ask(model, processor, [a[0] for a in asked], [a[1] for a in asked])
    right = [s == a[2] for s, a in zip(said, asked)]
    assert np.mean(right) >= FLOORS[kind], [(a[1], a[2], s) for s, a, ok in zip(said, asked, right) if not ok]


def test_describes_pictures_drawn_by_other_code(shipped):
    model, processor = shipped
    drawn = scenes(30, seed=12)
    said = ask(model, processor, [image for image, _ in drawn], ["what is in the image?"] * len(drawn), 40)
    right = [names_all(s, shapes) for s, (_, shapes) in zip(said, drawn)]
    assert np.mean(right) >= 0.8, [(s, [(x.colour, x.kind) for x in shapes]) for s, (_, shapes), ok
                                   in zip(said, drawn, right) if not ok]


# ---------------------------------------------------------------- the command line and the server
def picture(tmp_path, shapes: list[Drawn], name: str = "p.png"):
    path = tmp_path / name
    draw(shapes, 96, (235, 235, 230), True, random.Random(0)).save(path)
    return str(path)


def test_ask_uses_the_instruct_model_by_default(capsys, tmp_path):
    import argparse

    from blip2.commands import load
    from blip2.instructblip import InstructBlipForConditionalGeneration

    loaded = load(argparse.Namespace(model=None, device="cpu", dtype="float32"), retrieval=False, task="answer")
    assert isinstance(loaded.model, InstructBlipForConditionalGeneration)
    path = picture(tmp_path, [Drawn("red", "circle", 0.25, 0.5, 0.13), Drawn("blue", "square", 0.72, 0.5, 0.13)])
    code = main(["ask", path, "--question", "what colour is the square?", "--question", "what color is the circle?",
                 "--format", "jsonl"])
    out = capsys.readouterr().out
    assert code == 0
    assert [json.loads(line)["answer"] for line in out.strip().splitlines()] == ["blue", "red"]


def test_ask_refuses_an_empty_question_and_answers_odd_ones(capsys, tmp_path):
    path = picture(tmp_path, [Drawn("green", "triangle", 0.5, 0.5, 0.15)])
    with pytest.raises(SystemExit, match="the question is empty"):
        main(["ask", path, "   "])
    odd = ["???", "colour circle square where how", "what's up with the thing"]
    code = main(["ask", path, *sum((["--question", q] for q in odd), []), "--format", "jsonl"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(out.strip().splitlines()) == 3  # an answer each, no trace
    with pytest.raises(SystemExit, match="too long|takes .* tokens"):
        main(["ask", path, "x" * 300])


def test_server_default_is_the_instruct_model():
    from blip2.server.cli import default_models

    model, retrieval = default_models()
    assert model == str(INSTRUCT_DIR) and retrieval is not None


def measure(per_kind: int = 120, seed: int = 5, folder=INSTRUCT_DIR) -> dict[str, float]:
    """The figures REPORT.md gives for these pictures: `python tests/test_demo_instruct.py`."""
    model, processor = load_model(folder, torch_dtype=torch.float32), load_processor(folder)
    drawn = scenes(3 * per_kind, seed)
    out = {}
    for kind in (*sorted(FLOORS), *PENDING):
        rng = random.Random(f"measure-{kind}")
        asked = [(image, *qa) for image, shapes in drawn if (qa := question(kind, shapes, rng))][:per_kind]
        said = ask(model, processor, [a[0] for a in asked], [a[1] for a in asked])
        out[kind] = float(np.mean([s == a[2] for s, a in zip(said, asked)]))
    said = ask(model, processor, [image for image, _ in drawn[:per_kind]], ["what is in the image?"] * per_kind, 40)
    out["describe"] = float(np.mean([names_all(s, shapes) for s, (_, shapes) in zip(said, drawn)]))
    return out


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))


def test_transformers_reads_the_shipped_checkpoint(shipped):
    """transformers 4.37's InstructBLIP classes load instruct/ as it is and compute the same logits."""
    transformers = pytest.importorskip("transformers")
    model, processor = shipped
    theirs = transformers.InstructBlipForConditionalGeneration.from_pretrained(str(INSTRUCT_DIR)).eval()
    their_processor = transformers.InstructBlipProcessor.from_pretrained(str(INSTRUCT_DIR))
    images = [image for image, _ in scenes(4, seed=13)]
    texts = ["Question: what colour is the circle? Answer:", "Question: how many shapes are there? Answer:",
             "A short image description:", "Question: is there no red square? Answer:"]
    want = their_processor(images=images, text=texts, padding=True, return_tensors="pt")
    got = processor(images=images, text=texts, padding=True, return_tensors="pt")
    # The language model's prompt is padded on the left by ours (decoder-only), on the right by theirs.
    for key in ("qformer_input_ids", "qformer_attention_mask", "pixel_values"):
        assert torch.equal(torch.as_tensor(want[key]), torch.as_tensor(got[key])), key
    with torch.inference_mode():
        a = theirs(**want).logits
        b = model(**want).logits
    keep = want["attention_mask"].bool()
    Q = model.config.num_query_tokens
    assert (a[:, Q:][keep] - b[:, Q:][keep]).abs().max() < 1e-4
