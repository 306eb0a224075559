"""Two tried remedies for the instruction-aware demo model's yes/no and position answers (issue 17).

    python bench/instruct_remedies.py lm  [--steps 800] [--lr 1e-3] [--docs 8000] [--questions 3] [--world-docs 4000] [--scenes 150]
    python bench/instruct_remedies.py aux [--steps 320] [--lr 1e-3] [--kinds exist,position] [--head tied|linear] [--plain]

`lm`: give the frozen language model the skill Flan-T5 and Vicuna bring to InstructBLIP, answering
from context. The shipped language model is trained further on text documents: a caption of a
scene, then the relations between its shapes ("the red circle is above the blue square"), then
instructions of every kind with their answers (`blip2.demo.instructions`), mixed with the world's
own text. It is scored on text alone: given that context for a new scene, greedy answers per kind,
in seen and unseen wordings, and how often it writes a caption it just read again.

`aux`: a direct signal for the Q-Former, on top of the language-model loss. The shipped
instruction-aware model is tuned on exist (and position) instructions only, with an extra loss on
the first answer token read off the queries: `tied`, query 0's language-model input through the
language model's (tied) output layer; `linear`, a new 6-way layer (yes, no, left, right, above,
below) on the mean query output. Printed per eighth of the run: the language-model loss, the extra
loss and its accuracy, and the first answer token's loss for yes/no answers (chance ln 2 = 0.693)
and for directions (chance ln 4 = 1.386), on the training batches.

Prints its figures with the load average. Ad-hoc, for the report (blip2/demo/REPORT.md); no outputs are kept.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as FastTokenizer

from blip2.demo import DEMO_DIR, instructions, world
from blip2.demo.instruct import InstructionPairs, InstructionText, InstructRecipe, fill_cache
from blip2.demo.pretrain import TextPretraining, TokenLines, pack, to_pixels
from blip2.demo.recipe import Recipe, copy_accuracy, draw_images, greedy_ids, trainer_config
from blip2.demo.tokenizer import PAD_ID
from blip2.hf_compat import Blip2ForConditionalGeneration
from blip2.instructblip import InstructBlipForConditionalGeneration
from blip2.train.data import DecoderLMCollate, InstructionCollate
from blip2.train.frozen import image_features
from blip2.train.loop import Trainer
from blip2.train.losses import IGNORE
from blip2.train.stage2 import Stage2Objective

ANSWERS = ("yes", "no", "left", "right", "above", "below")
NEGATION = (" no ", " not ", "missing", "absent")  # the negated exist phrasings


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


# ---------------------------------------------------------------- lm: answering from text
def relations(scene: world.Scene) -> list[str]:
    """Each pair of shapes (left to right) whose relation is clear, as a sentence."""
    s = scene.shapes
    out = []
    for i in range(len(s)):
        for j in range(i + 1, len(s)):
            rel = world.relation(s[i], s[j])
            if rel is not None:
                out.append(f"the {s[i].colour} {s[i].shape} is {instructions.RELATIONS[rel]} the {s[j].colour} {s[j].shape}")
    return out


def context(scene: world.Scene, rng: random.Random | None = None) -> str:
    """A caption (any phrasing with `rng`, else the plainest) and the relations: what the text says of the scene."""
    caption = rng.choice(world.captions(scene)) if rng else world.canonical_caption(scene)
    rels = relations(scene)
    return caption + ("; " + "; ".join(rels) if rels else "")


def instruction_docs(count: int, questions: int, seed: int) -> list[list[str]]:
    """Text documents: the context, then `questions` instructions of different kinds, each answered."""
    docs = []
    for i in range(count):
        rng = random.Random(f"flan/{seed}/{i}")
        scene = world.sample_scene("text", 100000 + i, seed, plain_style=True)
        lines = [context(scene, rng)]
        kinds = list(instructions.KINDS)
        rng.shuffle(kinds)
        for kind in kinds[:questions]:
            ins = instructions.instruction(scene, kind, rng, "seen")
            if ins is not None:
                lines.append(ins.prompt + (" " if ins.prompt else "") + ins.answer)
        docs.append(lines)
    return docs


@torch.no_grad()
def text_answers(lm, tok, seed: int, wording: str, scenes: int) -> dict[str, float]:
    """Greedy answers per kind, the context given as text, on new scenes."""
    right = dict.fromkeys(instructions.KINDS, 0)
    total = dict(right)
    for i in range(scenes):
        scene = world.sample_scene("test", 3000 + i, seed)
        ctx = tok.encode(context(scene) + "\n").ids
        for ins in instructions.instructions(scene, random.Random(f"flan-eval/{i}/{wording}"), wording):
            prompt = ctx + tok.encode(ins.prompt).ids
            said = tok.decode(greedy_ids(lm, prompt, 30 if ins.kind == "describe" else 4)[len(prompt):])
            right[ins.kind] += instructions.is_right(ins, said.split("\n")[0].strip(), scene)
            total[ins.kind] += 1
    return {k: round(right[k] / total[k], 3) for k in right if total[k]}


def run_lm(args, work: Path) -> None:
    blip2 = Blip2ForConditionalGeneration.from_pretrained(args.model / "model", torch_dtype=torch.float32)
    lm = blip2.language_model.eval()
    tok = FastTokenizer.from_file(str(args.model / "model" / "tokenizer.json"))
    print("before:", {w: text_answers(lm, tok, 0, w, args.scenes) for w in instructions.WORDINGS}, flush=True)
    corpus = world.text_corpus(args.world_docs, 0) + instruction_docs(args.docs, args.questions, 0)
    random.Random(0).shuffle(corpus)
    encoded = tok.encode_batch([line + "\n" for doc in corpus for line in doc])
    docs, start = [], 0
    for doc in corpus:
        docs.append([t for e in encoded[start:start + len(doc)] for t in e.ids])
        start += len(doc)
    length = lm.config.max_position_embeddings
    dataset = TokenLines(pack(docs, length), PAD_ID, length)
    cfg = trainer_config(Recipe(), work, "lm", args.steps, 32, args.lr)
    lm.requires_grad_(True)
    t = time.perf_counter()
    history = Trainer(TextPretraining(lm), dataset, dataset.collate, cfg).fit()
    lm.eval()
    print(f"{args.steps} steps at lr {args.lr}: {time.perf_counter() - t:.0f} s, final loss {history[-1]['lm']:.3f}")
    print("after:", {w: text_answers(lm, tok, 0, w, args.scenes) for w in instructions.WORDINGS},
          f"copies a caption {copy_accuracy(lm, tok, 0):.1%}; load {load()}")


# ---------------------------------------------------------------- aux: a direct signal on the queries
class KindPairs(InstructionPairs):
    """Training images with one instruction of the given kinds (another image when the scene allows none)."""

    def __init__(self, data, seed: int, kinds: list[str], plain: bool) -> None:
        super().__init__(data, seed, 0.0)
        self.kinds, self.plain = kinds, plain

    def __getitem__(self, i: int) -> dict:
        while True:
            ins = instructions.instruction(self.data.scenes[i], self.rng.choice(self.kinds), self.rng)
            if ins is None:
                i = self.rng.randrange(len(self.data.scenes))
            elif not (self.plain and any(w in ins.text for w in NEGATION)):
                break
        return {"key": f"train/{i}", "pixel_values": to_pixels(self.data.images[i:i + 1])[0],
                "prompt": ins.prompt, "answer": ins.answer}


class AnswerSignal(Stage2Objective):
    """The language-model loss plus a loss on the first answer token read off the queries."""

    def __init__(self, model, cache, answer_ids: list[int], head: str) -> None:
        super().__init__(model, feature_cache=cache)
        self.answer_ids = torch.tensor(answer_ids)
        self.head = torch.nn.Linear(model.config.qformer_config.hidden_size, len(answer_ids)) if head == "linear" else None

    def forward(self, batch: dict, step: int) -> dict:
        m = self.model
        image = image_features(m.vision_model, batch["pixel_values"], batch.get("keys"), self.cache)
        out = m.query_features(image.to(m.query_tokens.dtype), qformer_input_ids=batch["qformer_input_ids"],
                               qformer_attention_mask=batch["qformer_attention_mask"]).last_hidden_state
        queries = out[:, : m.config.num_query_tokens]  # (B, Q, D)
        soft_prompt = m.language_projection(queries)  # (B, Q, D_lm)
        embeds, mask = m.merge(soft_prompt, batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"][:, 1:]  # position t predicts label t + 1
        logits = m.language_model(embeds, mask).logits[:, -batch["labels"].shape[1]:-1]  # (B, T - 1, V)
        lm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        rows = torch.arange(len(labels))
        first = (labels != IGNORE).float().argmax(1)  # (B,) the first answer token's position
        target = labels[rows, first]
        first_loss = F.cross_entropy(logits[rows, first].float(), target, reduction="none")  # (B,)
        if self.head is None:  # query 0's input to the LM, read as a word
            extra_logits = m.language_model.lm_head(soft_prompt[:, 0])  # (B, V)
            extra = F.cross_entropy(extra_logits.float(), target)
            extra_right = extra_logits.argmax(-1) == target
        else:
            which = (target[:, None] == self.answer_ids[None]).float().argmax(1)  # (B,) index into ANSWERS
            extra_logits = self.head(queries.mean(1))  # (B, 6)
            extra = F.cross_entropy(extra_logits, which)
            extra_right = extra_logits.argmax(-1) == which
        yes_no = torch.isin(target, self.answer_ids[:2])
        nan = torch.tensor(float("nan"))
        return {"lm": lm, "extra": extra, "loss": lm + extra, "extra_acc": extra_right.float().mean(),
                "yes_no_first": first_loss[yes_no].mean() if yes_no.any() else nan,
                "direction_first": first_loss[~yes_no].mean() if (~yes_no).any() else nan}


def run_aux(args, work: Path) -> None:
    r = InstructRecipe(train_images=args.images, steps=args.steps, lr=args.lr)
    model = InstructBlipForConditionalGeneration.from_pretrained(args.model / "instruct", torch_dtype=torch.float32)
    tok = FastTokenizer.from_file(str(args.model / "instruct" / "tokenizer.json"))
    answer_ids = [tok.encode(" " + w, add_special_tokens=False).ids[0] for w in ANSWERS]  # one token each
    data = draw_images(r, "train", r.train_images)
    cache = fill_cache(model.vision_model, data.images)
    tokenize = lambda texts: [e.ids for e in tok.encode_batch(texts)]  # noqa: E731
    lm = DecoderLMCollate(tokenize, pad_id=PAD_ID, max_len=r.answer_len, text=InstructionText())
    collate = InstructionCollate(lm, tokenize, pad_id=PAD_ID, max_len=r.qformer_positions)
    cfg = trainer_config(r, work, "aux", args.steps, r.batch, args.lr)
    t = time.perf_counter()
    history = Trainer(AnswerSignal(model, cache, answer_ids, args.head), KindPairs(data, 3, args.kinds.split(","), args.plain),
                      collate, cfg).fit()
    keys = [k for k in ("lm", "extra", "extra_acc", "yes_no_first", "direction_first")
            if not np.isnan([h[k] for h in history]).all()]  # exist alone asks no direction
    width = max(1, args.steps // 8)
    for s in range(0, args.steps, width):
        chunk = history[s:s + width]
        print(f"steps {s + 1}-{s + len(chunk)}: "
              + " ".join(f"{k} {np.nanmean([h[k] for h in chunk]):.3f}" for k in keys))
    print(f"{args.steps} steps: {time.perf_counter() - t:.0f} s; load {load()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("lm", "aux"))
    p.add_argument("--model", type=Path, default=DEMO_DIR, help="the demo folder (model/, instruct/)")
    p.add_argument("--steps", type=int, default=None, help="default: 800 (lm), 320 (aux)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--docs", type=int, default=8000, help="lm: instruction documents")
    p.add_argument("--questions", type=int, default=3, help="lm: instructions per document")
    p.add_argument("--world-docs", type=int, default=4000, help="lm: the world's own documents mixed in")
    p.add_argument("--kinds", default="exist,position", help="aux: the kinds tuned on")
    p.add_argument("--head", choices=("tied", "linear"), default="tied", help="aux: how the queries are read")
    p.add_argument("--plain", action="store_true", help="aux: no negated exist phrasings")
    p.add_argument("--images", type=int, default=4000, help="aux: training images")
    p.add_argument("--scenes", type=int, default=150, help="lm: new scenes scored")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    args.steps = args.steps or (800 if args.what == "lm" else 320)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="blip2-remedies-") as work:
        (run_lm if args.what == "lm" else run_aux)(args, Path(work))


if __name__ == "__main__":
    main()
