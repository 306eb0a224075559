"""Training faults: a half-precision checkpoint trains in float32; a NaN loss or gradient stops the run
keeping the last good checkpoint; damaged checkpoints, latest.json and metrics lines do not block resume;
bad images are found before training; leftover temporary files are cleaned."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

from blip2 import Blip2ForConditionalGeneration
from blip2.io import atomic_write_text
from blip2.train.data import ImageTextDataset
from blip2.train.loop import METRICS, CheckpointError, NonFiniteError, TrainConfig, Trainer
from train_helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    one_thread,
    stage2_config,
    write_dataset,
    write_tokenizer,
)


class Toy(nn.Module):
    """A one-weight objective whose loss turns NaN from micro-batch `nan_from` on."""

    def __init__(self, nan_from: int | None = None, dtype=torch.float32) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=dtype))
        self.nan_from = nan_from

    def forward(self, batch, step):
        loss = ((self.w.float() - batch["x"].mean(0)) ** 2).sum()
        if self.nan_from is not None and step >= self.nan_from:
            loss = loss * math.nan
        return {"loss": loss}


DATA = [{"x": torch.full((3,), float(i))} for i in range(8)]


def collate(items):
    return {"x": torch.stack([i["x"] for i in items])}


def config(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(out_dir=str(tmp_path), max_steps=2, batch_size=2, lr=0.1, min_lr=0.01,
                                 save_every=1, progress=False, grad_clip=1.0), **kw})


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(Toy(nan_from=2), DATA, collate, config(tmp_path, max_steps=5))
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan.*step-00000002\.pt"):
        trainer.fit()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*.pt")) == ["step-00000001.pt", "step-00000002.pt"]
    assert torch.isfinite(torch.load(folder / "step-00000002.pt", weights_only=True)["model"]["w"]).all()
    assert torch.isfinite(trainer.objective.w).all()  # the bad step never reached the weights


def test_a_half_precision_model_is_refused_by_the_trainer(tmp_path):
    with pytest.raises(ValueError, match="float16.*float32"):
        Trainer(Toy(dtype=torch.float16), DATA, collate, config(tmp_path))


def test_stage2_from_a_float16_checkpoint_trains_in_float32(tmp_path):
    from blip2.cli import main

    from conftest import redraw_

    # Weights like a trained checkpoint's: a fresh model's image encoder is drawn with std 1e-10 (the
    # reference's rule), which float16 rounds to exact zeros, and its query tokens are zero.
    model = redraw_(Blip2ForConditionalGeneration(stage2_config()), std=0.02)
    model.half().save_pretrained(tmp_path / "fp16")
    spec = {
        "model": {"pretrained": str(tmp_path / "fp16")},
        "data": {"train": str(write_dataset(tmp_path / "data", n=4)),
                 "tokenizer": str(write_tokenizer(tmp_path / "tokenizer.json"))},
        "train": {"out_dir": str(tmp_path / "out"), "batch_size": 2, "max_steps": 3, "progress": False},
    }
    (tmp_path / "stage2.json").write_text(json.dumps(spec))
    assert main(["train", "stage2", "--config", str(tmp_path / "stage2.json")]) == 0
    logged = [json.loads(line) for line in (tmp_path / "out" / METRICS).read_text().splitlines()]
    assert len(logged) == 3 and all(math.isfinite(r["loss"]) for r in logged)
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-00000003.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())


def two_checkpoints(tmp_path) -> None:
    Trainer(Toy(), DATA, collate, config(tmp_path)).fit()


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_a_damaged_latest_checkpoint_is_named_and_the_older_one_used(tmp_path, capsys, damage):
    two_checkpoints(tmp_path)
    latest = tmp_path / "checkpoints" / "step-00000002.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2] if damage == "truncate" else bytes(len(data)))
    trainer = Trainer(Toy(), DATA, collate, config(tmp_path, max_steps=3))
    assert trainer.resume() and trainer.step == 1
    err = capsys.readouterr().err
    assert "step-00000002.pt" in err and "weights_only=False" not in err


def test_no_readable_checkpoint_is_an_error_naming_each(tmp_path):
    two_checkpoints(tmp_path)
    for path in (tmp_path / "checkpoints").glob("step-*.pt"):
        path.write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match="step-00000001.pt") as err:
        Trainer(Toy(), DATA, collate, config(tmp_path, max_steps=3)).resume()
    assert "step-00000002.pt" in str(err.value) and "weights_only=False" not in str(err.value)


def test_a_corrupt_latest_json_and_a_torn_metrics_line_do_not_block_resume(tmp_path):
    two_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "latest.json").write_text('{"step": 2, "fi')
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"step": 3, "lo')  # a kill mid-line
    trainer = Trainer(Toy(), DATA, collate, config(tmp_path, max_steps=3))
    trainer.fit()
    assert trainer.step == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / METRICS).read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_leftover_temporary_files_are_removed(tmp_path):
    two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoints"
    stale = [folder / ".step-00000003.pt.k1ll3d.tmp", folder / ".latest.json.abc.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    Trainer(Toy(), DATA, collate, config(tmp_path, max_steps=3)).fit()
    assert not any(p.exists() for p in stale)
    other = tmp_path / ".notes.txt.zzz.tmp"
    other.write_text("left by a killed save")
    atomic_write_text(tmp_path / "notes.txt", "done")
    assert not other.exists() and (tmp_path / "notes.txt").read_text() == "done"


def test_bad_images_are_found_before_training_naming_file_and_line(tmp_path):
    jsonl = write_dataset(tmp_path / "data", n=5)
    folder = jsonl.parent
    (folder / "img1.png").unlink()  # line 2: missing
    data = (folder / "img3.png").read_bytes()
    (folder / "img3.png").write_bytes(data[: len(data) - 30])  # line 4: truncated
    (folder / "img4.png").write_bytes(b"")  # line 5: empty
    with pytest.raises(ValueError) as err:
        ImageTextDataset.from_path(jsonl, 8)
    message = str(err.value)
    assert "3 image(s)" in message
    assert f"{jsonl}:2" in message and "img1.png: no such file" in message
    assert f"{jsonl}:4" in message and "img3.png" in message
    assert f"{jsonl}:5" in message and "empty" in message


def test_a_truncated_jpeg_is_found_up_front(tmp_path):
    from PIL import Image

    jsonl = write_dataset(tmp_path / "data", n=2)
    image = Image.open(jsonl.parent / "img0.png").convert("RGB").resize((64, 64))
    image.save(jsonl.parent / "photo.jpg", quality=90)
    data = (jsonl.parent / "photo.jpg").read_bytes()
    (jsonl.parent / "photo.jpg").write_bytes(data[: len(data) // 2])
    with open(jsonl, "a") as f:
        f.write(json.dumps({"image": "photo.jpg", "caption": "red square"}) + "\n")
    with pytest.raises(ValueError, match=r"captions.jsonl:3: .*photo.jpg: truncated"):
        ImageTextDataset.from_path(jsonl, 8)


def test_an_image_damaged_after_the_check_names_its_line(tmp_path):
    jsonl = write_dataset(tmp_path / "data", n=2)
    dataset = ImageTextDataset.from_path(jsonl, 8)
    shutil.copy(jsonl, jsonl.parent / "img1.png")  # replaced by text while training
    with pytest.raises(ValueError, match=r"captions.jsonl:2: image .*img1.png cannot be read"):
        dataset[1]


@pytest.mark.parametrize("name,value", [
    ("max_steps", 0), ("batch_size", -1), ("accumulation_steps", 0), ("lr", math.nan), ("lr", 0.0),
    ("min_lr", -1.0), ("grad_clip", math.inf), ("weight_decay", math.nan), ("warmup_steps", -2),
    ("keep_checkpoints", 0), ("betas", [0.9, math.nan]), ("betas", [0.9]), ("max_steps", 2.5),
])
def test_every_numeric_training_setting_is_checked(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"train.{name}"):
        TrainConfig.from_dict({"out_dir": str(tmp_path), name: value})


@pytest.mark.parametrize("template", ["Q: {0}", "{q}", "{} {}", "none"])
def test_a_bad_question_template_in_the_training_config_is_named(template):
    from blip2.train.data import PromptedText

    with pytest.raises(ValueError, match="data.question_template"):
        PromptedText(question_template=template)
    assert PromptedText(question_template="{json} Q: {}")({"question": "why", "answer": "x"})[0] == "{json} Q: why"
