"""Why the instruction-aware demo model answers yes/no and position questions at chance.

    python bench/diagnose_instruct.py [--model DIR] [--scenes 160] [--threads 2]

Three measurements on the shipped model (blip2/demo/instruct by default):
1. the loss of the first answer token, teacher-forced, per kind, on training images and on new
   ones, against chance (ln 2 for yes/no, ln 4 for left/right/above/below): at chance on training
   images too means the Q-Former never learned the kind, not that it fails to generalise;
2. whether the frozen language model can be made to say each answer at all: a free offset on the
   Q-Former's language-model inputs for one question, optimised per answer (Adam, 60 steps);
3. how much the Q-Former's language-model inputs change when the question names another thing,
   or is negated, or is of another kind (relative norm of the difference).
Prints one JSON object, with the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
from collections import defaultdict

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as FastTokenizer

from blip2.demo import DEMO_DIR, evaluate, instructions, world
from blip2.demo.instruct import InstructionText
from blip2.demo.pretrain import to_pixels
from blip2.demo.tokenizer import PAD_ID
from blip2.instructblip import InstructBlipForConditionalGeneration
from blip2.train.data import DecoderLMCollate, InstructionCollate

NEGATION = (" no ", " not ", "missing", "absent")


def label(ins: instructions.Instruction) -> str:
    """exist/negated, exist/plain, position/where (4 answers), position/yes-no, or the kind."""
    if ins.kind == "exist":
        return "exist/negated" if any(w in ins.text for w in NEGATION) else "exist/plain"
    if ins.kind == "position":
        return "position/yes-no" if ins.answer in ("yes", "no") else "position/where"
    return ins.kind


def pixels(scene: world.Scene) -> torch.Tensor:
    return to_pixels(evaluate.resized(world.render(scene), 64)[None])[0]


@torch.no_grad()
def answer_losses(model, tok, split: str, scenes: int) -> dict[str, float]:
    """Mean teacher-forced loss of the first answer token per label (one question per kind and scene)."""
    tokenize = lambda texts: [e.ids for e in tok.encode_batch(texts)]  # noqa: E731
    collate = InstructionCollate(DecoderLMCollate(tokenize, pad_id=PAD_ID, max_len=64, text=InstructionText()),
                                 tokenize, pad_id=PAD_ID, max_len=64)
    rng, examples, labels = random.Random(split), [], []
    for i in range(scenes):
        scene = world.sample_scene(split, i, 0)
        for kind in ("colour", "exist", "position"):
            ins = instructions.instruction(scene, kind, rng)
            if ins is not None:
                examples.append({"key": "", "pixel_values": pixels(scene), "prompt": ins.prompt, "answer": ins.answer})
                labels.append(label(ins))
    losses = defaultdict(list)
    for start in range(0, len(examples), 64):
        batch = collate(examples[start:start + 64])
        targets = batch.pop("labels")[:, 1:]  # (B, T-1): position t predicts token t + 1
        batch.pop("keys")
        logits = model(**batch).logits[:, -targets.shape[1] - 1:-1]
        token_loss = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=-100, reduction="none")
        first = (targets != -100).float().argmax(1)  # the answer's first token
        for row, at in enumerate(first.tolist()):
            losses[labels[start + row]].append(token_loss[row, at].item())
    return {k: round(statistics.mean(v), 3) for k, v in sorted(losses.items())}


def lm_inputs(model, tok, pixel_values: torch.Tensor, prompt: str) -> torch.Tensor:
    """The Q-Former's outputs for the image and instruction, projected for the language model: (Q, D)."""
    ids = torch.tensor([tok.encode(prompt).ids])
    vis = model.image_features(pixel_values[None], False, False, False).last_hidden_state
    qf = model.query_features(vis, False, False, qformer_input_ids=ids, qformer_attention_mask=torch.ones_like(ids))
    return model.language_projection(qf.last_hidden_state[:, : model.config.num_query_tokens])[0]


def steer(model, tok, pixel_values, prompt: str, answers: list[str], steps: int = 60) -> dict[str, list[float]]:
    """For each answer: the probability reached and the offset's size relative to the inputs."""
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        base = lm_inputs(model, tok, pixel_values, prompt)[None]
    out = {}
    for word in answers:
        target = tok.encode(" " + word).ids[-1]
        offset = torch.zeros_like(base, requires_grad=True)
        opt = torch.optim.Adam([offset], lr=0.05)
        for _ in range(steps):
            embeds, mask = model.merge(base + offset, ids, torch.ones_like(ids))
            logp = model.language_forward(embeds, mask)[1][0, -1].log_softmax(-1)[target]
            opt.zero_grad()
            (-logp).backward()
            opt.step()
        out[word] = [round(math.exp(logp.item()), 3), round((offset.norm() / base.norm()).item(), 3)]
    return out


@torch.no_grad()
def sensitivity(model, tok, scenes: int) -> dict[str, float]:
    """Relative change of the language-model inputs from "is there a <pair>?" when the question changes."""
    changes = defaultdict(list)
    for i in range(scenes):
        scene = world.sample_scene("test", i, 0)
        px = pixels(scene)
        (c1, s1), other = scene.shapes[0].pair, random.Random(i).choice(world.ALL_PAIRS)
        base = lm_inputs(model, tok, px, f"Question: is there {world.noun_phrase((c1, s1))}? Answer:")
        for name, prompt in (("another thing", f"Question: is there {world.noun_phrase(other)}? Answer:"),
                             ("negated", f"Question: is there no {c1} {s1}? Answer:"),
                             ("colour question", f"Question: what colour is the {s1}? Answer:")):
            changes[name].append(((lm_inputs(model, tok, px, prompt) - base).norm() / base.norm()).item())
    return {k: round(statistics.mean(v), 3) for k, v in changes.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEMO_DIR / "instruct"))
    p.add_argument("--scenes", type=int, default=160)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    model.requires_grad_(False)
    tok = FastTokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    scene = world.sample_scene("train", 3, 0)
    a, b = scene.shapes[0], scene.shapes[1]
    result = {
        "first_answer_token_loss": {split: answer_losses(model, tok, split, args.scenes) for split in ("train", "test")},
        "chance": {"yes/no": round(math.log(2), 3), "where": round(math.log(4), 3)},
        "steer": {
            "yes/no": steer(model, tok, pixels(scene), f"Question: is there {world.noun_phrase(a.pair)}? Answer:", ["yes", "no"]),
            "where": steer(model, tok, pixels(scene), f"Question: where is the {a.colour} {a.shape} relative to the "
                           f"{b.colour} {b.shape}? Answer:", list(instructions.RELATIONS)),
        },
        "lm_input_change": sensitivity(model, tok, min(args.scenes, 40)),
        "load": ", ".join(f"{v:.1f}" for v in os.getloadavg()),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
