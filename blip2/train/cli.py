"""`blip2 train stage1|stage2`: one command, everything else derived; one process, or many under torchrun.

    blip2 train stage2 --model Salesforce/blip2-opt-2.7b --data captions.jsonl --out runs/s2
    blip2 train stage2 --model DIR --data DATA --out DIR --print-config > my.json   # the resolved config
    blip2 train stage1 --config examples/stage1_from_scratch.yaml --data captions.jsonl --out runs/s1
    torchrun --nproc_per_node 8 -m blip2.cli train stage2 --model DIR --data DATA --out DIR

Derived unless given (blip2.train.defaults): tokenizer, question template and suffix from the
model's family; batch, steps and learning rate from the data size; bf16 from the device; a
held-out evaluation split of the data when --eval-data is not given. --config FILE (JSON or
YAML) overrides any of it; the flags override the file. Run again with the same --out to
resume from the latest checkpoint. Logs: OUT/metrics.jsonl and OUT/tensorboard.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..cli import device_option, int_option
from . import distributed as dist

STAGES = {
    "stage1": "representation learning: ITC, ITM and ITG with a frozen image encoder",
    "stage2": "generative learning: the language-modelling loss through a frozen OPT or T5",
}


def add_train_parser(subparsers) -> None:
    train = subparsers.add_parser("train", help="train the Q-Former (the paper's stage 1 or stage 2)",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = train.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, help_ in STAGES.items():
        p = stages.add_parser(name, help=help_, description=help_)
        p.add_argument("--model", help="checkpoint folder or hub id to start from (overrides model.pretrained)")
        p.add_argument("--data", help="training data: a JSONL file or a folder (overrides data.train)")
        p.add_argument("--eval-data", help="evaluation data (overrides data.eval; default: a held-out split)")
        p.add_argument("--out", help="output folder (overrides train.out_dir)")
        p.add_argument("--config", help="JSON or YAML file; any field overrides the derived one (see examples/)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("--max-steps", type=int_option(1), help="optimiser steps (overrides train.max_steps)")
        p.add_argument("--device", type=device_option, help="cpu, cuda, cuda:1 ... (default: torchrun's GPU for this process, else CPU)")
        p.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (overrides log.wandb)")
        p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in the output folder")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "stage2":
            p.add_argument("--lora", metavar="r=8,alpha=16,targets=q_proj+v_proj",
                           help="fine-tune with LoRA on these modules (the reference's names, or ours); "
                                "saves the adapter to OUT/final/adapter (overrides model.lora)")
        p.set_defaults(run=run)


def _flags(args) -> dict:
    """The command line as a partial config."""
    spec: dict = {"model": {}, "data": {}, "losses": {}, "train": {}, "log": {}}
    for flag, section, key in (("model", "model", "pretrained"), ("data", "data", "train"),
                               ("eval_data", "data", "eval"), ("out", "train", "out_dir"),
                               ("max_steps", "train", "max_steps"), ("wandb", "log", "wandb")):
        if getattr(args, flag) is not None:
            spec[section][key] = getattr(args, flag)
    if args.no_resume:
        spec["train"]["resume"] = False
    if args.no_progress:
        spec["train"]["progress"] = False
    if getattr(args, "lora", None):
        from .recipes import parse_lora

        spec["model"]["lora"] = parse_lora(args.lora)
    return spec


def resolve(args, device: torch.device) -> dict:
    """Derived defaults, then the config file, then the flags."""
    from .defaults import derive, merge
    from .recipes import SECTIONS, read_spec
    from .watch import LOG_DEFAULTS

    user = read_spec(args.config) if args.config else {s: {} for s in SECTIONS}
    user = merge(user, _flags(args))
    if "pretrained" in user["model"] and "config" in user["model"] and args.model:
        del user["model"]["config"]  # --model replaces a from-scratch model in the file
    spec = merge(derive(args.stage, user, device), user)
    spec["log"] = {**LOG_DEFAULTS, **spec["log"]}
    if "out_dir" not in spec["train"]:
        raise ValueError("no output folder: pass --out DIR (or set train.out_dir)")
    return spec


def run(args) -> int:
    from .loop import CheckpointError, NonFiniteError

    try:
        return _train(args)
    except (NonFiniteError, CheckpointError, ValueError, FileNotFoundError) as err:
        # Bad data, config or checkpoint, or a diverged run: the message names the culprit.
        print(f"blip2 train: {err}", file=sys.stderr)
        return 1


def _train(args) -> int:
    from .loop import CHECKPOINTS, LATEST, Trainer
    from .recipes import JOBS

    info = dist.setup(args.device)
    try:
        spec = resolve(args, info.device)
        if args.print_config:
            if info.is_main:
                print(json.dumps(spec, indent=2))
            return 0
        job = JOBS[args.stage](spec)
        torch.manual_seed(job.train.seed + info.rank)  # dropout differs between processes, as it should
        watch, callbacks = _watchers(job, spec, info)
        trainer = Trainer(job.objective, job.train_data, job.collate, job.train, job.eval_data, info,
                          callbacks=callbacks, sinks=[watch] if watch else None)
        fresh = not (Path(job.train.out_dir) / CHECKPOINTS / LATEST).is_file() or not job.train.resume
        for callback in callbacks if fresh else ():
            callback.baseline(trainer)  # the metrics before training, for comparison
        try:
            trainer.fit()
        finally:
            if watch is not None:
                watch.close()
        if job.train.fsdp_frozen and info.world_size > 1:
            from .loop import unshard_frozen

            unshard_frozen(job.objective)  # every process takes part; then the main one saves
        if info.is_main:
            from .defaults import model_folder

            _save_final(job, model_folder(spec["model"]))
        dist.barrier()
    finally:
        dist.teardown()
    return 0


def _watchers(job, spec: dict, info):
    """TensorBoard / W&B on the main process, and the evaluation metrics when there is evaluation data."""
    from .watch import EvalMetrics, Watch

    log, cfg = spec["log"], job.train
    watch = None
    if info.is_main:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_config = Path(cfg.out_dir) / "config.json"
        from ..io import atomic_write_text

        atomic_write_text(atomic_config, json.dumps(spec, indent=2) + "\n")  # what this run resolved to
        watch = Watch(cfg.out_dir, log, cfg.batch_size * cfg.accumulation_steps * info.world_size, spec)
    callbacks = []
    if log["eval_metrics"] and job.eval_data is not None and spec["data"].get("tokenizer"):
        from ..evaluation.predict import EvalSettings

        data = spec["data"]
        settings = EvalSettings(prompt=data.get("prompt", ""), question_template=data.get("question_template", ""),
                                batch_size=cfg.batch_size, max_images=log["eval_images"], samples=log["samples"],
                                java=log["java"])
        callbacks.append(EvalMetrics(job.model, job.eval_data, data["tokenizer"], settings, watch))
    return watch, callbacks


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "spiece.model", "tokenizer.model", "generation_config.json")


def _save_final(job, source: Path | None) -> None:
    """OUT/final: the trained model, with the processor files of the model it started from, so
    `blip2 eval --model OUT/final` and from_pretrained read it as they read the original."""
    import shutil

    final = Path(job.train.out_dir) / "final"
    if getattr(job.model, "_hf_peft_config_loaded", False):  # the model without, then the adapter
        job.model.save_base_pretrained(final)
        job.model.save_adapter(final / "adapter")
        print(f"saved {final} and its LoRA adapter {final / 'adapter'}")
    else:
        job.model.save_pretrained(final)
        print(f"saved {final}")
    for name in PROCESSOR_FILES if source is not None else ():
        if (source / name).is_file() and not (final / name).exists():
            shutil.copyfile(source / name, final / name)
