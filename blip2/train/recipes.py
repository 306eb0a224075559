"""From a training config file to a model, data and objective, for `blip2 train stage1|stage2`.

The file is JSON (or YAML when PyYAML is installed) with four sections:

    {
      "model": {"pretrained": DIR} or {"config": {...Blip2Config...}, "vision_from": DIR},
               (an InstructBLIP checkpoint or a config with "model_type": "instructblip" trains the
               instruction-aware Q-Former; the data section then also needs "qformer_tokenizer")
               stage 2 also "qformer_from": DIR (a stage-1 / retrieval checkpoint),
               "seed": 0, "train_vision_layernorm": true, "recompute_lm": false (stage 2),
               "gradient_checkpointing": false (recompute each trained layer's activations in backward),
               "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], ...} (stage 2:
               peft's LoraConfig fields; `--lora r=8,alpha=16,targets=q_proj+v_proj` on the command line)
      "data":  {"train": PATH, "eval": PATH, "tokenizer": tokenizer.json or its folder,
                "max_len": 32, "pad_token_id": ..., "dec_token_id": ... (stage 1),
                "prompt": "", "question_template": the LM family's ("Question: {} Answer:" for OPT),
                "suffix": "\\n" (stage 2, OPT; "" for T5), "qformer_tokenizer": DIR (InstructBLIP),
                "feature_cache": null | "memory" | DIR,
                "eval_holdout": N (images of data.train kept apart for evaluation when there is no data.eval)},
      "losses": {"itc": 1.0, "itm": 1.0, "itg": 1.0, "label_smoothing": 0.1}   (stage 1),
      "train": {...TrainConfig...},
      "log": {"tensorboard": true, "wandb": null | PROJECT, "eval_metrics": true, "eval_images": 200,
              "samples": 8}   (see blip2.train.watch)
    }

`blip2 train` derives every field it can (blip2.train.defaults); a config file need only hold
what differs; examples/ has commented ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import checkpoint as ckpt
from ..config import Blip2Config
from ..families import family_of
from ..keymap import KeyTable, vision_rules
from .data import (
    DecoderLMCollate,
    ImageTextDataset,
    InstructionCollate,
    PromptedText,
    Seq2SeqLMCollate,
    Stage1Collate,
    Tokenizer,
)
from .frozen import FeatureCache
from .loop import TrainConfig

SECTIONS = ("model", "data", "losses", "train", "log")


@dataclass
class Job:
    model: nn.Module  # what is saved at the end (save_pretrained)
    objective: nn.Module
    train_data: Dataset
    eval_data: Dataset | None
    collate: Callable
    train: TrainConfig


def read_spec(path: str | Path) -> dict:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ModuleNotFoundError(f"reading {path} needs PyYAML: pip install 'blip2[yaml]'") from None
        try:
            spec = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ValueError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    else:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a training config is a mapping of sections {list(SECTIONS)}")
    unknown = sorted(set(spec) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; expected {list(SECTIONS)}")
    for section in SECTIONS:
        spec.setdefault(section, {})
    return spec


# ---------------------------------------------------------------- shared parts
def load_vision_(vision: nn.Module, directory: str | Path) -> None:
    """Fills an image encoder from any BLIP-2 checkpoint that has one (strict over its keys)."""
    directory = Path(directory)
    hf = ckpt.read_state_dict(ckpt.find_weights(directory))
    table = KeyTable(vision_rules(vision.config), {})
    part = {k: hf[k] for k in hf if k.startswith("vision_model.")}
    expected = {f"vision_model.{k}": v.shape for k, v in vision.state_dict().items()}
    ours = ckpt.hf_to_ours(part, table, expected, str(directory))
    vision.load_state_dict({k.removeprefix("vision_model."): v for k, v in ours.items()}, strict=True)


def _cache(data: dict) -> FeatureCache | None:
    where = data.get("feature_cache")
    if where is None:
        return None
    return FeatureCache(None if where == "memory" else where)


def _datasets(data: dict, image_size: int) -> tuple[Dataset, Dataset | None]:
    if "train" not in data:
        raise ValueError("the config's data section needs 'train' (or pass --data)")
    train = ImageTextDataset.from_path(data["train"], image_size)
    if data.get("eval"):
        return train, ImageTextDataset.from_path(data["eval"], image_size)
    if data.get("eval_holdout"):
        return hold_out(train, int(data["eval_holdout"]), data.get("holdout_seed", 0))
    return train, None


def hold_out(dataset: ImageTextDataset, images: int, seed: int = 0) -> tuple[ImageTextDataset, ImageTextDataset]:
    """Splits off `images` images, with all their records, as an evaluation set (the same ones for a given seed)."""
    names = sorted({r["image"] for r in dataset.records})
    if images >= len(names):
        raise ValueError(f"data.eval_holdout is {images} images but the training data has only {len(names)}")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {names[i] for i in order[:images]}
    keep = [r for r in dataset.records if r["image"] not in held]
    evaluation = [r for r in dataset.records if r["image"] in held]
    return ImageTextDataset(keep, dataset.transform), ImageTextDataset(evaluation, dataset.transform)


def _tokenizer(data: dict) -> Tokenizer:
    if "tokenizer" not in data:
        raise ValueError("the config's data section needs 'tokenizer' (a tokenizer.json or its folder)")
    return Tokenizer(data["tokenizer"])


def _token_id(data: dict, key: str, tokenizer: Tokenizer, candidates: tuple[str, ...], default=None) -> int:
    if data.get(key) is not None:
        return int(data[key])
    for token in candidates:
        found = tokenizer.token_id(token)
        if found is not None:
            return found
    if default is not None:
        return default
    raise ValueError(f"set data.{key}: the tokenizer has none of {list(candidates)}")


# ---------------------------------------------------------------- stage 1
def stage1_job(spec: dict) -> Job:
    from .stage1 import Blip2ForQFormerPretraining, Stage1Objective, Stage1Weights, init_qformer_

    m, data, losses = spec["model"], spec["data"], dict(spec["losses"])
    torch.manual_seed(m.get("seed", 0))  # every process builds the same model
    if "pretrained" in m:
        model = Blip2ForQFormerPretraining.from_pretrained(m["pretrained"], torch_dtype=torch.float32)
    else:
        config = Blip2Config.from_dict(m.get("config", {}))
        config.qformer_config.use_qformer_text_input = True  # stage 1 is where the text side is trained
        model = Blip2ForQFormerPretraining(config)
        init_qformer_(model)
        if "vision_from" in m:
            load_vision_(model.vision_model, m["vision_from"])
    tokenizer = _tokenizer(data)
    pad_id = _token_id(data, "pad_token_id", tokenizer, ("[PAD]", "<pad>"), default=0)
    dec_id = _token_id(data, "dec_token_id", tokenizer, ("[DEC]", "[BOS]", "<s>"))
    train_cfg = TrainConfig.from_dict(spec["train"])
    smoothing = losses.pop("label_smoothing", 0.1)
    objective = Stage1Objective(
        model, Stage1Weights(**losses), dec_token_id=dec_id, label_smoothing=smoothing, seed=train_cfg.seed,
        feature_cache=_cache(data), train_vision_layernorm=m.get("train_vision_layernorm", True),
    )
    if m.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
    train, evaluation = _datasets(data, model.config.vision_config.image_size)
    collate = Stage1Collate(tokenizer, pad_id, data.get("max_len", 32))
    return Job(model, objective, train, evaluation, collate, train_cfg)


# ---------------------------------------------------------------- stage 2
def stage2_job(spec: dict) -> Job:
    from ..auto import load_model
    from ..hf_compat import Blip2ForConditionalGeneration
    from ..instructblip import InstructBlipForConditionalGeneration
    from ..modeling.instructblip import InstructBlip
    from .stage2 import Stage2Objective, load_stage1_

    m, data = spec["model"], spec["data"]
    if spec["losses"]:
        raise ValueError("stage 2 has one loss (the language model's); remove the losses section")
    torch.manual_seed(m.get("seed", 0))
    if "pretrained" in m:
        from .defaults import check_stage2_model, model_folder

        check_stage2_model(model_folder(m))
        # BLIP-2 or InstructBLIP, as its config.json says
        model = load_model(m["pretrained"], torch_dtype=torch.float32)
    else:
        config = m.get("config", {})
        cls = InstructBlipForConditionalGeneration if config.get("model_type") == "instructblip" else Blip2ForConditionalGeneration
        model = cls(cls.config_class.from_dict(config))
        if "vision_from" in m:
            load_vision_(model.vision_model, m["vision_from"])
    if "qformer_from" in m:
        load_stage1_(model, m["qformer_from"])
    tokenizer = _tokenizer(data)
    text_cfg = model.config.text_config
    pad_id = _token_id(data, "pad_token_id", tokenizer, ("<pad>", "[PAD]"), default=text_cfg.pad_token_id)
    family = family_of(model.config)
    decoder_only = family.decoder_only
    prompted = PromptedText(data.get("prompt", ""), data.get("question_template", family.question_template),
                            data.get("suffix", "\n" if decoder_only else ""))
    collate_cls = DecoderLMCollate if decoder_only else Seq2SeqLMCollate
    collate = collate_cls(tokenizer, pad_id, data.get("max_len", 64), prompted)
    if isinstance(model, InstructBlip):  # its Q-Former reads the prompt, in BERT tokens
        if "qformer_tokenizer" not in data:
            raise ValueError("an InstructBLIP model needs data.qformer_tokenizer (the Q-Former's tokenizer folder)")
        qformer_tokenizer = Tokenizer(data["qformer_tokenizer"])
        qformer_pad = _token_id(data, "qformer_pad_token_id", qformer_tokenizer, ("[PAD]",))
        collate = InstructionCollate(collate, qformer_tokenizer, qformer_pad, data.get("max_len", 64))
    objective = Stage2Objective(model, _cache(data), m.get("train_vision_layernorm", True), m.get("recompute_lm", False))
    if m.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()  # the layers that train (the frozen LM: recompute_lm)
    if m.get("lora"):
        add_stage2_lora_(model, m["lora"], m.get("train_vision_layernorm", True))
    train, evaluation = _datasets(data, model.config.vision_config.image_size)
    return Job(model, objective, train, evaluation, collate, TrainConfig.from_dict(spec["train"]))


def add_stage2_lora_(model, lora: dict, train_vision_layernorm: bool = True) -> None:
    """Adds a trainable LoRA (peft's LoraConfig fields) to a stage-2 model. The adapter trains;
    so do the parts stage 2 always trains (queries, projection, the image encoder's last norm),
    and the Q-Former in full unless the LoRA reaches into it (then only its adapter does)."""
    from ..modeling.lora import LoraLinear

    model.add_adapter(dict(lora))  # every other parameter stops requiring gradients
    qformer_has_lora = any(isinstance(m, LoraLinear) for m in model.qformer.modules())
    if not qformer_has_lora:
        model.qformer.requires_grad_(True)
    model.query_tokens.requires_grad_(True)
    model.language_projection.requires_grad_(True)
    model.vision_model.post_layernorm.requires_grad_(train_vision_layernorm)


def parse_lora(text: str) -> dict:
    """`r=8,alpha=16,dropout=0.05,targets=q_proj+v_proj` -> LoraConfig fields."""
    names = {"r": "r", "alpha": "lora_alpha", "lora_alpha": "lora_alpha", "dropout": "lora_dropout",
             "lora_dropout": "lora_dropout", "targets": "target_modules", "target_modules": "target_modules",
             "rslora": "use_rslora"}
    fields = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in names:
            raise ValueError(f"--lora: cannot read {item!r}; expected key=value with keys {sorted(set(names))}")
        key, value = names[key.strip()], value.strip()
        if key == "target_modules":
            fields[key] = [t for t in value.split("+") if t]
        elif key == "use_rslora":
            fields[key] = value.lower() in ("1", "true", "yes")
        else:
            try:
                fields[key] = int(value) if key == "r" else float(value)
            except ValueError:
                raise ValueError(f"--lora: {key} must be a number, got {value!r}") from None
    if "target_modules" not in fields:
        raise ValueError("--lora needs targets=NAME+NAME (e.g. targets=q_proj+v_proj)")
    return fields


JOBS = {"stage1": stage1_job, "stage2": stage2_job}
