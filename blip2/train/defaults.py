"""What `blip2 train` works out for itself, so that one command trains:

    blip2 train stage2 --model ID_OR_DIR --data DATA --out DIR

From the model: the tokenizer (its folder), the question template and end-of-text suffix (its
language-model family), the image size. From the data: a held-out evaluation split when no
evaluation data is given, the batch size and the number of steps (more passes over small data).
From the device: bf16 autocast where the hardware computes it natively. Everything derived
can be overridden by `--config FILE` (any field) and the flags; `--print-config` prints the
resolved whole, which, given back as --config, reproduces the run.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import Blip2Config
from ..families import family_of
from .data import read_records

REFERENCE_WIDTH = 768  # BLIP-2's Q-Former width, where the paper's learning rates were tuned
FEATURE_CACHE_BYTES = 2 << 30  # frozen image features are kept in memory below this


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section and key by key (nested dicts merged, the rest replaced)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def model_folder(m: dict) -> Path | None:
    """The checkpoint the run starts from (or takes its image encoder from)."""
    from ..hf_compat import checkpoint_dir

    source = m.get("pretrained") or m.get("vision_from")
    return checkpoint_dir(source) if source else None


def has_language_model(folder: Path) -> bool:
    return any(k.startswith("language_model.") for k in ckpt.read_state_dict(ckpt.find_weights(folder)))


def check_stage2_model(folder: Path) -> None:
    if not has_language_model(folder):
        weights = ", ".join(p.name for p in ckpt.find_weights(folder))
        raise ValueError(f"{folder / weights}: no language model in this checkpoint (a retrieval or stage-1 model); "
                         "stage 2 trains through a frozen language model: give a model that has one "
                         "(e.g. Salesforce/blip2-opt-2.7b), and this checkpoint as model.qformer_from")


def derive(stage: str, user: dict, device: torch.device) -> dict:
    """The defaults for what `user` (config file and flags, merged) leaves open."""
    m, data = user["model"], user["data"]
    if "train" not in data:
        raise ValueError("no training data: pass --data (a JSONL file or a folder) or set data.train")
    if not (m.get("pretrained") or m.get("config")):
        raise ValueError("no model: pass --model (a checkpoint folder or hub id) or set model.pretrained / model.config")
    folder = model_folder(m)
    config = Blip2Config.from_json_file(folder / "config.json") if "config" not in m else Blip2Config.from_dict(m["config"])
    if stage == "stage2" and m.get("pretrained"):
        check_stage2_model(folder)
    if stage == "stage1" and m.get("pretrained") and has_language_model(folder):
        raise ValueError(f"{folder}: a captioning checkpoint (it has a language model) cannot start stage 1, which "
                         "trains the Q-Former's text side: start from a retrieval / stage-1 checkpoint, or take only "
                         "its image encoder (model.vision_from, see examples/stage1_from_scratch.yaml)")
    records = read_records(data["train"])
    images = len({r["image"] for r in records})
    holdout = 0 if data.get("eval") else held_out_images(images)
    n_train = len(records) * (images - holdout) // images
    out = {"model": {}, "data": data_defaults(stage, config, folder, images), "losses": {},
           "train": schedule(n_train, pretrained=bool(m.get("pretrained")), width=config.qformer_config.hidden_size,
                             device=device, evaluates=bool(holdout or data.get("eval")), given=user["train"])}
    if holdout:
        out["data"]["eval_holdout"] = holdout
    if stage == "stage1":
        out["losses"] = {"itc": 1.0, "itm": 1.0, "itg": 1.0, "label_smoothing": 0.1}
    return out


def held_out_images(images: int) -> int:
    """5% of the images (at least 8, at most 1000) when there are enough to spare any."""
    if images < 40:
        return 0
    return min(1000, max(8, round(0.05 * images)))


def data_defaults(stage: str, config: Blip2Config, folder: Path | None, images: int) -> dict:
    data: dict = {"max_len": 32 if stage == "stage1" else 64}
    if folder is not None:
        data["tokenizer"] = str(folder)
    if stage == "stage2":
        family = family_of(config)
        data.update(prompt="", question_template=family.question_template,
                    suffix="\n" if family.decoder_only else "")
    v = config.vision_config
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    if images * tokens * v.hidden_size * 4 < FEATURE_CACHE_BYTES:  # float32 features of every image
        data["feature_cache"] = "memory"
    return data


def schedule(n_train: int, pretrained: bool, width: int, device: torch.device, evaluates: bool,
             given: dict | None = None) -> dict:
    """Batch, steps and learning rate for `n_train` examples (around a batch size or step count
    the user `given`).

    Small data gets more passes (10 epochs under 2000 examples, else 5, as caption fine-tuning
    does); the learning rate is the paper's (1e-5 fine-tuning, 1e-4 from scratch) scaled by
    768 / Q-Former width, as narrower layers take larger steps.
    """
    given = given or {}
    batch = given.get("batch_size") or max(1, min(32 if device.type == "cuda" else 16, n_train // 4))
    epochs = 10 if n_train < 2000 else 5
    steps = given.get("max_steps") or max(1, epochs * (n_train // batch))
    lr = (1e-5 if pretrained else 1e-4) * REFERENCE_WIDTH / width
    every = max(1, math.ceil(steps / 5))
    return {
        "batch_size": batch, "max_steps": steps, "lr": lr, "min_lr": lr / 10, "warmup_steps": min(1000, steps // 20),
        "eval_every": every if evaluates else 0, "save_every": every,
        "bf16": device.type == "cuda" and torch.cuda.is_bf16_supported(),
    }
