"""`blip2 train stage1|stage2 --config FILE`: one process, or many under torchrun.

    blip2 train stage1 --config stage1.json --data captions.jsonl --out runs/s1
    torchrun --nproc_per_node 8 -m blip2.cli train stage1 --config stage1.json

Run again with the same --out to resume from the latest checkpoint.
"""

from __future__ import annotations

import argparse
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
        p.add_argument("--config", required=True, help="JSON (or YAML) file; see blip2.train.recipes")
        p.add_argument("--data", help="training data: a JSONL file or a folder (overrides data.train)")
        p.add_argument("--eval-data", help="evaluation data (overrides data.eval)")
        p.add_argument("--out", help="output folder (overrides train.out_dir)")
        p.add_argument("--max-steps", type=int_option(1), help="optimiser steps (overrides train.max_steps)")
        p.add_argument("--device", type=device_option, help="cpu, cuda, cuda:1 ... (default: torchrun's GPU for this process, else CPU)")
        p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in the output folder")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "stage2":
            p.add_argument("--lora", metavar="r=8,alpha=16,targets=q_proj+v_proj",
                           help="fine-tune with LoRA on these modules (the reference's names, or ours); "
                                "saves the adapter to OUT/final/adapter (overrides model.lora)")
        p.set_defaults(run=run)


def _apply_overrides(spec: dict, args) -> dict:
    for flag, section, key in (("data", "data", "train"), ("eval_data", "data", "eval"), ("out", "train", "out_dir"),
                               ("max_steps", "train", "max_steps")):
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


def run(args) -> int:
    from .loop import CheckpointError, NonFiniteError

    try:
        return _train(args)
    except (NonFiniteError, CheckpointError, ValueError, FileNotFoundError) as err:
        # Bad data, config or checkpoint, or a diverged run: the message names the culprit.
        print(f"blip2 train: {err}", file=sys.stderr)
        return 1


def _train(args) -> int:
    from .loop import Trainer
    from .recipes import JOBS, read_spec

    spec = _apply_overrides(read_spec(args.config), args)
    info = dist.setup(args.device)
    try:
        job = JOBS[args.stage](spec)
        torch.manual_seed(job.train.seed + info.rank)  # dropout differs between processes, as it should
        trainer = Trainer(job.objective, job.train_data, job.collate, job.train, job.eval_data, info)
        trainer.fit()
        if info.is_main:
            final = Path(job.train.out_dir) / "final"
            if getattr(job.model, "_hf_peft_config_loaded", False):  # the model without, then the adapter
                job.model.save_base_pretrained(final)
                job.model.save_adapter(final / "adapter")
                print(f"saved {final} and its LoRA adapter {final / 'adapter'}")
            else:
                job.model.save_pretrained(final)
                print(f"saved {final}")
        dist.barrier()
    finally:
        dist.teardown()
    return 0
