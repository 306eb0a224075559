"""Two tried remedies for the instruction-aware demo model's yes/no and position answers (issue 17).

    python bench/instruct_remedies.py lm  [--steps 800] [--lr 1e-3] [--docs 8000] [--questions 3] [--world-docs 4000] [--scenes 150]
    python bench/instruct_remedies.py aux [--steps 320] [--lr 1e-3] [--kinds exist,position] [--head tied|linear] [--plain]
    python bench/instruct_remedies.py curriculum [--stages exist/plain:1000,exist:1000,exist+position:1000,all:1500]
        [--start DIR] [--save DIR] [--aux 1.0] [--answer-aux 0.0] [--images 4000]
    python bench/instruct_remedies.py score --start DIR

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

`curriculum`: the same direct signal, stage by stage, each stage from the last one's weights
(KINDS[/plain|/mix|/only|/negF]:STEPS; plain: no negated exist phrasings and only position's direction
form, only: nothing else of exist and only position's yes/no form, neg0.2: negated phrasings and the yes/no
form on 20% of the exist and position rows;
all: every kind in the recipe's mix). The head learns the fact asked about: a negated exist
question's presence, not its answer. Printed per eighth of each stage: the losses, the head's
accuracy and the first answer token's loss per kind (not-exist: the negated phrasings; position-yes/no:
position's yes/no form, whose fact is the true relation). With
`--answer-aux W`, a second such head learns the answer itself (the fact flipped for a negated
question), weight W. `--save` keeps each stage's model and heads (direct_head.pt, loaded by a
later `--start`, and answer_head.pt).

`score`: the recipe's evaluation of a model (per kind, seen and unseen wordings, new images of seen
pairs and of held-out pairs, 100 questions each; exist also split into plain and negated phrasings,
position into its direction and yes/no forms) and the tests' independent drawings (120 per kind).

Prints its figures with the load average. Ad-hoc, for the report (blip2/demo/REPORT.md); no outputs
are kept unless `--save` asks.
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
from torch import Tensor
from tokenizers import Tokenizer as FastTokenizer

from blip2.demo import DEMO_DIR, instructions, world
from blip2.demo.instruct import (HEAD_ANSWERS, HeadTargets, InstructionPairs, InstructionText, InstructRecipe,
                                  StagePairs, export, fill_cache, head_loss, parse_stages)
from blip2.demo.pretrain import TextPretraining, TokenLines, pack, to_pixels
from blip2.demo.recipe import Recipe, copy_accuracy, draw_images, greedy_ids, trainer_config
from blip2.demo.tokenizer import PAD_ID
from blip2.hf_compat import Blip2ForConditionalGeneration
from blip2.instructblip import InstructBlipForConditionalGeneration
from blip2.train.data import DecoderLMCollate, InstructionCollate
from blip2.train.frozen import FeatureCache, image_features
from blip2.train.loop import Trainer
from blip2.train.losses import IGNORE
from blip2.train.stage2 import Stage2Objective

ANSWERS = HEAD_ANSWERS  # yes, no and the directions: what the heads on the queries tell apart


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
            elif not (self.plain and instructions.is_negated(ins)):
                break
        return {"key": f"train/{i}", "pixel_values": to_pixels(self.data.images[i:i + 1])[0],
                "prompt": ins.prompt, "answer": ins.answer}


class AnswerSignal(Stage2Objective):
    """The language-model loss plus a loss on the first answer token read off the queries."""

    def __init__(self, model, cache, answer_ids: list[int], head: str) -> None:
        super().__init__(model, feature_cache=cache)
        self.answer_ids = torch.tensor(answer_ids)
        self.head = torch.nn.Linear(model.config.qformer_config.hidden_size, len(ANSWERS)) if head == "linear" else None

    def language_pass(self, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(queries (B, Q, D), soft prompt (B, Q, D_lm), the LM loss, the first answer tokens (B,) and their losses (B,))."""
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
        return queries, soft_prompt, lm, target, first_loss

    def forward(self, batch: dict, step: int) -> dict:
        queries, soft_prompt, lm, target, first_loss = self.language_pass(batch)
        m = self.model
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


# ---------------------------------------------------------------- curriculum: the direct signal, stage by stage
# Yes/no and position stay at chance under the language-model loss alone: the frozen LM cannot
# look the answer up, and the Q-Former gains nothing from binding the question's words to the image
# until the LM also follows (REPORT.md). A 6-way head on the queries, trained on the fact asked
# about (is the thing there, where is it), gives that binding a gradient of its own; plain existence
# first. The head learns presence, not the answer, of a negated question (`instructions.fact`): the
# answer is presence XOR negation, and there neither half alone lowers a loss on the answer
# (REPORT.md); likewise a yes/no position question's fact is the true relation. The heads, their
# targets, the stages and their parser are the recipe's (`blip2.demo.instruct`).
LOGGED_KINDS = ("colour", "shape", "count", "exist", "not-exist", "position", "position-yes/no")


