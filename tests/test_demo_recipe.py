"""The recipe end to end at toy size: every stage runs, and what it writes is a real checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration
from blip2.demo import recipe
from blip2.processing import Blip2Processor
from blip2.retrieval import Blip2ForImageTextRetrieval

TOY = replace(
    recipe.QUICK, train_images=48, pretrain_images=48, text_docs=60, vision_hidden=32, vision_layers=1, lm_hidden=32, lm_layers=1,
    qformer_hidden=32, qformer_layers=2, queries=4, itc_width=16, vision_steps=2, lm_steps=2, stage1_steps=2,
    stage2_steps=2, vision_batch=8, lm_batch=8, stage1_batch=8, stage2_batch=8, eval_scenes=4, eval_per_kind=2,
    retrieval_images=4,
)


def test_toy_recipe_writes_checkpoints_and_a_report(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    text = recipe.run(TOY, out, work, quick=True)
    assert (out / "REPORT.md").read_text() == text
    for row in ("stage 1 (ITG) + stage 2", "stage 2 only (no stage 1)", "ITC text-to-image", "The shipped model is"):
        assert row in text
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["validation"]) == {"full", "ablation"}
    best = max(scores["validation"].values())
    assert scores["validation"][scores["shipped"]] == best  # the better captioner ships
    assert text.count("(shipped) | heldout") == 1
    assert set(scores["scores"]["full"]["heldout"]["vqa"]) == {"colour", "shape", "count", "position", "yesno"}
    text_qa = scores["language_model_text_qa"]  # the frozen LM's own QA, reported beside VQA
    assert set(text_qa) == {"colour", "shape", "count", "position", "yesno"}
    assert all(0.0 <= v <= 1.0 for v in text_qa.values())
    assert "Given a caption as text" in text
    assert len(list((out / "examples").glob("*.png"))) >= 3

    model = Blip2ForConditionalGeneration.from_pretrained(out / "model")
    processor = Blip2Processor.from_pretrained(out / "model")
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["text_config"]["architectures"] == ["OPTForCausalLM"]  # transformers 4.37 reads it in generate
    assert not config["qformer_config"].get("use_qformer_text_input")  # the text side is not shipped here
    image = next((out / "examples").glob("*.png"))
    inputs = processor(images=[str(image)], return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=3).shape[0] == 1

    retrieval = Blip2ForImageTextRetrieval.from_pretrained(out / "retrieval")
    text_inputs = Blip2Processor.from_pretrained(out / "retrieval")(images=[str(image)], text=["a red circle"],
                                                                     return_tensors="pt")
    with torch.inference_mode():
        itm = retrieval(**text_inputs, use_image_text_matching_head=True).logits_per_image
    assert itm.shape == (1, 2)


def test_set_overrides_are_read_as_their_fields_types_and_bad_ones_are_named(tmp_path):
    from blip2.demo import instruct, retrieval_tune

    r = recipe.apply_sets(recipe.QUICK, ["stage1_steps=7", "stage1_lr=0.001", "ablation=false", "save_dtype=float32"])
    assert (r.stage1_steps, r.stage1_lr, r.ablation, r.save_dtype) == (7, 0.001, False, "float32")
    for main in (recipe.main, instruct.main, retrieval_tune.main):  # all three commands, before any work
        with pytest.raises(SystemExit, match="NAME one of"):
            main(["--out", str(tmp_path / "out"), "--quick", "--set", "no_such_field=1"])
        with pytest.raises(SystemExit, match="seed takes a whole number"):
            main(["--out", str(tmp_path / "out"), "--quick", "--set", "seed=zero"])
    with pytest.raises(SystemExit, match="ablation is true or false"):
        recipe.main(["--out", str(tmp_path / "out"), "--quick", "--set", "ablation=yes"])
    with pytest.raises(SystemExit, match="expected NAME=VALUE"):
        instruct.main(["--out", str(tmp_path / "out"), "--quick", "--set", "ablation"])
