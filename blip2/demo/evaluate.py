"""Scoring the demo models on the world: captions, answers per question kind, ITC retrieval.

Every score is on images the models never saw; "heldout" images hold colour-shape pairs that
no training image held.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import world
from ..train.data import pad
from .pretrain import to_pixels
from .tokenizer import PAD_ID

VQA_TEMPLATE = "Question: {} Answer:"


@dataclass
class EvalSet:
    """Scenes with their images (uint8, model size) and the questions asked about them."""

    scenes: list[world.Scene]
    images: np.ndarray  # (N, S, S, 3)
    questions: list[tuple[int, world.QA]]  # (scene index, question)


def resized(image: Image.Image, size: int) -> np.ndarray:
    """The processor's resize: RGB, bicubic to a square."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))


def build_eval_set(split: str, scenes: int, per_kind: int, image_size: int, seed: int = 0) -> EvalSet:
    """`scenes` captioned scenes, plus up to `per_kind` questions of each kind (more scenes if needed)."""
    picked, images, asked = [], [], []
    counts = dict.fromkeys(world.QUESTION_KINDS, 0)
    i = 0
    while i < scenes or min(counts.values()) < per_kind:
        ex = world.example(split, i, seed)
        picked.append(ex.scene)
        images.append(resized(ex.image, image_size))
        for qa in ex.qa:
            if counts[qa.kind] < per_kind:
                asked.append((len(picked) - 1, qa))
                counts[qa.kind] += 1
        i += 1
    return EvalSet(picked, np.stack(images), asked)


# ---------------------------------------------------------------- generation
def left_padded(tok, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Prompts (each starting with BOS) left-padded, so every row's next token comes last."""
    seqs = [e.ids for e in tok.encode_batch(prompts)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate_text(model, tok, pixel_values: Tensor, prompts: list[str], max_new_tokens: int,
                  batch_size: int = 64) -> list[str]:
    """Greedy continuations of `prompts` for the images, decoded and stripped."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded(tok, prompts[start:start + batch_size])
        pixels = pixel_values[start:start + batch_size]
        new = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                             max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        # as transformers 4.37: a BOS, then the new tokens only (skip_special_tokens drops the BOS)
        out += [t.strip() for t in tok.decode_batch(new.tolist(), skip_special_tokens=True)]
    return out


def caption_scores(model, tok, ev: EvalSet, limit: int | None = None) -> tuple[float, list[str]]:
    """Caption accuracy: every shape named with its colour, no more, no fewer."""
    n = len(ev.scenes) if limit is None else min(limit, len(ev.scenes))
    texts = generate_text(model, tok, to_pixels(ev.images[:n]), [""] * n, max_new_tokens=40)
    correct = [world.caption_correct(t, s) for t, s in zip(texts, ev.scenes[:n])]
    return float(np.mean(correct)), texts


def vqa_scores(model, tok, ev: EvalSet) -> dict[str, float]:
    """Exact-match accuracy per question kind."""
    order = sorted(range(len(ev.questions)), key=lambda k: len(ev.questions[k][1].question))  # less padding
    qs = [ev.questions[k] for k in order]
    pixels = to_pixels(ev.images[[i for i, _ in qs]])
    answers = generate_text(model, tok, pixels, [VQA_TEMPLATE.format(q.question) for _, q in qs], max_new_tokens=4)
    hits: dict[str, list[bool]] = {kind: [] for kind in world.QUESTION_KINDS}
    for (_, qa), answer in zip(qs, answers):
        hits[qa.kind].append(answer.lower() == qa.answer)
    return {kind: float(np.mean(h)) for kind, h in hits.items() if h}


# ---------------------------------------------------------------- retrieval
def distinct_scenes(ev: EvalSet, n: int) -> list[int]:
    """Indices of the first n scenes whose plain captions differ, so each text has one right image."""
    seen, keep = set(), []
    for i, scene in enumerate(ev.scenes):
        text = world.canonical_caption(scene)
        if text not in seen:
            seen.add(text)
            keep.append(i)
        if len(keep) == n:
            break
    return keep


@torch.no_grad()
def itc_recall(retrieval, tok, ev: EvalSet, n: int = 100) -> dict[str, float]:
    """Recall@1 both ways among n images and their plain captions, by ITC similarity."""
    keep = distinct_scenes(ev, n)
    pixels = to_pixels(ev.images[keep])
    ids, mask = _right_padded(tok, [world.canonical_caption(ev.scenes[i]) for i in keep])
    sims = retrieval(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image  # (images, texts)
    target = torch.arange(len(keep))
    return {
        "t2i_r1": (sims.argmax(dim=0) == target).float().mean().item(),
        "i2t_r1": (sims.argmax(dim=1) == target).float().mean().item(),
        "n": len(keep),
    }


@torch.no_grad()
def itm_accuracy(retrieval, tok, ev: EvalSet, n: int = 100, seed: int = 0) -> float:
    """ITM on n true pairs and n near misses (one shape's colour or kind changed)."""
    rng = random.Random(seed)
    keep = list(range(min(n, len(ev.scenes))))
    texts, labels = [], []
    for i in keep:
        pairs = ev.scenes[i].pairs
        texts.append(world.listing(pairs))
        labels.append(1)
        wrong = list(pairs)
        k = rng.randrange(len(wrong))
        options = [p for p in world.ALL_PAIRS if p not in pairs and (p[0] == wrong[k][0] or p[1] == wrong[k][1])]
        wrong[k] = rng.choice(options)
        texts.append(world.listing(wrong))
        labels.append(0)
    pixels = to_pixels(ev.images[[i for i in keep for _ in range(2)]])
    ids, mask = _right_padded(tok, texts)
    logits = retrieval(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                       use_image_text_matching_head=True).logits_per_image  # (2n, 2)
    return (logits.argmax(dim=1) == torch.tensor(labels)).float().mean().item()


def _right_padded(tok, texts: list[str]) -> tuple[Tensor, Tensor]:
    seqs = [e.ids for e in tok.encode_batch(texts)]
    return pad(seqs, PAD_ID, max(len(s) for s in seqs))