class KindCollate(HeadTargets):
    """The heads' batch (facts and answers as indices into ANSWERS) plus each row's kind, for the
    first answer token's loss per kind."""

    def __call__(self, examples: list[dict]) -> dict:
        return {**super().__call__(examples), "kinds": [e["kind"] for e in examples]}


class DirectSignal(AnswerSignal):
    """The language-model loss plus `weight` x a 6-way head's loss on the mean query output, on the
    rows whose fact (`fact`) is yes, no or a direction, plus `answer_weight` x a second such head's
    loss on the answer itself (a negated exist question's: the fact flipped), which asks the
    queries to hold the answer, not only the fact. Also logs the language model's loss on the
    first answer token per kind (chance: ln 2 = 0.693 for yes/no, ln 4 = 1.386 for directions)."""

    def __init__(self, model, cache: FeatureCache, weight: float, answer_weight: float = 0.0) -> None:
        super().__init__(model, cache, [], "linear")  # its head; the facts come with the batch
        self.weight, self.answer_weight = weight, answer_weight
        self.answer_head = torch.nn.Linear(self.head.in_features, len(ANSWERS))

    def forward(self, batch: dict, step: int) -> dict:
        queries, _, lm, _, first_loss = self.language_pass(batch)
        nan = torch.tensor(float("nan"))
        direct, direct_acc = head_loss(self.head, queries, batch["facts"])
        answer, answer_acc = head_loss(self.answer_head, queries, batch["answers"])
        kinds = batch["kinds"]
        firsts = {f"first_{k}": first_loss[[j for j, x in enumerate(kinds) if x == k]].mean() if k in kinds else nan
                  for k in LOGGED_KINDS}
        heads = {"answer": answer.detach(), "answer_acc": answer_acc} if self.answer_weight else {}
        return {"lm": lm, "direct": direct.detach(), "direct_acc": direct_acc, **heads,
                "loss": lm + self.weight * direct + self.answer_weight * answer, **firsts}


