"""`blip2 train` in one command: derived config, --config / --print-config, the examples, TensorBoard
logs, the trainer's evaluation metrics, and the demo fine-tune that improves held-out captions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from blip2.cli import main
from blip2.demo import MODEL_DIR, RETRIEVAL_DIR
from blip2.demo.dataset import write_split
from blip2.train.data import ImageTextDataset, read_records
from blip2.train.defaults import held_out_images
from blip2.train.recipes import hold_out

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def printed_config(capsys, *argv) -> dict:
    assert main(["train", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Images of colour-shape pairs the demo's Q-Former never saw, captioned plainly: 32 to learn
    from, 32 others to evaluate on."""
    root = tmp_path_factory.mktemp("heldout")
    return (write_split(root / "train", "heldout", 32, plain=True).parent,
            write_split(root / "val", "heldout", 32, start=20000, plain=True).parent)


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the worked example
def test_one_command_finetune_improves_heldout_captions(heldout, tmp_path, capsys):
    train, val = heldout
    out = tmp_path / "run"
    assert main(["train", "stage2", "--model", str(MODEL_DIR), "--data", str(train), "--eval-data", str(val),
                 "--out", str(out), "--no-progress"]) == 0
    cider = {r["step"]: r["eval_caption_CIDEr"] for r in logged(out) if "eval_caption_CIDEr" in r}
    steps = sorted(cider)
    assert steps[0] == 0 and len(steps) >= 3  # the starting model, then every evaluation
    # measured: 3.86 before, 6.39 after 40 steps (the derived schedule for 32 captions)
    assert cider[steps[-1]] > cider[0] + 1.0, cider
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == steps[-1]

    # the TensorBoard file holds losses, lr, grad norm, throughput, metrics, and samples as text and images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/examples_per_s", "eval/lm",
            "eval/caption_CIDEr", "eval/caption_BLEU-4"} <= scalars
    assert "eval/samples" in events.Tags()["images"]
    assert any(t.startswith("eval/samples") for t in events.Tags()["tensors"])  # text is stored as tensors


# ---------------------------------------------------------------- the resolved config
def test_print_config_derives_everything_and_config_and_flags_override(heldout, tmp_path, capsys):
    train, _ = heldout
    spec = printed_config(capsys, "stage2", "--model", str(MODEL_DIR), "--data", str(train), "--out", "o")
    assert spec["data"]["tokenizer"] == str(MODEL_DIR) and spec["data"]["question_template"] == "Question: {} Answer:"
    assert spec["data"]["suffix"] == "\n" and spec["data"]["feature_cache"] == "memory"
    t = spec["train"]
    # 32 captions: batch 8, 10 epochs of 4 batches; 768/128 x the paper's fine-tuning rate
    assert (t["batch_size"], t["max_steps"], t["eval_every"]) == (8, 40, 0)  # no eval data, too few to hold out
    assert t["lr"] == pytest.approx(6e-5) and t["bf16"] is False and t["out_dir"] == "o"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train": {"lr": 1e-3, "max_steps": 7}, "data": {"prompt": "a photo of"}}))
    over = printed_config(capsys, "stage2", "--model", str(MODEL_DIR), "--data", str(train), "--out", "o",
                          "--config", str(config), "--max-steps", "9")
    assert over["train"]["lr"] == 1e-3 and over["data"]["prompt"] == "a photo of"
    assert over["train"]["max_steps"] == 9 and over["train"]["eval_every"] == 0  # the flag beats the file
    # the printed config, given back, resolves to itself
    config.write_text(json.dumps(over))
    assert printed_config(capsys, "stage2", "--config", str(config)) == over


def test_held_out_split_when_there_is_no_eval_data(tmp_path, capsys):
    data = write_split(tmp_path / "d", "train", 40).parent
    spec = printed_config(capsys, "stage2", "--model", str(MODEL_DIR), "--data", str(data), "--out", "o")
    assert spec["data"]["eval_holdout"] == 8 and spec["train"]["eval_every"] > 0
    assert held_out_images(39) == 0 and held_out_images(1000) == 50 and held_out_images(10**6) == 1000
    dataset = ImageTextDataset(read_records(data), transform=None)
    train, evaluation = hold_out(dataset, 8)
    held = {r["image"] for r in evaluation.records}
    assert len(held) == 8 and not held & {r["image"] for r in train.records}  # whole images, all their captions
    assert len(train.records) + len(evaluation.records) == len(dataset.records) == 40 * 8
    assert held == {r["image"] for r in hold_out(dataset, 8)[1].records}  # the same split every time


