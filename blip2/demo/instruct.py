"""The instruction-aware demo model: InstructBLIP's recipe, in miniature, on the synthetic world.

    python -m blip2.demo.instruct --out blip2/demo [--base blip2/demo] [--quick]
        [--start-from blip2/demo/instruct] [--set NAME=VALUE ...]

InstructBLIP (Dai et al., 2023) starts from a trained BLIP-2 and fine-tunes only its Q-Former,
which now reads the instruction too; the image encoder and the language model stay frozen. So
does this recipe, after `python -m blip2.demo.recipe` has made the BLIP-2 demo model:

1. Start from the shipped BLIP-2 model (`--base`/model: image encoder, Q-Former, language model,
   tokenizer) and read the instruction with the stage-1 Q-Former's text side (`--base`/retrieval:
   word and position embeddings, the text feed-forwards), as InstructBLIP's Q-Former reads it with
   BLIP-2's BERT side. The Q-Former's tokenizer is the language model's (as in stage 1); the
   shapes' plurals, which stage 1 never read, start from their singulars.
2. Train on instruction-formatted pairs (`blip2.demo.instructions`): six question kinds, several
   phrasings each, on training images of seen colour-shape pairs only. The Q-Former and the
   language model read the same prompt ("Question: ... Answer:", or a caption instruction).
   Training-only heads on the queries add a direct signal for yes/no, count and position
   (`fact_head_weight`, `answer_head_weight`; `QueryHeads`), and the kinds come in stages
   (`STAGES`): yes/no and position leave chance only when plain questions of the kind fill most
   batches first. A loss on the Q-Former's last cross-attention (`look_weight`, `look_loss`) makes
   some queries look at the shape a position question measures from: without it the model compared
   the shape asked about with the rest of the picture, whichever shape was named.
3. Once more with the instruction hidden from the Q-Former (the LM still reads it; 500 steps from
   BLIP-2): the ablation, which is BLIP-2's way.
4. Ship the model (float16, with InstructBlipProcessor's files) in `--out`/instruct, load it back
   and score it, the BLIP-2 model and the ablation per kind, in seen and unseen wordings, on new
   images of seen pairs and on held-out pairs; pick the captioner on validation images; append
   the figures to `--out`/REPORT.md's instruct section (written to `--out`/INSTRUCT_REPORT.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..config import InstructBlipConfig
from ..hf_compat import Blip2ForConditionalGeneration
from ..io import atomic_write_text
from ..instructblip import InstructBlipForConditionalGeneration
from ..processing import Blip2ImageProcessor, InstructBlipProcessor, Tokenizer
from ..retrieval import Blip2ForImageTextRetrieval
from ..train.data import DecoderLMCollate, InstructionCollate
from ..train.frozen import FeatureCache, image_features
from ..train.loop import Trainer
from ..train.stage2 import Stage2Objective
from . import evaluate, instructions, world
from .pretrain import to_pixels
from .recipe import Timer, apply_sets, draw_images, idle_cores, log, trainer_config
from .tokenizer import PAD_ID

INSTRUCT_DIR_NAME = "instruct"
# What the training-only heads on the queries tell apart by default (`QueryHeads`; recipe `head_answers`).
HEAD_ANSWERS = ("yes", "no", "left", "right", "above", "below")

# The default schedule, one run from BLIP-2 (REPORT.md says why each stage is there): every kind at
# the higher rate; then yes/no-heavy rows (exist four times in ten) plain, then with their negations
# brought in; position the same way; count-heavy rows; every kind again.
_YES_NO = "exist+exist+exist+exist+colour+shape+count+count+describe"
_POSITION = "position+position+position+position+exist+colour+shape+count+count+describe"
_COUNT = "count+count+count+count+exist+exist+position+colour+shape+describe"
STAGES = ",".join(["all:2000@0.001", f"{_YES_NO}/plain:800", f"{_YES_NO}/neg0.2:400", f"{_YES_NO}/neg0.5:600",
                   f"{_POSITION}/plain:1200", f"{_POSITION}/neg0.2:300", f"{_POSITION}/neg0.5:500",
                   f"{_COUNT}/mix:800", "all:800"])


@dataclass
class InstructRecipe:
    """Sizes and schedules; `QUICK` shrinks them for CI."""

    seed: int = 0
    train_images: int = 12000  # seen colour-shape pairs only, as for BLIP-2's stages
    image_size: int = 64
    steps: int = 3000  # without stages; with them, their sum
    batch: int = 64
    lr: float = 3e-4  # a stage's own @LR wins
    describe_share: float = 0.1  # of the instructions; a caption has five times an answer's tokens
    ablation_steps: int = 500  # 0: as many as `steps`
    grad_clip: float = 20.0
    qformer_positions: int = 64  # instruction tokens the Q-Former reads (stage 1 read 32)
    answer_len: int = 64  # language-model tokens of prompt and answer
    eval_per_kind: int = 100  # questions per kind, split and wording
    eval_scenes: int = 200  # captioned images per split
    ablation: bool = True
    save_dtype: str = "float16"
    # Training-only heads on the queries (not exported): 0 leaves the language-model loss alone.
    fact_head_weight: float = 1.0  # a head learns the fact asked (yes/no: is it there; position: the true relation)
    answer_head_weight: float = 1.0  # another learns the answer (a negated question's fact, flipped)
    # Some queries look at a position question's two shapes (`look_loss`): it made the shipped chain read the
    # second shape; in the one-run schedule, where position has not left chance, it did not help (REPORT.md).
    look_weight: float = 0.0
    head_answers: str = ",".join(HEAD_ANSWERS)  # the words the heads tell apart; rows with none are left out
    # "" trains `steps` on the mix above; else stages, each with its own warm-up and cosine
    # schedule (`parse_stages`), and `steps` becomes their sum.
    stages: str = STAGES
    # A run that continues a model made before `from_blip2` copied the plurals' rows: copy them first.
    plurals_from_singulars: bool = False


QUICK = InstructRecipe(train_images=256, steps=20, batch=16, eval_per_kind=8, eval_scenes=16, stages="",
                       ablation_steps=0)


# ---------------------------------------------------------------- 1. the model
def instruct_config(base: Blip2ForConditionalGeneration, positions: int) -> InstructBlipConfig:
    c = base.config
    qformer = c.qformer_config.to_dict()
    qformer.pop("use_qformer_text_input", None)  # always on for InstructBLIP
    qformer["max_position_embeddings"] = positions
    return InstructBlipConfig(vision_config=c.vision_config.to_dict(), qformer_config=qformer,
                              text_config=c.text_config.to_dict(), num_query_tokens=c.num_query_tokens)


@torch.no_grad()
def plurals_from_singulars(model: InstructBlipForConditionalGeneration, tok) -> list[str]:
    """Set the Q-Former's word rows of the shapes' plurals ("circles") to their singulars' rows; the
    plurals copied. Stage 1 read only captions, which never use a plural, so those rows are still
    random, and "how many circles are there?" could not say which shape it counts (the model said
    "one" to all of them). InstructBLIP's Q-Former starts from BERT, which has read both forms."""
    table = model.qformer.embeddings.word.weight  # (vocab, D)
    copied = []
    for shape in world.SHAPES:
        one = tok.encode(" " + shape, add_special_tokens=False).ids
        many = tok.encode(f" {shape}s", add_special_tokens=False).ids
        if len(one) == 1 and len(many) == 1:  # whole words in this vocabulary; else there is no row to copy
            table[many[0]] = table[one[0]]
            copied.append(f"{shape}s")
    return copied


