"""InstructBlipVideoForConditionalGeneration. Only transformers 4.37.2 is installed here and it has
no video class, so there is no reference run: the video model is checked against the per-frame
composition of our own image path (itself at parity with 4.37.2, tests/test_instructblip.py)."""

from __future__ import annotations

import json

import pytest
import torch

from blip2 import InstructBlipForConditionalGeneration, InstructBlipVideoConfig, InstructBlipVideoForConditionalGeneration
from blip2.generation import generate
from conftest import assert_close
from test_instructblip import build_pair, inputs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    image_model, _, _, folder = build_pair("vicuna_gqa_caf2", tmp_path_factory)
    data = json.loads((folder / "config.json").read_text())
    video = InstructBlipVideoForConditionalGeneration.from_pretrained(
        folder, config=InstructBlipVideoConfig.from_dict({**data, "model_type": "instructblip_video"}))
    return image_model, video


def video_inputs(model, frames=3):
    x = inputs(model, batch=2)
    g = torch.Generator().manual_seed(7)
    size = model.config.vision_config.image_size
    x["pixel_values"] = torch.randn(2, frames, 3, size, size, generator=g)
    return x


def per_frame_language_inputs(image_model: InstructBlipForConditionalGeneration, x) -> torch.Tensor:
    """Each frame alone through the image model's path, its video's instruction; joined in order."""
    pieces = []
    for f in range(x["pixel_values"].shape[1]):
        pieces.append(image_model.language_inputs(x["pixel_values"][:, f], qformer_input_ids=x["qformer_input_ids"],
                                                  qformer_attention_mask=x["qformer_attention_mask"]))
    return torch.cat(pieces, dim=1)  # (B, F * Q, D)


@torch.no_grad()
def test_video_is_the_image_path_per_frame(models):
    image_model, video = models
    x = video_inputs(video)
    joined = per_frame_language_inputs(image_model, x)
    got = video.language_inputs(x["pixel_values"], qformer_input_ids=x["qformer_input_ids"],
                                qformer_attention_mask=x["qformer_attention_mask"])
    assert got.shape == (2, 3 * video.config.num_query_tokens, video.config.text_config.hidden_size)
    assert_close(got, joined, "video language inputs")
    # Forward: the language model over [frames' queries; prompt], with the loss.
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    out = video(**x, labels=labels)
    embeds, mask = image_model.merge(joined, x["input_ids"], x["attention_mask"])
    loss, logits, _ = image_model.language_forward(embeds, mask, labels=labels)
    assert_close(out.logits, logits, "video logits")
    assert_close(out.loss, loss, "video loss")


def test_video_generate_equals_generation_from_the_joined_frames(models):
    image_model, video = models
    x = video_inputs(video)
    joined = per_frame_language_inputs(image_model, x)
    for kwargs in (dict(max_new_tokens=6), dict(max_new_tokens=5, num_beams=3)):
        config = image_model.generation_config.updated(kwargs)
        stepper, start = image_model.stepper_from_language_inputs(joined, x["input_ids"], x["attention_mask"], config)
        assert torch.equal(video.generate(**x, **kwargs), generate(stepper, start, config)), kwargs


def test_one_frame_videos_give_the_image_model_tokens(models):
    image_model, video = models
    x = inputs(image_model, batch=2)
    one = {**x, "pixel_values": x["pixel_values"][:, None]}  # (B, 1, 3, H, W)
    assert torch.equal(video.generate(**one, max_new_tokens=6), image_model.generate(**x, max_new_tokens=6))


def test_video_errors(models):
    _, video = models
    x = video_inputs(video)
    with pytest.raises(ValueError, match=r"\(batch, frames, 3, height, width\)"):
        video.generate(**{**x, "pixel_values": x["pixel_values"][:, 0]})
    with pytest.raises(ValueError, match="qformer_input_ids"):
        video.generate(x["pixel_values"], input_ids=x["input_ids"])