def test_examples_resolve(heldout, capsys):
    train, _ = heldout
    common = ["--model", str(MODEL_DIR), "--data", str(train), "--out", "o"]
    caption = printed_config(capsys, "stage2", "--config", str(EXAMPLES / "caption_finetune.yaml"), *common)
    assert caption["data"]["prompt"] == "a photo of" and caption["train"]["lr"] == 1e-5
    assert caption["train"]["max_steps"] == 40  # derived: the file leaves it open
    vqa = printed_config(capsys, "stage2", "--config", str(EXAMPLES / "vqa_finetune.yaml"), *common)
    assert vqa["model"]["recompute_lm"] is True and vqa["train"]["accumulation_steps"] == 4
    lora = printed_config(capsys, "stage2", "--config", str(EXAMPLES / "lora_finetune.yaml"), *common)
    assert lora["model"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    import yaml

    scratch = yaml.safe_load((EXAMPLES / "stage1_from_scratch.yaml").read_text())
    assert scratch["model"]["config"]["qformer_config"]["hidden_size"] == 768 and scratch["losses"]["itm"] == 1.0


# ---------------------------------------------------------------- stage 1 in one command
def test_stage1_from_the_retrieval_model_logs_retrieval_recall(tmp_path, capsys):
    data = write_split(tmp_path / "d", "train", 12, plain=True).parent
    out = tmp_path / "s1"
    assert main(["train", "stage1", "--model", str(RETRIEVAL_DIR), "--data", str(data), "--eval-data", str(data),
                 "--out", str(out), "--max-steps", "2", "--no-progress"]) == 0
    last = [r for r in logged(out) if "eval_retrieval_t2i_r1" in r][-1]
    assert last["step"] == 2 and 0 <= last["eval_retrieval_i2t_r1"] <= last["eval_retrieval_i2t_r5"] <= 1
    assert json.loads((out / "config.json").read_text())["losses"]["itc"] == 1.0


# ---------------------------------------------------------------- bad input
def train_error(capsys, *argv) -> str:
    """`blip2 train ...` fails with status 1 and one line on stderr."""
    assert main(["train", *argv]) == 1
    return capsys.readouterr().err


def test_stage2_from_a_model_without_language_model_names_the_file(heldout, capsys):
    train, _ = heldout
    err = train_error(capsys, "stage2", "--model", str(RETRIEVAL_DIR), "--data", str(train), "--out", "o")
    assert "retrieval/model.safetensors: no language model" in err
    err = train_error(capsys, "stage1", "--model", str(MODEL_DIR), "--data", str(train), "--out", "o")
    assert "model: a captioning checkpoint (it has a language model) cannot start stage 1" in err


def test_data_without_captions_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "caption": "ok"}) + "\n" + json.dumps({"image": "b.png", "label": 3}) + "\n")
    err = train_error(capsys, "stage2", "--model", str(MODEL_DIR), "--data", str(bad), "--out", "o")
    assert "bad.jsonl:2: a record needs a 'caption'" in err
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    err = train_error(capsys, "stage2", "--model", str(MODEL_DIR), "--data", str(folder), "--out", "o")
    assert "images holds no metadata.jsonl, data.jsonl or image + .txt" in err
    assert "no model: pass --model" in train_error(capsys, "stage2", "--data", str(bad), "--out", "o")
    yaml_file = tmp_path / "broken.yaml"
    yaml_file.write_text("train:\n  lr: [1,\n")
    assert re.search(r"broken\.yaml:\d+: not valid YAML", train_error(capsys, "stage2", "--config", str(yaml_file)))


def test_watch_logs_to_wandb_when_asked(tmp_path, monkeypatch):
    """W&B is optional and not installed for the tests: a stand-in module records what Watch sends."""
    import sys
    import types

    from blip2.train.watch import Watch

    sent = []
    run = types.SimpleNamespace(log=lambda data, step: sent.append((step, data)), finish=lambda: sent.append("done"))
    fake = types.ModuleType("wandb")
    fake.init = lambda project, dir, config: sent.append(("init", project)) or run
    fake.Table = lambda columns, data: ("table", columns, data)
    fake.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    image = write_split(tmp_path / "d", "train", 1).parent / "train-00000.png"
    watch = Watch(tmp_path, {"tensorboard": False, "wandb": "my-project"}, examples_per_step=8)
    watch({"step": 1, "epoch": 0, "lr": 1e-4, "loss": 2.0, "grad_norm": 0.5, "elapsed_s": 1.0})
    watch({"step": 3, "epoch": 0, "lr": 1e-4, "loss": 1.0, "grad_norm": 0.4, "elapsed_s": 2.0})
    watch({"step": 3, "eval_caption_CIDEr": 1.5})
    watch.samples(3, [{"image": str(image), "caption": "a red square", "references": ["a red circle"]}])
    watch.close()
    assert sent[0] == ("init", "my-project") and sent[-1] == "done"
    assert sent[2] == (3, {"train/lr": 1e-4, "train/loss": 1.0, "train/grad_norm": 0.4, "train/examples_per_s": 16.0})
    assert sent[3] == (3, {"eval/caption_CIDEr": 1.5})
    step, table = sent[4]
    assert step == 3 and table["eval/samples"][2][0][1:] == ["a red square", "a red circle"]