@torch.no_grad()
def from_blip2(base: Blip2ForConditionalGeneration, retrieval: Blip2ForImageTextRetrieval,
               positions: int, tok) -> InstructBlipForConditionalGeneration:
    """InstructBLIP from the BLIP-2 model (everything it has) and the stage-1 model's text side
    (what reads the instruction). Position rows beyond stage 1's repeat its last one; the shapes'
    plurals start from their singulars (`plurals_from_singulars`)."""
    model = InstructBlipForConditionalGeneration(instruct_config(base, positions))
    model.generation_config = copy.deepcopy(base.generation_config)
    have = base.state_dict()
    text = {("qformer." + k if k.startswith("embeddings.") else k): v for k, v in retrieval.state_dict().items()}
    state = {}
    for key, value in model.state_dict().items():
        source = have.get(key, text.get(key))
        if source is None:
            raise ValueError(f"neither the BLIP-2 model nor the retrieval model has {key}")
        if source.shape != value.shape:  # the longer position table
            rows = source.shape[0]
            source = torch.cat([source, source[-1:].expand(value.shape[0] - rows, -1)])
        state[key] = source.float()
    model.load_state_dict(state)
    plurals_from_singulars(model, tok)
    return model.eval()


# ---------------------------------------------------------------- 2. the data
def patch_masks(scene: world.Scene, named: tuple[int, ...], grid: int, size: int = 64) -> np.ndarray:
    """(len(named), 1 + grid * grid) float32: 1 on the image encoder's tokens whose patch shows the named shape
    (a tenth of the patch or more; its best patch at least), 0 elsewhere and on the class token (first)."""
    drawn = world.object_map(scene, size)  # (size, size): 0 background, k + 1 shape k
    cell = size // grid
    out = np.zeros((len(named), 1 + grid * grid), np.float32)
    for row, k in enumerate(named):
        cover = (drawn[:grid * cell, :grid * cell] == k + 1).reshape(grid, cell, grid, cell).mean((1, 3)).reshape(-1)
        out[row, 1:] = cover >= min(0.1, cover.max()) if cover.max() > 0 else 0
    return out


class InstructionPairs(Dataset):
    """Training images with one instruction each, drawn afresh every time (kind, phrasing, target).
    `grid`: the image encoder's patches per side, for the named shapes' patches (`patch_masks`); 0: none."""

    def __init__(self, data, seed: int, describe_share: float, grid: int = 4) -> None:
        self.data, self.describe_share, self.grid = data, describe_share, grid
        self.rng = random.Random(seed)

    def looks(self, i: int, ins: instructions.Instruction) -> np.ndarray | None:
        return patch_masks(self.data.scenes[i], ins.named, self.grid) if ins.named and self.grid else None

    def __len__(self) -> int:
        return len(self.data.scenes)

    def __getitem__(self, i: int) -> dict:
        scene = self.data.scenes[i]
        # The loss is a mean over tokens: descriptions, left as common as the one-word kinds,
        # would hold most of it. So they are asked less often.
        kinds = [k for k in instructions.KINDS if k != "describe"]
        kind = "describe" if self.rng.random() < self.describe_share else self.rng.choice(kinds)
        ins = instructions.instruction(scene, kind, self.rng, "seen")
        if ins is None:  # e.g. one shape, no position question: a kind every scene allows
            ins = instructions.instruction(scene, self.rng.choice(["count", "exist"]), self.rng)
        return {"key": f"train/{i}", "pixel_values": to_pixels(self.data.images[i:i + 1])[0],
                "prompt": ins.prompt, "answer": ins.answer, "fact": instructions.fact(ins), "looks": self.looks(i, ins)}