def stage_summary(history: list[dict], parts: int = 8) -> list[str]:
    """Means over each `parts`-th of a stage: losses, the head's accuracy, first-token losses per kind."""
    keys = [k for k in history[0] if k in ("lm", "direct", "direct_acc", "answer", "answer_acc") or k.startswith("first_")]
    keys = [k for k in keys if not np.isnan([h[k] for h in history]).all()]
    width = max(1, len(history) // parts)
    return [f"steps {s + 1}-{s + len(history[s:s + width])}: "
            + " ".join(f"{k.removeprefix('first_')} {np.nanmean([h[k] for h in history[s:s + width]]):.3f}" for k in keys)
            for s in range(0, len(history), width)]


def curriculum(r: InstructRecipe, stages: str, weight: float, model: InstructBlipForConditionalGeneration, data,
               tok, cache: FeatureCache, work: Path, head: Path | None = None,
               save: Path | None = None, answer_weight: float = 0.0) -> InstructBlipForConditionalGeneration:
    """The stages, each from the previous weights (and the head's, from `head` if given);
    with `save`, each stage's model and heads go to save/STAGE."""
    tokenize = lambda texts: [e.ids for e in tok.encode_batch(texts)]  # noqa: E731
    lm = DecoderLMCollate(tokenize, pad_id=PAD_ID, max_len=r.answer_len, text=InstructionText())
    collate = KindCollate(InstructionCollate(lm, tokenize, pad_id=PAD_ID, max_len=r.qformer_positions))
    objective = DirectSignal(model, cache, weight, answer_weight)
    if head is not None and head.is_file():
        objective.head.load_state_dict(torch.load(head))
    if head is not None and (head.parent / "answer_head.pt").is_file() and answer_weight:
        objective.answer_head.load_state_dict(torch.load(head.parent / "answer_head.pt"))
    for n, (kinds, negation, steps, _) in enumerate(parse_stages(stages)):
        name = f"stage{n + 1}-{'all' if len(kinds) == len(instructions.KINDS) else '+'.join(kinds)}-{negation}"
        cfg = trainer_config(r, work, name, steps, r.batch, r.lr)
        history = Trainer(objective, StagePairs(data, r.seed + 11 + n, kinds, negation, r.describe_share),
                          collate, cfg).fit()
        for line in [f"{name}: {steps} steps (direct-signal weight {weight}, answer head {answer_weight}), load {load()}",
                     *stage_summary(history)]:
            print(line, flush=True)
        if save is not None:
            model.eval().save_pretrained(save / name)
            torch.save(objective.head.state_dict(), save / name / "direct_head.pt")
            torch.save(objective.answer_head.state_dict(), save / name / "answer_head.pt")
    return model.eval()


def run_curriculum(args, work: Path) -> None:
    """`blip2.demo.instruct.run_curriculum` from --start (default: the shipped instruct/ model; a
    direct_head.pt beside it is loaded, and an answer_head.pt with --answer-aux), each stage's model and head saved under --save."""
    r = InstructRecipe(train_images=args.images, lr=args.lr)
    start = args.start or args.model / "instruct"
    model = InstructBlipForConditionalGeneration.from_pretrained(start, torch_dtype=torch.float32)
    tok = FastTokenizer.from_file(str(args.model / "instruct" / "tokenizer.json"))
    data = draw_images(r, "train", r.train_images)
    t = time.perf_counter()
    curriculum(r, args.stages, args.aux, model, data, tok, fill_cache(model.vision_model, data.images), work,
               start / "direct_head.pt", args.save, args.answer_aux)
    print(f"curriculum {args.stages}: {time.perf_counter() - t:.0f} s; load {load()}")


def run_score(args, work: Path) -> None:
    """The recipe's evaluation (per kind, seen and unseen wordings, test and held-out images, 100
    questions each) and the tests' independent drawings (`measure`), for an exported instruct/ folder."""
    import sys

    from blip2.demo.instruct import Questions, build_questions, per_kind

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import test_demo_instruct

    t = time.perf_counter()
    folder = args.start
    if not (folder / "tokenizer.json").is_file():  # a curriculum stage's float32 save: export it as it would ship
        folder = work / "instruct"
        export(InstructRecipe(), InstructBlipForConditionalGeneration.from_pretrained(args.start), args.model / "model", folder)
    model = InstructBlipForConditionalGeneration.from_pretrained(folder).eval()
    tok = FastTokenizer.from_file(str(folder / "tokenizer.json"))
    for split in ("test", "heldout"):
        for wording in instructions.WORDINGS:
            qs = build_questions(split, 100, wording, 64, 0)
            acc = per_kind(model, tok, qs, True)
            forms = []  # the exist and position questions again, their forms apart (right / asked)
            for kind, form, indirect in (("exist", "plain", False), ("exist", "negated", True),
                                         ("position", "direction", False), ("position", "yes/no", True)):
                asked = [(i, ins) for i, ins in qs.asked if ins.kind == kind and instructions.is_indirect(ins) == indirect]
                right = per_kind(model, tok, Questions(qs.scenes, qs.images, asked), True)[kind] * len(asked) if asked else 0
                forms.append(f"{kind} {form} {round(right)}/{len(asked)}")
            print(f"{split}/{wording}: " + "  ".join(f"{k} {v:.1%}" for k, v in acc.items())
                  + f"  ({', '.join(forms)})", flush=True)
    drawn = test_demo_instruct.measure(folder=folder)
    print("drawn by the tests (120 per kind, seed 5): " + "  ".join(f"{k} {v:.1%}" for k, v in drawn.items()))
    print(f"{time.perf_counter() - t:.0f} s; load {load()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("lm", "aux", "curriculum", "score"))
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
    p.add_argument("--stages", default="exist/plain:1000,exist:1000,exist+position:1000,all:1500",
                   help="curriculum: KINDS[/plain|/mix|/only|/negF]:STEPS,... (all: every kind, the recipe's mix)")
    p.add_argument("--aux", type=float, default=1.0, help="curriculum: the direct signal's weight")
    p.add_argument("--answer-aux", type=float, default=0.0,
                   help="curriculum: the weight of a second head, trained on the answer (0: none)")
    p.add_argument("--start", type=Path, default=None,
                   help="curriculum: the instruct model to start from (default --model/instruct; a direct_head.pt "
                        "beside it is loaded); score: the instruct model to score (exported first if need be)")
    p.add_argument("--save", type=Path, default=None, help="curriculum: where each stage's model goes")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.what == "score" and args.start is None:
        p.error("score needs --start: the instruct model to score")
    args.steps = args.steps or (800 if args.what == "lm" else 320)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="blip2-remedies-") as work:
        {"lm": run_lm, "aux": run_aux, "curriculum": run_curriculum, "score": run_score}[args.what](args, Path(work))


if __name__ == "__main__":
    main()
