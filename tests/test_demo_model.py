"""The shipped demo model: complete and small, computed alike by transformers, finding described
images, and captioning shapes drawn by other code. How good it is in full is measured by the
recipe (blip2/demo/REPORT.md); the targets it does not meet yet are asserted in
tests/pending_demo_quality.py, which is not collected."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from blip2 import Blip2ForConditionalGeneration
from blip2.demo import EXAMPLES_DIR, MODEL_DIR, RETRIEVAL_DIR, evaluate, world
from blip2.processing import Blip2Processor
from blip2.retrieval import Blip2ForImageTextRetrieval

MAX_NEW_TOKENS = 30


@pytest.fixture(scope="module")
def shipped():
    model = Blip2ForConditionalGeneration.from_pretrained(MODEL_DIR)
    return model, Blip2Processor.from_pretrained(MODEL_DIR)


def captions(model, processor, images: list[Image.Image]) -> list[str]:
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        ids = model.generate(pixel_values=pixels, max_new_tokens=MAX_NEW_TOKENS)
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


def test_shipped_files_are_complete_and_small():
    total = sum(p.stat().st_size for d in (MODEL_DIR, RETRIEVAL_DIR) for p in d.rglob("*") if p.is_file())
    assert total <= 20 * 2**20, f"the shipped model takes {total / 2**20:.1f} MiB"
    for folder in (MODEL_DIR, RETRIEVAL_DIR):
        for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
                     "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
            assert (folder / name).is_file(), folder / name
    examples = sorted(EXAMPLES_DIR.glob("*.png"))
    assert 3 <= len(examples) and all(p.stat().st_size < 20_000 for p in examples)


def test_transformers_computes_the_same_captions():
    """transformers generates greedily; ours, fed the same tokens, gives the same logits (to float
    rounding) and picks the same token at every step unless the top two are within that rounding."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.Blip2ForConditionalGeneration.from_pretrained(str(MODEL_DIR)).eval()
    processor = transformers.Blip2Processor.from_pretrained(str(MODEL_DIR))
    ours = Blip2ForConditionalGeneration.from_pretrained(MODEL_DIR, torch_dtype=torch.float32)  # as 4.37 loads it
    images = [Image.open(p) for p in sorted(EXAMPLES_DIR.glob("*.png"))]
    images += [e.image for e in (world.example("heldout", 7000 + i) for i in range(6))]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, Blip2Processor.from_pretrained(MODEL_DIR)(images=images, return_tensors="pt")["pixel_values"])
    with torch.inference_mode():
        ids = theirs.generate(pixel_values=pixels, max_new_tokens=24)  # (B, 1 + new): BOS, then new tokens
        mask = (ids != theirs.config.text_config.pad_token_id).long()
        mask[:, 0] = 1
        want = theirs(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits.float()
        got = ours(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits.float()
    assert got.shape == want.shape
    Q = ours.config.num_query_tokens
    step_logits = want[:, Q:-1]  # the logits that chose tokens 1.. of ids
    live = mask[:, 1:].bool()
    assert (got[:, Q:-1] - step_logits)[live].abs().max() < 1e-4
    top2 = step_logits.topk(2, dim=-1).values
    clear = live & (top2[..., 0] - top2[..., 1] > 1e-4)
    assert (got[:, Q:-1].argmax(-1) == ids[:, 1:])[clear].all()
    assert clear[live].float().mean() > 0.9  # the check above is not vacuous
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    assert sum(bool(world.parse_caption(t)) for t in texts) >= len(texts) // 2  # real captions, not noise


def test_example_images_are_captioned_right(shipped):
    """The images the README's first command captions: every shape named with its colour."""
    model, processor = shipped
    paths = sorted(EXAMPLES_DIR.glob("*.png"))
    texts = captions(model, processor, [Image.open(p) for p in paths])
    for path, text in zip(paths, texts):
        named = ["-".join(pair) for pair in world.parse_caption(text)]
        assert sorted(named) == sorted(path.stem.split("_")[1:]), (path.name, text)


def test_retrieval_finds_the_described_image():
    model = Blip2ForImageTextRetrieval.from_pretrained(RETRIEVAL_DIR)
    processor = Blip2Processor.from_pretrained(RETRIEVAL_DIR)
    ev = evaluate.build_eval_set("heldout", 60, 0, 64, seed=0)
    keep = evaluate.distinct_scenes(ev, 30)
    images = [Image.fromarray(ev.images[i]) for i in keep]
    texts = [world.canonical_caption(ev.scenes[i]) for i in keep]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        sims = model(**inputs).logits_per_image  # (images, texts)
    assert (sims.argmax(dim=0) == torch.arange(len(keep))).float().mean() >= 0.7  # 87% now; among 100: 60% (REPORT.md)


# ---------------------------------------------------------------- other drawing code
# Written apart from blip2.demo.world on purpose: its own geometry (other proportions), its own
# rasteriser (numpy inside-tests at 4x, block-averaged: anti-aliased), its own colours, with the
# whole picture rotated, noise added, and sizes the world never draws.
OTHER_RGB = {"red": (225, 20, 40), "orange": (250, 150, 40), "yellow": (250, 225, 50), "green": (30, 150, 50),
             "blue": (30, 60, 200), "purple": (120, 40, 170), "pink": (250, 140, 200), "black": (10, 10, 10),
             "gray": (140, 140, 140), "white": (255, 255, 255)}


def _polygon(kind: str, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        return [(-r, -r), (r, -r), (r, r), (-r, r)]
    if kind == "rectangle":
        return [(-1.3 * r, -0.7 * r), (1.3 * r, -0.7 * r), (1.3 * r, 0.7 * r), (-1.3 * r, 0.7 * r)]
    if kind == "triangle":
        return [(0, -1.2 * r), (1.15 * r, 0.9 * r), (-1.15 * r, 0.9 * r)]
    raise ValueError(kind)


def _inside_polygon(px: np.ndarray, py: np.ndarray, pts) -> np.ndarray:
    """Even-odd rule: a point is inside when a ray to its right crosses the outline an odd number of times."""
    inside = np.zeros(px.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(pts, pts[1:] + pts[:1]):
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


def draw_other(shapes: list[tuple[str, str, float, float, float]], size: int, dark: bool, tilt: float,
               noise: float, rng: np.random.Generator) -> Image.Image:
    """shapes: (colour, kind, x, y, r) in [0, 1] picture units; tilt rotates the whole picture (degrees)."""
    ss = 4
    n = size * ss
    coords = (np.arange(n) + 0.5) / n
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    c, s = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    u, v = c * (xs - 0.5) - s * (ys - 0.5) + 0.5, s * (xs - 0.5) + c * (ys - 0.5) + 0.5  # rotated picture coords
    base = np.array((40, 45, 55) if dark else (235, 232, 225), dtype=np.float64)
    canvas = np.broadcast_to(base + 18 * (u[..., None] - 0.5), (n, n, 3)).copy()  # a gentle gradient
    for colour, kind, x, y, r in shapes:
        if kind == "circle":
            mask = (u - x) ** 2 + (v - y) ** 2 <= r * r
        else:
            mask = _inside_polygon(u - x, v - y, _polygon(kind, r))
        canvas[mask] = OTHER_RGB[colour]
    small = canvas.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))  # box filter: anti-aliasing
    small += rng.normal(0, noise, small.shape)
    return Image.fromarray(np.clip(small, 0, 255).round().astype(np.uint8), "RGB")


def other_scenes(count: int, seed: int = 1):
    """(image, pairs left to right) drawn by draw_other, pairs from the whole world (held-out ones too)."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    out = []
    while len(out) < count:
        n = rng.choice((1, 2, 2, 3))
        pairs = rng.sample(world.ALL_PAIRS, n)
        colours = {c for c, _ in pairs}
        if {"black", "white"} <= colours:
            continue
        dark = "white" in colours or ("black" not in colours and rng.random() < 0.4)
        placed = []
        for colour, kind in pairs:
            r = rng.uniform(0.09, 0.15)
            for _ in range(100):
                x, y = rng.uniform(0.18, 0.82), rng.uniform(0.18, 0.82)
                if all(math.hypot(x - px, y - py) > 1.6 * (r + pr) for _, _, px, py, pr in placed):
                    placed.append((colour, kind, x, y, r))
                    break
        if len(placed) < n:
            continue
        size = rng.choice((40, 72, 100, 160))
        tilt = rng.choice((-1, 1)) * rng.uniform(5, 10)
        image = draw_other(placed, size, dark, tilt, rng.uniform(3, 10), nrng)
        out.append((image, [(c, k) for c, k, *_ in sorted(placed, key=lambda p: p[2])]))
    return out


def test_robust_to_other_drawing_code(shipped):
    model, processor = shipped
    scenes = other_scenes(40)
    texts = captions(model, processor, [image for image, _ in scenes])
    right = [sorted(world.parse_caption(t)) == sorted(pairs) for t, (_, pairs) in zip(texts, scenes)]
    assert np.mean(right) >= 0.75, [(t, p) for t, (_, p), ok in zip(texts, scenes, right) if not ok]