# The kinds with a form whose answer is not its fact (`instructions.is_indirect`): a stage sets its share.
INDIRECT_KINDS = ("exist", "position")


def row_kind(ins: instructions.Instruction) -> str:
    """The kind, with the indirect forms apart: "not-exist" (negated), "position-yes/no"."""
    if instructions.is_negated(ins):
        return "not-exist"
    return "position-yes/no" if instructions.is_yes_no_position(ins) else ins.kind


class StagePairs(InstructionPairs):
    """A stage's instructions: one of `kinds` per image (describe at the recipe's share if among them),
    with its kind (`row_kind`). `negation` sets the share of the indirect forms, whose answer is not
    their fact (a negated exist phrasing, position's yes/no form), in the exist and position rows:
    "mix" the templates' share (exist 4 of 10, position 2 of 6), "plain" none (plain existence, the
    direction asked), "only" nothing else, "negF" (e.g. neg0.2) a share F, to bring them in gradually."""

    def __init__(self, data, seed: int, kinds: list[str], negation: str, describe_share: float, grid: int = 4) -> None:
        super().__init__(data, seed, describe_share if "describe" in kinds else 0.0, grid)
        self.kinds, self.negation = [k for k in kinds if k != "describe"], negation
        self.neg_share = {"plain": 0.0, "only": 1.0}.get(negation, float(negation[3:]) if negation.startswith("neg") else None)

    def __getitem__(self, i: int) -> dict:
        kind = "describe" if self.rng.random() < self.describe_share else self.rng.choice(self.kinds)
        want_indirect = kind in INDIRECT_KINDS and self.neg_share is not None and self.rng.random() < self.neg_share
        while True:
            ins = instructions.instruction(self.data.scenes[i], kind, self.rng)
            wrong_form = ins is not None and ins.kind in INDIRECT_KINDS and self.neg_share is not None and \
                instructions.is_indirect(ins) != want_indirect
            if ins is None or wrong_form:  # another image (position needs two shapes), the kind and form kept
                i = self.rng.randrange(len(self.data.scenes))
                continue
            return {"key": f"train/{i}", "pixel_values": to_pixels(self.data.images[i:i + 1])[0],
                    "prompt": ins.prompt, "answer": ins.answer, "fact": instructions.fact(ins), "kind": row_kind(ins),
                    "looks": self.looks(i, ins)}


def is_share(negation: str) -> bool:
    """"neg0.2": the indirect form (a negated phrasing, position's yes/no) on 20% of the exist and position rows."""
    try:
        return negation.startswith("neg") and 0.0 <= float(negation[3:]) <= 1.0
    except ValueError:
        return False


class Stage(NamedTuple):
    kinds: list[str]
    negation: str
    steps: int
    lr: float | None = None  # None: the recipe's `lr`


def stage_lr(text: str) -> float:
    """"0.001" -> 0.001; anything that is not a number above 0 raises ValueError."""
    lr = float(text)
    if not lr > 0:
        raise ValueError(text)
    return lr


def parse_stages(text: str) -> list[Stage]:
    """"exist/plain:800,exist/neg0.2:400,all:600@0.001" -> [Stage(kinds, negation, steps, lr), ...]:
    KINDS joined by "+" ("all": every kind, the recipe's mix), /plain|/mix|/only|/negF (default mix),
    :STEPS, and @LR for a learning rate of the stage's own (default the recipe's `lr`)."""
    stages = []
    for part in filter(None, text.split(",")):
        what, _, steps = part.partition(":")
        steps, at, lr_text = steps.partition("@")
        kinds, _, negation = what.partition("/")
        kinds = list(instructions.KINDS) if kinds == "all" else kinds.split("+")
        unknown = [k for k in kinds if k not in instructions.KINDS] + \
            ([negation] if negation not in ("", "plain", "mix", "only") and not is_share(negation) else [])
        try:
            lr = stage_lr(lr_text) if at else None
        except ValueError:
            lr, unknown = None, [*unknown, lr_text or "@"]
        if unknown or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"stage {part!r}: expected KINDS[/plain|/mix|/only|/negF]:STEPS[@LR] with kinds "
                             f"from {instructions.KINDS} or all")
        stages.append(Stage(kinds, negation or "mix", int(steps), lr))
    return stages


def head_answers(r: InstructRecipe) -> tuple[str, ...]:
    """The heads' words, checked: each an answer some instruction has (e.g. add the numbers for count)."""
    words = tuple(w.strip() for w in r.head_answers.split(",") if w.strip())
    known = {"yes", "no", *instructions.RELATIONS, *world.NUMBERS, *world.COLOURS, *world.SHAPES}
    if len(words) < 2 or len(set(words)) != len(words) or not set(words) <= known:
        raise ValueError(f"head_answers={r.head_answers!r}: expected 2 or more distinct answer words from {sorted(known)}")
    return words


def with_stages(r: InstructRecipe) -> InstructRecipe:
    """`r` with `steps` the sum of its stages' (checked), if it has stages."""
    return replace(r, steps=sum(stage.steps for stage in parse_stages(r.stages))) if r.stages else r


