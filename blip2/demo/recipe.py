"""The demo recipe: BLIP-2 the paper's way, in miniature, on the synthetic world.

    python -m blip2.demo.recipe --out DIR [--quick]

1. Draw the world: training images (seen colour-shape pairs only) and the language corpus.
2. Pretrain the halves BLIP-2 freezes: a tokenizer (byte-level BPE), an image encoder (ViT)
   and a language model (OPT), each on its own data.
3. Stage 1: the Q-Former learns ITC, ITM and ITG against the frozen image encoder.
4. Stage 2: it learns to prompt the frozen language model (captions and answers); once more
   from scratch, without stage 1, for the paper's ablation.
5. Ship the stage-2 model that captions validation images better (with or without stage 1)
   and the stage-1 model for retrieval, in the transformers format (weights, configs,
   tokenizer, processor); load them back from those files and score both stage-2 models on
   images never seen; write REPORT.md.

DIR receives model/, retrieval/, examples/ and REPORT.md. `--quick` is the CI version: the
same steps, small enough to finish in a few minutes, with no targets to meet.
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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig
from ..hf_compat import Blip2ForConditionalGeneration
from ..modeling.opt import OPTLanguageModel
from ..modeling.vision import VisionEncoder
from ..processing import Blip2ImageProcessor
from ..retrieval import Blip2ForImageTextRetrieval
from ..train.data import MEAN, STD, DecoderLMCollate, PromptedText, Stage1Collate
from ..train.frozen import FeatureCache, image_features
from ..train.loop import Trainer, TrainConfig
from ..train.stage1 import Blip2ForQFormerPretraining, Stage1Objective, Stage1Weights, init_bert_, init_qformer_
from ..train.stage2 import Stage2Objective, load_stage1_
from . import evaluate, world
from .pretrain import (
    LabelledImages, TextPretraining, TokenLines, VisionPretraining, pack, scene_labels, stack_labels, to_pixels,
)
from .tokenizer import BOS_ID, DEC_ID, PAD_ID, eos_id, save_tokenizer, train_tokenizer


@dataclass
class Recipe:
    """Sizes and schedules; `QUICK` shrinks them for CI."""

    seed: int = 0
    train_images: int = 12000  # BLIP-2's image-text pairs: seen pairs only
    pretrain_images: int = 32000  # the image encoder's: every pair
    text_docs: int = 16000
    # the image encoder
    image_size: int = 64
    patch_size: int = 16  # a 4 x 4 grid: each patch sees most of a shape; 4x cheaper than 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_steps: int = 10000  # shape comes late: per held-out shape 90% after 4000 steps, 95% after 6000, 97% after 10000
    vision_batch: int = 32
    vision_lr: float = 1e-3
    vision_mimetic: bool = True
    vision_grayscale: float = 0.3  # images shown in gray, so shape is learned apart from colour
    # the language model
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_steps: int = 1500  # copying from context appears between steps 500 and 1000; room to settle
    lm_batch: int = 32  # sequences of max_position_embeddings tokens
    lm_lr: float = 2e-3
    # the Q-Former
    # Held-out / seen-pair captions, stage 2 alone: 8 queries 43% / 67.5%, 16: 59.5% / 84%, 32: 62.5% / 86.5%;
    # after stage 1 (ITG): 16: 64% / 88.5%, 32: 57% / 90% (and stage 2 half again as long).
    queries: int = 16
    qformer_hidden: int = 128
    qformer_layers: int = 4
    cross_attention_every: int = 2  # layers (BLIP-2: 2)
    itc_width: int = 64
    stage1_steps: int = 600
    stage1_batch: int = 32
    stage1_lr: float = 5e-4
    stage2_steps: int = 1000
    stage2_batch: int = 64
    stage2_lr: float = 5e-4
    question_share: float = 0.6  # of stage 2's examples; the rest are captions
    grad_clip: float = 20.0
    text_len: int = 28  # tokens the Q-Former reads; the longest caption has fewer
    # evaluation
    eval_scenes: int = 200
    eval_per_kind: int = 100
    retrieval_images: int = 100
    ablation: bool = True
    save_dtype: str = "float16"  # halves the shipped size; loading casts back to float32


QUICK = Recipe(train_images=400, pretrain_images=400, text_docs=800, vision_steps=30, lm_steps=30, stage1_steps=20,
               stage2_steps=30, vision_batch=32, lm_batch=32, stage1_batch=32, stage2_batch=32,
               eval_scenes=16, eval_per_kind=8, retrieval_images=16)


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


class Timer:
    """Wall time per stage, for the report."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def stage(self, name: str, since: float) -> None:
        self.stages[name] = time.perf_counter() - since
        log(f"[{name}] {self.stages[name]:.0f} s (total {self.total():.0f} s)")

    def total(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------- 1. the world
@dataclass
class TrainWorld:
    scenes: list[world.Scene]
    images: np.ndarray  # (N, S, S, 3) uint8, resized as the processor resizes


def draw_images(r: Recipe, split: str, count: int) -> TrainWorld:
    scenes, images = [], []
    for i in tqdm(range(count), desc=f"draw {split}", mininterval=2):
        scene = world.sample_scene(split, i, r.seed)
        scenes.append(scene)
        images.append(evaluate.resized(world.render(scene), r.image_size))
    return TrainWorld(scenes, np.stack(images))


# ---------------------------------------------------------------- 2. the halves BLIP-2 freezes
def trainer_config(r: Recipe, work: Path, name: str, steps: int, batch: int, lr: float) -> TrainConfig:
    # Clipping only against blow-ups: these small models' gradient norms sit at 1-10 all along, and
    # clipping at 1 would quietly divide the learning rate by that much.
    return TrainConfig(out_dir=str(work / name), max_steps=steps, batch_size=batch, lr=lr, min_lr=lr / 20,
                       warmup_steps=max(1, steps // 20), weight_decay=0.05, grad_clip=r.grad_clip, seed=r.seed,
                       resume=False, keep_checkpoints=1)


def init_std(width: int) -> float:
    """1/sqrt(width): BERT's 0.02 suits its 768 wide layers; in layers this narrow it leaves the
    residual branches so weak that the image barely reaches the Q-Former's outputs at the start,
    and ITM and stage 2 sit at chance for hundreds of steps."""
    return width ** -0.5


def vision_config(r: Recipe) -> Blip2VisionConfig:
    return Blip2VisionConfig(hidden_size=r.vision_hidden, intermediate_size=4 * r.vision_hidden,
                             num_hidden_layers=r.vision_layers, num_attention_heads=4, image_size=r.image_size,
                             patch_size=r.patch_size, initializer_range=init_std(r.vision_hidden))


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """2-D sine-cosine position embeddings (as MAE starts its ViT), class token first: the patches
    know where they are from the first step, and shape is about where."""
    quarter = width // 4
    freqs = 1.0 / 100.0 ** (torch.arange(quarter) / quarter)  # (W/4,)
    ys, xs = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    parts = [f(c.flatten()[:, None] * freqs) for c in (xs, ys) for f in (torch.sin, torch.cos)]
    table = torch.cat(parts, dim=1)  # (grid*grid, W)
    return torch.cat([torch.zeros(1, width), table])[None]  # (1, 1 + grid*grid, W)


def sincos_sequence(length: int, width: int) -> torch.Tensor:
    """1-D sine-cosine positions (length, width), each row of norm 1 like the token embeddings.

    OPT learns its positions; started from these rather than at random, the language model
    learns to copy from its context (induction) early: after 1000 steps it wrote a two- or
    three-shape caption it had just read again in 100% of cases, against 38% (and, after a
    1000-step run, 4%). That reading is what the frozen model later needs for the queries."""
    half = width // 2
    freqs = 1.0 / 100.0 ** (torch.arange(half) / half)
    angles = torch.arange(length).float()[:, None] * freqs  # (length, W/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1) * (2.0 / width) ** 0.5


@torch.no_grad()
def mimetic_init_(encoder: VisionEncoder, scale: float = 1.0) -> None:
    """Queries and keys start as the identity (plus noise), so each patch attends first to the
    patches most like it: its neighbours (by position) and the rest of its shape (by colour).
    A ViT learns that locality on its own only slowly (Trockman & Kolter, 2023)."""
    D = encoder.config.hidden_size
    noise = encoder.config.initializer_range
    for block in encoder.layers:
        eye = torch.eye(D) * scale
        block.attn.qkv.weight[:D].copy_(eye + torch.randn(D, D) * noise)
        block.attn.qkv.weight[D:2 * D].copy_(eye + torch.randn(D, D) * noise)


def pretrain_vision(r: Recipe, data: TrainWorld, work: Path) -> tuple[VisionEncoder, dict[str, float]]:
    """The image encoder, on images of every pair: like EVA-CLIP, it has seen the world broadly
    before BLIP-2 is trained; only BLIP-2's own stages keep the held-out pairs out."""
    encoder = VisionEncoder(vision_config(r))
    init_bert_(encoder, encoder.config.initializer_range)
    with torch.no_grad():
        encoder.embeddings.position_embedding.copy_(sincos_positions(r.image_size // r.patch_size, r.vision_hidden))
        encoder.embeddings.class_embedding.normal_(0.0, 0.02)
    if r.vision_mimetic:
        mimetic_init_(encoder)
    labels = [scene_labels(s, r.image_size, r.patch_size) for s in data.scenes]
    dataset = LabelledImages(data.images, labels, grayscale=r.vision_grayscale, seed=r.seed)
    objective = VisionPretraining(encoder)
    cfg = trainer_config(r, work, "vision", r.vision_steps, r.vision_batch, r.vision_lr)
    log(f"image encoder: {r.vision_steps} steps of {r.vision_batch} images")
    history = Trainer(objective, dataset, dataset.collate, cfg).fit()
    objective.eval()
    held_out = [world.sample_scene("heldout", i, r.seed) for i in range(256)]
    pixels = to_pixels(np.stack([evaluate.resized(world.render(s), r.image_size) for s in held_out]))
    labels = [scene_labels(s, r.image_size, r.patch_size) for s in held_out]
    accuracy = objective.patch_accuracy(pixels, stack_labels(labels))
    log(f"image encoder: final loss {history[-1]['loss']:.3f}; held-out patches {accuracy}")
    return encoder.eval(), accuracy


def pretrain_language_model(r: Recipe, tok, text_config: OPTConfig, corpus: list[list[str]],
                            work: Path) -> tuple[OPTLanguageModel, float]:
    torch.manual_seed(r.seed + 1)  # its own draw: a change to the image encoder does not reshuffle it
    lm = OPTLanguageModel(text_config)
    init_bert_(lm, text_config.init_std)
    with torch.no_grad():
        lm.embed_positions.weight.copy_(sincos_sequence(*lm.embed_positions.weight.shape))
    lines = tok.encode_batch([line + "\n" for doc in corpus for line in doc])
    docs, start = [], 0
    for doc in corpus:
        docs.append([t for e in lines[start:start + len(doc)] for t in e.ids])
        start += len(doc)
    length = text_config.max_position_embeddings
    dataset = TokenLines(pack(docs, length), PAD_ID, length)
    cfg = trainer_config(r, work, "lm", r.lm_steps, r.lm_batch, r.lm_lr)
    log(f"language model: {r.lm_steps} steps of {r.lm_batch} lines")
    history = Trainer(TextPretraining(lm), dataset, dataset.collate, cfg).fit()
    lm.eval()
    copy = copy_accuracy(lm, tok, r.seed)
    log(f"language model: final loss {history[-1]['loss']:.3f}; copies a caption it just read: {copy:.1%}")
    return lm, copy


def greedy_ids(lm: OPTLanguageModel, ids: list[int], steps: int) -> list[int]:
    """`ids` followed by `steps` greedy tokens (no cache: these prompts are a few dozen tokens)."""
    x = torch.tensor([ids])
    for _ in range(steps):
        x = torch.cat([x, lm(lm.embed(x)).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0].tolist()


@torch.no_grad()
def copy_accuracy(lm: OPTLanguageModel, tok, seed: int, scenes: int = 60) -> float:
    """Given a caption of two or three shapes, how often the model writes it again right after
    "an image of" (greedy): the in-context reading that BLIP-2 relies on, measured in text."""
    right = total = 0
    for i in range(scenes):
        scene = world.sample_scene("test", 1000 + i, seed)
        if len(scene.shapes) < 2:
            continue
        ids = greedy_ids(lm, tok.encode(world.canonical_caption(scene) + "\nan image of").ids, 16)  # BOS first
        lines = tok.decode(ids[1:]).split("\n")
        right += len(lines) > 1 and world.caption_correct(lines[1], scene)
        total += 1
    return right / max(1, total)


@torch.no_grad()
def text_qa_accuracy(lm: OPTLanguageModel, tok, seed: int, scenes: int = 200) -> dict[str, float]:
    """The language model's own question answering, per kind, with the caption given as text where
    BLIP-2 puts the image (greedy, exact match). VQA leans on this skill of the frozen model; the
    caption holds no up/down, so position questions are partly unanswerable here."""
    right = {kind: 0 for kind in world.QUESTION_KINDS}
    total = dict(right)
    for i in range(scenes):
        scene = world.sample_scene("test", 2000 + i, seed)
        context = tok.encode(world.canonical_caption(scene) + "\n").ids
        for qa in world.questions(scene, random.Random(f"blip2-demo-text-qa/{seed}/{i}")):
            prompt = context + tok.encode(evaluate.VQA_TEMPLATE.format(qa.question)).ids
            answer = tok.decode(greedy_ids(lm, prompt, 4)[len(prompt):]).split("\n")[0].strip()
            right[qa.kind] += answer == qa.answer
            total[qa.kind] += 1
    return {kind: right[kind] / total[kind] for kind in right if total[kind]}


def blip2_config(r: Recipe, tok) -> Blip2Config:
    """The stage-1 configuration (the Q-Former reads text too); stage 2 drops the text side."""
    vocab = -(-tok.get_vocab_size() // 8) * 8  # a multiple of 8, as OPT pads its vocabulary
    qformer = Blip2QFormerConfig(
        vocab_size=vocab, hidden_size=r.qformer_hidden, num_hidden_layers=r.qformer_layers, num_attention_heads=4,
        intermediate_size=4 * r.qformer_hidden, cross_attention_frequency=r.cross_attention_every, encoder_hidden_size=r.vision_hidden,
        max_position_embeddings=r.text_len + 4, pad_token_id=PAD_ID, use_qformer_text_input=True,
        initializer_range=init_std(r.qformer_hidden),
    )
    text = OPTConfig(
        vocab_size=vocab, hidden_size=r.lm_hidden, num_hidden_layers=r.lm_layers, ffn_dim=4 * r.lm_hidden,
        num_attention_heads=4, max_position_embeddings=96,
        word_embed_proj_dim=r.lm_hidden, bos_token_id=BOS_ID, eos_token_id=eos_id(tok), pad_token_id=PAD_ID,
        init_std=init_std(r.lm_hidden), architectures=["OPTForCausalLM"],
    )
    return Blip2Config(vision_config=vision_config(r), qformer_config=qformer, text_config=text,
                       num_query_tokens=r.queries, image_text_hidden_size=r.itc_width)


def generation_config(config: Blip2Config) -> Blip2Config:
    out = copy.deepcopy(config)
    out.qformer_config.use_qformer_text_input = False
    return out


# ---------------------------------------------------------------- 3 and 4. the Q-Former's two stages
class WorldPairs(Dataset):
    """Training images with text: a caption in a random phrasing, or (stage 2) a question."""

    def __init__(self, data: TrainWorld, seed: int, question_share: float = 0.0) -> None:
        self.data, self.question_share = data, question_share
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.data.scenes)

    def __getitem__(self, i: int) -> dict:
        scene = self.data.scenes[i]
        item = {"key": f"train/{i}", "pixel_values": to_pixels(self.data.images[i:i + 1])[0]}
        if self.rng.random() < self.question_share:
            qa = self.rng.choice(world.questions(scene, self.rng))
            return {**item, "question": qa.question, "answer": qa.answer}
        return {**item, "caption": self.rng.choice(world.captions(scene))}


def fill_feature_cache(vision: VisionEncoder, data: TrainWorld, batch: int = 256) -> FeatureCache:
    """The frozen encoder's features for every training image, computed once for both stages."""
    cache = FeatureCache(dtype=torch.float16)
    for start in tqdm(range(0, len(data.images), batch), desc="features", mininterval=2):
        stop = min(start + batch, len(data.images))
        keys = [f"train/{i}" for i in range(start, stop)]
        with torch.no_grad():
            image_features(vision, to_pixels(data.images[start:stop]), keys, cache)
    return cache


def tokenize_with(tok):
    return lambda texts: [e.ids for e in tok.encode_batch(texts)]


ALL_LOSSES = Stage1Weights()
ITG_ONLY = Stage1Weights(itc=0.0, itm=0.0, itg=1.0)


def run_stage1(r: Recipe, config: Blip2Config, vision: VisionEncoder, data: TrainWorld, tok,
               cache: FeatureCache, work: Path, weights: Stage1Weights = ALL_LOSSES,
               name: str = "stage1") -> Blip2ForQFormerPretraining:
    model = Blip2ForQFormerPretraining(config)
    # BLIP-2 starts the Q-Former from BERT. A BERT of our own (1500 masked-word steps on the
    # world's text, text feed-forward copied to the queries') made things worse here: ITC R@1
    # 23% against 63%, stage-2 captions 56.5% / 83% against 64% / 88.5%. So it starts fresh.
    init_qformer_(model)
    model.vision_model.load_state_dict(vision.state_dict())
    objective = Stage1Objective(model, weights, dec_token_id=DEC_ID, seed=r.seed, feature_cache=cache)
    collate = Stage1Collate(tokenize_with(tok), pad_id=PAD_ID, max_len=r.text_len)
    cfg = trainer_config(r, work, name, r.stage1_steps, r.stage1_batch, r.stage1_lr)
    losses = [k for k in ("itc", "itm", "itg") if getattr(weights, k) > 0]
    log(f"{name} ({', '.join(k.upper() for k in losses)}): {r.stage1_steps} steps of {r.stage1_batch} image-caption pairs")
    history = Trainer(objective, WorldPairs(data, r.seed), collate, cfg).fit()
    log(f"{name}: " + " ".join(f"{k} {history[-1][k]:.3f}" for k in losses))
    return model.eval()


def run_stage2(r: Recipe, config: Blip2Config, vision: VisionEncoder, lm: OPTLanguageModel, data: TrainWorld,
               tok, cache: FeatureCache, work: Path, stage1_dir: Path | None) -> Blip2ForConditionalGeneration:
    """Stage 2 from stage 1's Q-Former, or (stage1_dir None: the ablation) from a fresh one."""
    model = Blip2ForConditionalGeneration(generation_config(config))
    std = config.qformer_config.initializer_range
    init_bert_(model.qformer, std)
    init_bert_(model.language_projection, std)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, std)
    model.vision_model.load_state_dict(vision.state_dict())
    model.language_model.load_state_dict(lm.state_dict())
    if stage1_dir is not None:
        load_stage1_(model, stage1_dir)
    objective = Stage2Objective(model, feature_cache=cache)
    text = PromptedText(prompt="", question_template=evaluate.VQA_TEMPLATE, suffix="\n")
    collate = DecoderLMCollate(tokenize_with(tok), pad_id=PAD_ID, max_len=2 * r.text_len, text=text)
    name = "stage2" if stage1_dir is not None else "stage2-ablation"
    cfg = trainer_config(r, work, name, r.stage2_steps, r.stage2_batch, r.stage2_lr)
    log(f"{name} (LM loss{'' if stage1_dir else ', Q-Former from scratch'}): {r.stage2_steps} steps of {r.stage2_batch}")
    history = Trainer(objective, WorldPairs(data, r.seed + 1, question_share=r.question_share), collate, cfg).fit()
    log(f"{name}: lm loss {history[-1]['lm']:.3f}")
    return model.eval()


# ---------------------------------------------------------------- 5. export
def write_processor_files(folder: Path, r: Recipe, tok, max_length: int) -> None:
    """The tokenizer and the image processor's config beside the weights (what Blip2Processor reads)."""
    save_tokenizer(tok, folder, model_max_length=max_length)
    images = Blip2ImageProcessor(size=r.image_size, image_mean=MEAN, image_std=STD, processor_class="Blip2Processor")
    images.save_pretrained(folder)


def export(r: Recipe, gen: Blip2ForConditionalGeneration, stage1: Blip2ForQFormerPretraining, tok, out: Path) -> None:
    dtype = getattr(torch, r.save_dtype)
    model_dir, retrieval_dir = out / "model", out / "retrieval"
    for folder in (model_dir, retrieval_dir):
        shutil.rmtree(folder, ignore_errors=True)
    copy.deepcopy(gen).to(dtype).save_pretrained(model_dir)
    retrieval = Blip2ForImageTextRetrieval(stage1.config)
    state = {k: v for k, v in stage1.state_dict().items() if k in retrieval.state_dict()}
    retrieval.load_state_dict(state)
    retrieval.to(dtype).save_pretrained(retrieval_dir)
    max_length = gen.config.text_config.max_position_embeddings - r.queries
    for folder in (model_dir, retrieval_dir):
        write_processor_files(folder, r, tok, max_length)


def write_examples(folder: Path, seed: int, count: int = 6) -> None:
    """A few held-out images (pairs no training image held) for the README's first command."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(count):
        ex = world.example("heldout", 10_000 + i, seed, plain_style=True)
        name = "_".join(f"{c}-{s}" for c, s in ex.scene.pairs)
        ex.image.save(folder / f"{i:02d}_{name}.png", optimize=True)


# ---------------------------------------------------------------- scores and the report
def score(model: Blip2ForConditionalGeneration, tok, sets: dict[str, evaluate.EvalSet]) -> dict:
    out = {}
    for split, ev in sets.items():
        acc, texts = evaluate.caption_scores(model, tok, ev)
        out[split] = {"caption": acc, "vqa": evaluate.vqa_scores(model, tok, ev), "examples": texts[:5]}
        log(f"  {split}: caption {acc:.1%}  " + "  ".join(f"{k} {v:.1%}" for k, v in out[split]["vqa"].items()))
    return out


def pick_model(r: Recipe, tok, models: dict) -> tuple[str, dict[str, float]]:
    """Which stage-2 model ships: the better captioner on validation images of seen pairs, drawn
    with another seed than both test sets (so the reported scores are not the ones it was picked on)."""
    val = evaluate.build_eval_set("test", r.eval_scenes, 0, r.image_size, r.seed + 1)
    accuracy = {name: evaluate.caption_scores(model, tok, val)[0] for name, model in models.items()}
    chosen = max(accuracy, key=lambda name: (accuracy[name], name == "full"))  # a tie goes to the paper's way
    log(f"validation captions: {accuracy}; shipping {chosen}")
    return chosen, accuracy


def report(r: Recipe, scores: dict, chosen: str, validation: dict[str, float], retrieval: dict, halves: dict, timer: Timer, size_mb: float, quick: bool) -> str:
    kinds = world.QUESTION_KINDS
    lines = [
        "# The demo model: the recipe's report",
        "",
        f"`python -m blip2.demo.recipe --out blip2/demo{' --quick' if quick else ''}` "
        f"(seed {r.seed}, {torch.get_num_threads()} threads): {timer.total() / 60:.1f} minutes.",
        "",
        "Held-out images hold colour-shape pairs that BLIP-2's training (stages 1 and 2) never showed "
        f"({', '.join(f'{c} {s}' for c, s in sorted(world.HELD_OUT))}); the frozen image encoder and "
        "language model were pretrained on images and text of every pair, as EVA-CLIP and OPT were "
        "pretrained on the web before BLIP-2. Seen-pair images are new images of the training pairs. "
        "Caption accuracy: every shape named with its colour, no more, no fewer (greedy, no prompt). "
        "VQA: exact match (greedy, prompt `Question: {} Answer:`).",
        "",
        "| model | images | caption | " + " | ".join(f"VQA {k}" for k in kinds) + " |",
        "|---|---|---|" + "---|" * len(kinds),
    ]
    names = {"full": "stage 1 (ITG) + stage 2", "ablation": "stage 2 only (no stage 1)"}
    names[chosen] += " (shipped)"
    for model_name, by_split in scores.items():
        for split, s in by_split.items():
            vqa = " | ".join(f"{s['vqa'].get(k, float('nan')):.1%}" for k in kinds)
            lines.append(f"| {names[model_name]} | {split} | {s['caption']:.1%} | {vqa} |")
    lines += [
        "",
        "Retrieval (the stage-1 Q-Former trained with ITC, ITM and ITG, written to `retrieval/`; "
        f"`python -m blip2.demo.retrieval_tune` tunes it further), {retrieval['n']} "
        "held-out images with distinct captions: ",
        "",
        "| ITC text-to-image R@1 | ITC image-to-text R@1 | ITM accuracy (true pair vs. one attribute changed) |",
        "|---|---|---|",
        f"| {retrieval['t2i_r1']:.1%} | {retrieval['i2t_r1']:.1%} | {retrieval['itm']:.1%} |",
        "",
        "Example held-out captions (shipped model): " + "; ".join(f"\"{t}\"" for t in scores[chosen]["heldout"]["examples"]),
        "",
        "The captioners' stage 1 is ITG alone; ITC and ITM train only the retrieval model: here, a stage 1 with ITC "
        "and ITM left stage 2 captioning worse than no stage 1 at all (see `run` in recipe.py).",
        "",
        "The shipped model is the stage-2 model with the higher caption accuracy on "
        f"{r.eval_scenes} validation images of seen pairs (another seed than the tables' images): "
        + ", ".join(f"{names[k].removesuffix(' (shipped)')} {v:.1%}" for k, v in validation.items()) + ".",
        "",
        f"The pretrained image encoder on held-out images, per patch that shows a shape: colour "
        f"{halves['patch_colour']:.1%}, shape {halves['patch_shape']:.1%}; per shape, the shape its patches "
        f"vote for {halves['object_shape']:.1%}; which shape from the left it belongs to {halves['patch_rank']:.1%}; where a shape's centre is, to {halves['where_px']:.1f} pixels of 64. The pretrained language model, given a caption of two or "
        f"three shapes, writes it again after \"an image of\" in {halves['copy']:.1%} of cases. Given a caption as text "
        "and then a question (the VQA prompt), it answers "
        + ", ".join(f"{k} {v:.1%}" for k, v in halves["text_qa"].items())
        + ": VQA through the image leans on this skill of the frozen model (the caption says nothing of up and down, "
        "so its position answers are partly guesses).",
        "",
        f"Shipped size: {size_mb:.1f} MB (model/ and retrieval/, {r.save_dtype}).",
        "",
        "Wall time per stage (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in timer.stages.items()) + ".",
        "",
        "Settings: `" + json.dumps(asdict(r)) + "`",
        "",
    ]
    return "\n".join(lines)


def folder_mb(*folders: Path) -> float:
    return sum(p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file()) / 1e6


def run(r: Recipe, out: Path, work: Path, quick: bool = False) -> str:
    torch.manual_seed(r.seed)
    timer = Timer()
    t = time.perf_counter()
    data = draw_images(r, "train", r.train_images)
    pretraining_images = draw_images(r, "pretrain", r.pretrain_images)
    corpus = world.text_corpus(r.text_docs, r.seed)
    tok = train_tokenizer([line for doc in corpus for line in doc])
    config = blip2_config(r, tok)
    timer.stage("world", t)

    t = time.perf_counter()
    vision, patch_accuracy = pretrain_vision(r, pretraining_images, work)
    timer.stage("image encoder", t)
    t = time.perf_counter()
    lm, copy = pretrain_language_model(r, tok, config.text_config, corpus, work)
    text_qa = text_qa_accuracy(lm, tok, r.seed, r.eval_scenes)
    log("language model, answering from a caption given as text: " + "  ".join(f"{k} {v:.1%}" for k, v in text_qa.items()))
    timer.stage("language model", t)

    t = time.perf_counter()
    cache = fill_feature_cache(vision, data)
    stage1 = run_stage1(r, config, vision, data, tok, cache, work)  # the retrieval model
    stage1.save_pretrained(work / "stage1-model")
    timer.stage("stage 1", t)
    # The captioner starts from a stage 1 of ITG alone. Measured with this recipe's frozen halves,
    # held-out / seen-pair captions after stage 2: from a stage 1 of all three losses 29% / 44.5%,
    # of ITC and ITM 31% / 45%, of ITG alone 66% / 87%; from no stage 1 56.5% / 82.5%. ITC and ITM
    # left captions that name one colour twice ("a blue square and a blue square").
    t = time.perf_counter()
    stage1_itg_dir = work / "stage1-itg-model"
    run_stage1(r, config, vision, data, tok, cache, work, ITG_ONLY, "stage1-itg").save_pretrained(stage1_itg_dir)
    timer.stage("stage 1, ITG only", t)
    t = time.perf_counter()
    gen = run_stage2(r, config, vision, lm, data, tok, cache, work, stage1_itg_dir)
    timer.stage("stage 2", t)
    ablation = None
    if r.ablation:
        t = time.perf_counter()
        ablation = run_stage2(r, config, vision, lm, data, tok, cache, work, None)
        timer.stage("stage 2 without stage 1", t)

    t = time.perf_counter()
    models = {"full": gen} if ablation is None else {"full": gen, "ablation": ablation}
    chosen, validation = pick_model(r, tok, models)
    export(r, models[chosen], stage1, tok, out)
    write_examples(out / "examples", r.seed)
    shipped = Blip2ForConditionalGeneration.from_pretrained(out / "model")  # score what ships, from its files
    retrieval_model = Blip2ForImageTextRetrieval.from_pretrained(out / "retrieval")
    sets = {split: evaluate.build_eval_set(split, r.eval_scenes, r.eval_per_kind, r.image_size, r.seed)
            for split in ("heldout", "test")}
    scores = {}
    for name, model in models.items():
        log(f"{name}{' (shipped)' if name == chosen else ''}:")
        scores[name] = score(shipped if name == chosen else model, tok, sets)
    retrieval = evaluate.itc_recall(retrieval_model, tok, sets["heldout"], r.retrieval_images)
    retrieval["itm"] = evaluate.itm_accuracy(retrieval_model, tok, sets["heldout"])
    log(f"retrieval: {retrieval}")
    timer.stage("export and evaluation", t)
    text = report(r, scores, chosen, validation, retrieval, {**patch_accuracy, "copy": copy, "text_qa": text_qa}, timer,
                  folder_mb(out / "model", out / "retrieval"), quick)
    (out / "REPORT.md").write_text(text, encoding="utf-8")
    (out / "scores.json").write_text(json.dumps({"scores": scores, "shipped": chosen, "validation": validation,
                                                 "retrieval": retrieval, "language_model_text_qa": text_qa,
                                                 "stages_s": timer.stages}, indent=2) + "\n")
    return text


def apply_sets(r, items: list[str]):
    """The recipe dataclass `r` with each `--set NAME=VALUE` applied, the value read as the field's type
    (a bool as true or false); an unknown name or a value of another type stops with a message."""
    names = sorted(f.name for f in fields(r))
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE, NAME one of {', '.join(names)}")
        kind = type(getattr(r, name))
        if kind is bool and value not in ("true", "false"):
            raise SystemExit(f"--set {item!r}: {name} is true or false")
        try:
            r = replace(r, **{name: value == "true" if kind is bool else kind(value)})
        except ValueError:
            what = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
            raise SystemExit(f"--set {item!r}: {name} takes {what}") from None
    return r


def idle_cores() -> int:
    """Cores nobody else is using: on a shared machine, threads beyond them wait on each other."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2.demo.recipe", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="where model/, retrieval/, examples/ and REPORT.md go")
    parser.add_argument("--quick", action="store_true", help="the short CI version")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the idle cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a Recipe field")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or idle_cores())
    r = apply_sets(replace(QUICK if args.quick else Recipe(), seed=args.seed), args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        print(run(r, args.out, args.work, args.quick))
    else:
        with tempfile.TemporaryDirectory(prefix="blip2-recipe-") as work:
            print(run(r, args.out, Path(work), args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
