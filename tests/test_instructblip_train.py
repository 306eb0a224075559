"""`blip2 train stage2` on an InstructBLIP model: the Q-Former reads each example's prompt (its
instruction, in its own tokens) and trains; the language model stays frozen."""

from __future__ import annotations

import json

import torch
from train_helpers import CLS, PAD, one_thread, stage1_config, write_dataset, write_tokenizer  # noqa: F401

from blip2 import InstructBlipConfig, InstructBlipForConditionalGeneration
from blip2.cli import main
from blip2.train.recipes import stage2_job


def instructblip_config() -> dict:
    config = stage1_config().to_dict()
    config["qformer_config"].pop("use_qformer_text_input")  # InstructBLIP's Q-Former always reads text
    return {**config, "model_type": "instructblip"}


def test_stage2_trains_the_instruction_aware_qformer(tmp_path):
    data = write_dataset(tmp_path / "data", n=4)
    tokenizer = str(write_tokenizer(tmp_path / "tokenizer.json"))
    spec = {
        "model": {"config": instructblip_config()},
        "data": {"train": str(data), "tokenizer": tokenizer, "qformer_tokenizer": tokenizer, "prompt": "a photo of"},
        "train": {"out_dir": str(tmp_path / "out"), "batch_size": 2, "max_steps": 3, "progress": False, "lr": 1e-2},
    }
    job = stage2_job({**spec, "losses": {}})
    assert isinstance(job.model, InstructBlipForConditionalGeneration)
    batch = job.collate([job.train_data[0], job.train_data[1]])
    assert batch["qformer_input_ids"][0, 0] == CLS and (batch["qformer_input_ids"] != PAD).sum() == 2 * 5
    start = {k: v.clone() for k, v in job.model.state_dict().items()}

    (tmp_path / "stage2.json").write_text(json.dumps(spec))
    assert main(["train", "stage2", "--config", str(tmp_path / "stage2.json")]) == 0
    trained = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "out" / "final")
    assert isinstance(trained.config, InstructBlipConfig)
    after = trained.state_dict()
    for name, value in start.items():
        if name.startswith("language_model."):
            assert torch.equal(after[name], value), f"the frozen language model changed: {name}"
    # The instruction's word embeddings got gradients: the prompt went through the Q-Former.
    assert not torch.equal(after["qformer.embeddings.word.weight"], start["qformer.embeddings.word.weight"])