class InstructionText:
    """(prompt, text to learn) for `DecoderLMCollate`: the answer after the prompt, then OPT's end."""

    def __call__(self, example: dict) -> tuple[str, str]:
        prompt = example["prompt"]
        return prompt, (" " if prompt else "") + example["answer"] + "\n"


class HiddenInstruction(InstructionCollate):
    """The ablation: the Q-Former reads an empty instruction (its start token alone), so its queries
    cannot depend on the question, as in BLIP-2; the language model still reads the whole prompt."""

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        batch["qformer_input_ids"], batch["qformer_attention_mask"] = _ids(self.tokenize([""] * len(examples)))
        return batch


def _ids(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    ids = torch.tensor(rows)
    return ids, torch.ones_like(ids)


# Yes/no and position answers sit near chance under the language-model loss alone: the frozen LM
# does not look the answer up, and the Q-Former gains nothing from binding the question's words to
# the image until the LM also follows (REPORT.md). Heads on the queries give that binding a
# gradient of its own. They are training-only: the model that ships has none.
class HeadTargets:
    """A batch plus, per row, the indices in `answers` of its fact and its answer (-1: neither, e.g. a colour)."""

    def __init__(self, collate, answers: tuple[str, ...] = HEAD_ANSWERS) -> None:
        self.collate, self.answers = collate, answers

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        for key, field in (("facts", "fact"), ("answers", "answer")):
            batch[key] = torch.tensor([self.answers.index(e[field]) if e[field] in self.answers else -1
                                       for e in examples])
        shaped = next((e["looks"] for e in examples if e.get("looks") is not None), None)
        if shaped is not None:  # (B, 2, N): a's and b's tokens; zeros where a row names no two shapes
            batch["looks"] = torch.from_numpy(np.stack([np.zeros_like(shaped) if e.get("looks") is None else e["looks"]
                                                        for e in examples]))
        return batch


def head_loss(head: torch.nn.Linear, queries: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(cross-entropy, accuracy) of a head on the mean query output (queries: (B, Q, D)), over the rows
    with a target (targets: (B,) indices into the head's answers, -1: none)."""
    asked = targets >= 0  # (B,)
    if not asked.any():
        return torch.zeros(()), torch.tensor(float("nan"))
    logits = head(queries[asked].mean(1))  # (b, answers)
    return F.cross_entropy(logits, targets[asked]), (logits.argmax(-1) == targets[asked]).float().mean()


# The queries whose last cross-attention the look loss points at a's patches, and at b's (`look_loss`). The
# last: there every query of the 12800-step model looked at a (62% of its attention, b 2%); the first
# one, before the Q-Former has read which named shape is which, looks at both alike.
LOOK_QUERIES = (slice(0, 4), slice(4, 8))


def look_loss(cross: Tensor, looks: Tensor) -> Tensor:
    """Minus the log of the attention share (mean over heads) the first LOOK_QUERIES give a's patches, and
    the second b's: cross (B, H, Q, N), the last cross-attention's weights; looks (B, 2, N) from
    `patch_masks`, zero rows where no two shapes are named. The model answered a's relation to the
    other shapes' middle, whichever b was named (REPORT.md): this makes some queries find b."""
    asked = looks.sum(-1).gt(0).all(-1)  # (B,)
    if not asked.any():
        return torch.zeros(())
    weights = cross[asked].float().mean(1)  # (b, Q, N)
    share = [(weights[:, group] * target[:, None]).sum(-1) for group, target in zip(LOOK_QUERIES, looks[asked].unbind(1))]
    return -torch.stack(share).clamp_min(1e-6).log().mean()


class QueryHeads(Stage2Objective):
    """The language-model loss plus `fact_weight` x a fact head's loss and `answer_weight` x an
    answer head's loss (`head_loss`). The fact alone leaves the XOR with a negation to the frozen
    LM, which does not do it; the answer alone gives neither half (is it there, is it negated) a
    lower loss at first, so both."""

    def __init__(self, model, cache: FeatureCache, fact_weight: float, answer_weight: float,
                 answers: int = len(HEAD_ANSWERS), look_weight: float = 0.0) -> None:
        super().__init__(model, feature_cache=cache)
        width = model.config.qformer_config.hidden_size
        self.fact_head = torch.nn.Linear(width, answers)
        self.answer_head = torch.nn.Linear(width, answers)
        self.fact_weight, self.answer_weight, self.look_weight = fact_weight, answer_weight, look_weight

    def forward(self, batch: dict, step: int) -> dict[str, Tensor]:
        out = self.query_output(batch, need_weights=bool(self.look_weight))
        lm, queries = self.language_loss(batch, out)
        fact, fact_acc = head_loss(self.fact_head, queries, batch["facts"])
        answer, answer_acc = head_loss(self.answer_head, queries, batch["answers"])
        look = look_loss(out.cross_attentions[-1], batch["looks"]) if self.look_weight and "looks" in batch \
            else torch.zeros(())
        return {"lm": lm, "fact": fact.detach(), "fact_acc": fact_acc, "answer": answer.detach(),
                "answer_acc": answer_acc, "look": look.detach(),
                "loss": lm + self.fact_weight * fact + self.answer_weight * answer + self.look_weight * look}


def train(r: InstructRecipe, model: InstructBlipForConditionalGeneration, data, tok, cache: FeatureCache,
          work: Path, name: str, hide: bool = False) -> InstructBlipForConditionalGeneration:
    tokenize = lambda texts: [e.ids for e in tok.encode_batch(texts)]  # noqa: E731
    lm = DecoderLMCollate(tokenize, pad_id=PAD_ID, max_len=r.answer_len, text=InstructionText())
    collate = (HiddenInstruction if hide else InstructionCollate)(lm, tokenize, pad_id=PAD_ID,
                                                                  max_len=r.qformer_positions)
    objective = Stage2Objective(model, feature_cache=cache)
    if (r.fact_head_weight or r.answer_head_weight or r.look_weight) and not hide:  # a hidden instruction names no fact
        answers = head_answers(r)
        collate = HeadTargets(collate, answers)
        objective = QueryHeads(model, cache, r.fact_head_weight, r.answer_head_weight, len(answers), r.look_weight)
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size if r.look_weight and not hide else 0  # no look loss: no masks drawn
    if hide or not r.stages:
        runs = [(name, InstructionPairs(data, r.seed + (7 if hide else 3), r.describe_share, grid),
                 (r.ablation_steps or r.steps) if hide else r.steps, r.lr)]
    else:  # each stage from the last one's weights and heads
        runs = [(f"{name}-stage{n + 1}", StagePairs(data, r.seed + 11 + n, kinds, negation, r.describe_share, grid),
                 steps, lr or r.lr) for n, (kinds, negation, steps, lr) in enumerate(parse_stages(r.stages))]
    for stage, pairs, steps, lr in runs:
        if isinstance(objective, QueryHeads):  # a plain stage's answers are its facts: no second head there
            objective.answer_weight = 0.0 if getattr(pairs, "neg_share", None) == 0.0 else r.answer_head_weight
        cfg = trainer_config(r, work, stage, steps, r.batch, lr)
        hidden = " (hidden from the Q-Former)" if hide else ""
        log(f"{stage}: {steps} steps of {r.batch} instructions at lr {lr:g}{hidden}"
            + (f" ({'+'.join(pairs.kinds)}, {pairs.negation})" if isinstance(pairs, StagePairs) else ""))
        history = Trainer(objective, pairs, collate, cfg).fit()
        eighth = max(1, steps // 8)  # means over the first and last eighth: one batch's figures are noisy
        heads = [k for k, on in (("fact", r.fact_head_weight), ("fact_acc", r.fact_head_weight), ("answer",
                 getattr(objective, "answer_weight", 0)), ("answer_acc", getattr(objective, "answer_weight", 0)),
                 ("look", r.look_weight))
                 if on and not hide]
        log(f"{stage}: lm loss {history[-1]['lm']:.3f}; first and last {eighth} steps: " + "; ".join(
            f"{k} {np.nanmean([h[k] for h in history[:eighth]]):.3f} -> {np.nanmean([h[k] for h in history[-eighth:]]):.3f}"
            for k in ("lm", *heads)))
    return model.eval()


def fill_cache(vision, images: np.ndarray, batch: int = 256) -> FeatureCache:
    cache = FeatureCache(dtype=torch.float16)
    with torch.no_grad():
        for start in range(0, len(images), batch):
            stop = min(start + batch, len(images))
            image_features(vision, to_pixels(images[start:stop]), [f"train/{i}" for i in range(start, stop)], cache)
    return cache


# ---------------------------------------------------------------- 3. scoring
@dataclass
class Questions:
    """Instructions about drawn scenes: images (N, S, S, 3) uint8 and (scene index, instruction) pairs."""

    scenes: list[world.Scene]
    images: np.ndarray
    asked: list[tuple[int, instructions.Instruction]]


def build_questions(split: str, per_kind: int, wording: str, image_size: int, seed: int) -> Questions:
    """`per_kind` instructions of each kind, one per scene and kind, on the first scenes of `split`."""
    scenes, images, asked = [], [], []
    counts = dict.fromkeys(instructions.KINDS, 0)
    i = 0
    while min(counts.values()) < per_kind:
        ex = world.example(split, i, seed)
        rng = random.Random(f"blip2-demo-instruct-eval/{seed}/{split}/{wording}/{i}")
        scenes.append(ex.scene)
        images.append(evaluate.resized(ex.image, image_size))
        for ins in instructions.instructions(ex.scene, rng, wording):
            if counts[ins.kind] < per_kind:
                asked.append((len(scenes) - 1, ins))
                counts[ins.kind] += 1
        i += 1
    return Questions(scenes, np.stack(images), asked)


@torch.no_grad()
def answer(model, tok, pixel_values: Tensor, prompts: list[str], max_new_tokens: int, instruct: bool,
           batch: int = 64) -> list[str]:
    """Greedy answers; an InstructBLIP model's Q-Former reads the prompt too (right-padded)."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        ids, mask = evaluate.left_padded(tok, chunk)
        extra = {}
        if instruct:
            extra["qformer_input_ids"], extra["qformer_attention_mask"] = _right_padded(tok, chunk)
        new = model.generate(pixel_values=pixel_values[start:start + batch], input_ids=ids, attention_mask=mask,
                             max_new_tokens=max_new_tokens, num_beams=1, do_sample=False, **extra)
        out += [t.strip() for t in tok.decode_batch(new.tolist(), skip_special_tokens=True)]
    return out


def _right_padded(tok, texts: list[str]) -> tuple[Tensor, Tensor]:
    from ..train.data import pad

    rows = [e.ids for e in tok.encode_batch(texts)]
    return pad(rows, PAD_ID, max(len(s) for s in rows))


def per_kind(model, tok, qs: Questions, instruct: bool, hide: bool = False) -> dict[str, float]:
    """Accuracy per kind. BLIP-2 (instruct False) reads each instruction in the VQA template as the
    LM's prompt; `hide` gives the Q-Former an empty instruction (the ablation)."""
    hits: dict[str, list[bool]] = {kind: [] for kind in instructions.KINDS}
    for long in (False, True):  # one-word answers, then descriptions (more tokens)
        chosen = [(i, ins) for i, ins in qs.asked if (ins.kind == "describe") == long]
        if not chosen:
            continue
        pixels = to_pixels(qs.images[[i for i, _ in chosen]])
        prompts = [ins.prompt for _, ins in chosen]
        said = answer(model, tok, pixels, prompts, 40 if long else 6, instruct) if not hide else \
            answer_hidden(model, tok, pixels, prompts, 40 if long else 6)
        for (i, ins), text in zip(chosen, said):
            hits[ins.kind].append(instructions.is_right(ins, text, qs.scenes[i]))
    return {kind: float(np.mean(h)) for kind, h in hits.items() if h}


@torch.no_grad()
def answer_hidden(model, tok, pixel_values: Tensor, prompts: list[str], max_new_tokens: int) -> list[str]:
    out = []
    for start in range(0, len(prompts), 64):
        chunk = prompts[start:start + 64]
        ids, mask = evaluate.left_padded(tok, chunk)
        q_ids, q_mask = _ids([e.ids for e in tok.encode_batch([""] * len(chunk))])
        new = model.generate(pixel_values=pixel_values[start:start + 64], input_ids=ids, attention_mask=mask,
                             qformer_input_ids=q_ids, qformer_attention_mask=q_mask,
                             max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        out += [t.strip() for t in tok.decode_batch(new.tolist(), skip_special_tokens=True)]
    return out


def caption_accuracy(model, tok, ev: evaluate.EvalSet, instruct: bool) -> float:
    """Caption accuracy as the base recipe scores it; the instruct model gets `blip2 caption`'s instruction."""
    prompt = instructions.CAPTION_PROMPT if instruct else ""
    texts = answer(model, tok, to_pixels(ev.images), [prompt] * len(ev.scenes), 40, instruct)
    return float(np.mean([world.caption_correct(t, s) for t, s in zip(texts, ev.scenes)]))


# ---------------------------------------------------------------- 4. export and report
def export(r: InstructRecipe, model: InstructBlipForConditionalGeneration, base_dir: Path, folder: Path) -> None:
    """Weights (save_dtype), configs and InstructBlipProcessor's files (the Q-Former's tokenizer is the LM's)."""
    shutil.rmtree(folder, ignore_errors=True)
    copy.deepcopy(model).to(getattr(torch, r.save_dtype)).save_pretrained(folder)
    processor = InstructBlipProcessor(Blip2ImageProcessor.from_pretrained(base_dir), Tokenizer.from_pretrained(base_dir),
                                      Tokenizer.from_pretrained(base_dir, model_max_length=r.qformer_positions))
    processor.save_pretrained(folder)


MARKER = "<!-- the instruction-aware model: written by python -m blip2.demo.instruct -->"
NAMES = {"blip2": "BLIP-2 (shipped model/, Q-Former without the instruction, not tuned on these)",
         "hidden": "ablation: {hidden} steps from BLIP-2, language-model loss only, instruction hidden from the Q-Former",
         "instruct": "InstructBLIP (shipped instruct/), {steps} steps"}


def continued(scores: dict) -> list[str]:
    """The report's line on a run that continued earlier ones (`--start-from`), if this was one."""
    before = scores.get("continued_from")
    if not before:
        return []
    steps, minutes, runs = before.get("steps"), before.get("minutes"), before.get("runs", 1)
    if steps is None or minutes is None:
        return ["", "This run continued the Q-Former of an earlier run of this recipe (`--start-from`)."]
    earlier = "an earlier run" if runs == 1 else f"{runs} earlier runs"
    return ["", f"This run continued the Q-Former of {earlier} of this recipe (`--start-from`; {steps} steps, "
                f"{minutes:.1f} minutes): {steps + scores['settings']['steps']} steps and "
                f"{minutes + scores['minutes']:.1f} minutes in all, each run with its own warm-up and cosine schedule."]


def stages_sentence(r: dict) -> str:
    """The report's words on the stages, if the run had any."""
    if not r.get("stages"):
        return ""
    parts = [f"{steps} steps of {'every kind' if len(kinds) == len(instructions.KINDS) else '+'.join(kinds)} "
             f"({negation}{f', lr {lr:g}' if lr else ''})" for kinds, negation, steps, lr in parse_stages(r["stages"])]
    return (" In stages, each from the last one's weights with its own warm-up and cosine schedule (negated exist "
            "phrasings and position's yes/no form: mix, the templates' share; plain, none; negF, a share F of the "
            "exist and position rows): "
            + "; ".join(parts) + (". No answer head in plain stages (their answers are their facts)."
                                  if r.get("answer_head_weight") else "."))


HEAD_WORDS = {"fact_head_weight":
              "the fact asked (is the thing there, in a count of one kind too; where is a relative to b)",
              "answer_head_weight": "the answer"}


def heads_sentence(r: dict) -> str:
    """The report's words on the training-only heads, if any were trained."""
    heads = [f"{what}, weight {r[key]}" for key, what in HEAD_WORDS.items() if r.get(key)]
    words = r.get("head_answers", ",".join(HEAD_ANSWERS)).split(",")
    look = (f" A loss on the last cross-attention (weight {r['look_weight']}) pointed queries 1-4 at the shape a position "
            "question asks about (a) and queries 5-8 at the one it measures from (b) (`look_loss`).") if r.get("look_weight") else ""
    return (f" Beside the language-model loss, a {len(words)}-way head on the mean query output ({', '.join(words)}; "
            "training only, not shipped) learned " + "; another ".join(heads) + "." if heads else "") + look


def command(scores: dict, quick: bool) -> str:
    """The command that made the shipped model: every setting that differs from the default, as `--set`."""
    default = asdict(QUICK if quick else InstructRecipe())
    sets = "".join(f" --set {k}={str(v).lower() if isinstance(v, bool) else v}"
                   for k, v in scores["settings"].items()
                   if v != default.get(k) and not (k == "steps" and scores["settings"].get("stages")))  # their sum
    start = " --start-from blip2/demo/instruct" if scores.get("continued_from") else ""
    return f"python -m blip2.demo.instruct --out blip2/demo{' --quick' if quick else ''}{start}{sets}"


def report(scores: dict, quick: bool) -> str:
    """The instruct section of REPORT.md."""
    kinds = instructions.KINDS
    r = scores["settings"]
    lines = [
        MARKER,
        "## The instruction-aware model (InstructBLIP)",
        "",
        f"`{command(scores, quick)}` (seed {r['seed']}, "
        f"{scores['threads']} threads, load average {scores['load']}): {scores['minutes']:.1f} minutes, after the "
        "BLIP-2 recipe above. It starts from the shipped BLIP-2 model and tunes only the Q-Former, which "
        "reads the instruction (the stage-1 Q-Former's text side reads it at the start); the image encoder "
        f"and the language model stay frozen. {r['steps']} steps of {r['batch']} instructions on "
        f"{r['train_images']} training images of seen pairs; six kinds, several phrasings each "
        "(`blip2.demo.instructions`); the unseen wordings are phrasings held out of training."
        + stages_sentence(r) + heads_sentence(r),
        *continued(scores),
        "",
        "VQA: exact match (greedy; the question in `Question: {} Answer:`, which the Q-Former reads too); "
        "describe: every shape named with its colour. Test: new images of seen pairs; held-out: images "
        f"holding a pair no training image held. {r['eval_per_kind']} questions per kind and cell.",
        "",
        "| model | images | wording | " + " | ".join(kinds) + " |",
        "|---|---|---|" + "---|" * len(kinds),
    ]
    rows = [(NAMES[name].format(steps=r["steps"] + ((scores.get("continued_from") or {}).get("steps") or 0),
                                hidden=r["ablation_steps"] or r["steps"]), cells)
            for name, cells in scores["vqa"].items()]
    carried = (scores.get("continued_from") or {}).get("ablation")
    if "hidden" not in scores["vqa"] and carried:  # the ablation starts from BLIP-2, so an earlier run's still holds
        rows.append((NAMES["hidden"].format(hidden=carried["steps"]) + " (an earlier run of this chain)", carried["vqa"]))
    for label, cells in rows:
        for cell, acc in cells.items():
            split, wording = cell.split("/")
            lines.append(f"| {label} | {split} | {wording} | "
                         + " | ".join(f"{acc.get(k, float('nan')):.1%}" for k in kinds) + " |")
    cap, val = scores["captions"], scores["validation_captions"]
    lines += [
        "",
        f"Captions (BLIP-2: no prompt; InstructBLIP: `{instructions.CAPTION_PROMPT}`), {r['eval_scenes']} images: "
        f"BLIP-2 test {cap['test']['blip2']:.1%}, held-out {cap['heldout']['blip2']:.1%}; InstructBLIP test "
        f"{cap['test']['instruct']:.1%}, held-out {cap['heldout']['instruct']:.1%}. On validation images of seen "
        f"pairs (another seed): BLIP-2 {val['blip2']:.1%}, InstructBLIP {val['instruct']:.1%}: `blip2 caption` "
        f"uses {'the instruction-aware model' if scores['captioner'] == 'instruct' else 'the BLIP-2 model'}.",
        "",
        f"Shipped size of instruct/: {scores['size_mb']:.1f} MB ({r['save_dtype']}).",
        "",
        "Wall time per stage (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in scores["stages_s"].items()) + ".",
        "",
        "Settings: `" + json.dumps(r) + "`",
        "",
    ]
    return "\n".join(lines)


def earlier_run(checkpoint: Path) -> dict:
    """Steps, minutes and runs that made `checkpoint`, from the instruct_scores.json beside it (which
    holds the runs it continued in turn), for the report; None where unknown."""
    found = checkpoint.parent / "instruct_scores.json"
    if not found.is_file():
        return {"steps": None, "minutes": None, "runs": 1}
    earlier = json.loads(found.read_text(encoding="utf-8"))
    before = earlier.get("continued_from") or {"steps": 0, "minutes": 0.0, "runs": 0}
    ablation = ablation_of(earlier)
    out = {"steps": None, "minutes": None, "runs": 1 + before.get("runs", 1)}
    if before.get("steps") is not None and before.get("minutes") is not None:
        out.update(steps=earlier["settings"]["steps"] + before["steps"], minutes=earlier["minutes"] + before["minutes"])
    return {**out, "ablation": ablation} if ablation else out


def ablation_of(scores: dict) -> dict | None:
    """{"steps", "vqa"} of the ablation the run behind `scores` trained, else the one it carried from the
    runs it continued (a continuation may skip it: `ablation=false`); None if there was none."""
    hidden = scores.get("vqa", {}).get("hidden")
    if hidden:
        settings = scores["settings"]
        return {"steps": settings.get("ablation_steps") or settings["steps"], "vqa": hidden}
    return (scores.get("continued_from") or {}).get("ablation")


def write_report(out: Path, text: str) -> None:
    """Replaces the instruct section of out/REPORT.md (everything from MARKER on), keeping the rest."""
    path = out / "REPORT.md"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    kept = old.split(MARKER)[0].rstrip("\n")
    atomic_write_text(path, (kept + "\n\n" if kept else "") + text)


def run(r: InstructRecipe, base: Path, out: Path, work: Path, quick: bool = False,
        start_from: Path | None = None) -> dict:
    """The recipe; `start_from` (an instruct checkpoint) continues its tuning instead of starting from BLIP-2."""
    r = with_stages(r)
    head_answers(r)  # a bad setting stops here, not after the world is drawn
    torch.manual_seed(r.seed)
    timer = Timer()
    t = time.perf_counter()
    blip2 = Blip2ForConditionalGeneration.from_pretrained(base / "model", torch_dtype=torch.float32).eval()
    retrieval = Blip2ForImageTextRetrieval.from_pretrained(base / "retrieval", torch_dtype=torch.float32)
    from tokenizers import Tokenizer as FastTokenizer

    tok = FastTokenizer.from_file(str(base / "model" / "tokenizer.json"))
    data = draw_images(r, "train", r.train_images)
    cache = fill_cache(blip2.vision_model, data.images)
    timer.stage("world and features", t)

    models = {}
    t = time.perf_counter()
    start = from_blip2(blip2, retrieval, r.qformer_positions, tok) if start_from is None else \
        InstructBlipForConditionalGeneration.from_pretrained(start_from, torch_dtype=torch.float32)
    if start_from is not None and r.plurals_from_singulars:
        log(f"copied the Q-Former's rows of {', '.join(plurals_from_singulars(start, tok))} from their singulars")
    start.config.name_or_path = ""  # the shipped config names no folder of this machine
    models["instruct"] = train(r, start, data, tok, cache, work, "instruct")
    timer.stage("instruction tuning", t)
    if r.ablation:
        t = time.perf_counter()
        models["hidden"] = train(r, from_blip2(blip2, retrieval, r.qformer_positions, tok), data, tok, cache, work,
                                 "hidden", hide=True)
        timer.stage("ablation (instruction hidden from the Q-Former)", t)

    t = time.perf_counter()
    folder = out / INSTRUCT_DIR_NAME
    export(r, models["instruct"], base / "model", folder)
    shipped = InstructBlipForConditionalGeneration.from_pretrained(folder)  # score what ships, from its files
    scores: dict = {"vqa": {}, "captions": {}}
    runs = {"blip2": (blip2, False, False), "instruct": (shipped, True, False)}
    if "hidden" in models:
        runs["hidden"] = (models["hidden"], True, True)
    for split in ("test", "heldout"):
        for wording in instructions.WORDINGS:
            qs = build_questions(split, r.eval_per_kind, wording, r.image_size, r.seed)
            for name, (model, instruct, hide) in runs.items():
                acc = per_kind(model, tok, qs, instruct, hide)
                scores["vqa"].setdefault(name, {})[f"{split}/{wording}"] = acc
                log(f"{name} {split} {wording}: " + "  ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    val = evaluate.build_eval_set("test", r.eval_scenes, 0, r.image_size, r.seed + 1)
    scores["validation_captions"] = {"blip2": caption_accuracy(blip2, tok, val, False),
                                     "instruct": caption_accuracy(shipped, tok, val, True)}
    scores["captioner"] = max(scores["validation_captions"], key=lambda k: (scores["validation_captions"][k], k == "instruct"))
    for split in ("test", "heldout"):
        ev = evaluate.build_eval_set(split, r.eval_scenes, 0, r.image_size, r.seed)
        scores["captions"][split] = {"blip2": caption_accuracy(blip2, tok, ev, False),
                                     "instruct": caption_accuracy(shipped, tok, ev, True)}
    log(f"captions: {scores['captions']}; validation {scores['validation_captions']}; captioner {scores['captioner']}")
    timer.stage("export and evaluation", t)
    scores["stages_s"] = timer.stages
    scores["minutes"] = timer.total() / 60
    scores["threads"] = torch.get_num_threads()
    scores["size_mb"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    scores["settings"] = asdict(r)
    scores["continued_from"] = None if start_from is None else earlier_run(Path(start_from))
    scores["load"] = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    atomic_write_text(out / "instruct_scores.json", json.dumps(scores, indent=2) + "\n")
    write_report(out, report(scores, quick))
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2.demo.instruct", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="where instruct/ and instruct_scores.json go")
    parser.add_argument("--base", type=Path, default=None,
                        help="the BLIP-2 demo (model/ and retrieval/; default: the shipped one)")
    parser.add_argument("--quick", action="store_true", help="the short CI version")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the idle cores)")
    parser.add_argument("--start-from", type=Path, default=None,
                        help="an instruct/ checkpoint to continue tuning (default: start from the BLIP-2 model)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a recipe field")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or idle_cores())
    r = apply_sets(QUICK if args.quick else InstructRecipe(), args.set)
    from . import DEMO_DIR

    base = args.base or DEMO_DIR
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="blip2-instruct-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        scores = run(r, base, args.out, work, args.quick, args.start_from)
    print(json.dumps({k: scores[k] for k in ("vqa", "captions", "validation_captions", "captioner", "minutes")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
