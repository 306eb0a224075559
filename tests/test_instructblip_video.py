"""InstructBlipVideoForConditionalGeneration and InstructBlipVideoProcessor.

The test suite has transformers 4.37.2, which has no video class, so parity with the newest release
is checked against a golden fixture it wrote (tests/fixtures/video_newest/, made by
tests/fixtures/make_video_golden.py): its processor's outputs, logits and generated tokens for a
tiny random model it saved. The video model is also checked against the per-frame composition of
our own image path (itself at parity with 4.37.2, tests/test_instructblip.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import blip2
from blip2 import InstructBlipForConditionalGeneration, InstructBlipVideoConfig, InstructBlipVideoForConditionalGeneration
from blip2.generation import generate
from blip2.processing import ImageInputError, InstructBlipVideoProcessor, InstructBlipVideoVideoProcessor
from conftest import assert_close
from test_instructblip import build_pair, inputs

GOLDEN = Path(__file__).parent / "fixtures" / "video_newest"


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    meta = json.loads((GOLDEN / "meta.json").read_text())
    return load_file(str(GOLDEN / "expected.safetensors")), meta, list(np.load(GOLDEN / "frames.npy"))


def test_processor_equals_the_newest_release(golden):
    expected, meta, videos = golden
    processor = blip2.load_processor(GOLDEN / "model")
    assert isinstance(processor, InstructBlipVideoProcessor)
    got = processor(images=videos, text=meta["texts"], padding=True, return_tensors="pt")
    assert list(got.keys()) == meta["keys"]
    for key in meta["keys"]:
        assert torch.equal(got[key], expected[key]), key
    assert got["pixel_values"].shape == (2, 4, 3, 30, 30)
    assert int((got["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<video>")).sum(dim=1)[0]) == 4 * 4


@torch.no_grad()
def test_model_equals_the_newest_release(golden):
    expected, meta, _ = golden
    model = blip2.load_model(GOLDEN / "model")
    assert isinstance(model, InstructBlipVideoForConditionalGeneration)
    assert model.config.video_token_index == model.config.image_token_index == 300
    x = {key: expected[key] for key in meta["keys"]}
    assert_close(model(**x).logits, expected["logits"], "logits")
    for name, kwargs in meta["generate"].items():
        new = kwargs["max_new_tokens"]  # the reference returns the prompt first; ours BOS + the new tokens
        assert torch.equal(model.generate(**x, **kwargs)[:, -new:], expected[f"generate_{name}"][:, -new:]), name


def test_processor_save_and_load(golden, tmp_path):
    expected, meta, videos = golden
    InstructBlipVideoProcessor.from_pretrained(GOLDEN / "model").save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "processor_config.json").read_text())
    assert settings["num_query_tokens"] == 4 and settings["video_processor"]["size"] == {"height": 30, "width": 30}
    again = InstructBlipVideoProcessor.from_pretrained(tmp_path)
    got = again(images=videos, text=meta["texts"], padding=True, return_tensors="pt")
    for key in meta["keys"]:
        assert torch.equal(got[key], expected[key]), key


def test_video_processor_inputs_and_errors(golden):
    _, _, videos = golden
    processor = InstructBlipVideoVideoProcessor.from_pretrained(GOLDEN / "model")
    want = processor(videos, return_tensors="pt")["pixel_values"]  # (2, 4, 3, 30, 30)
    as_tensor = torch.from_numpy(np.stack(videos)).permute(0, 1, 4, 2, 3)  # (B, F, 3, H, W)
    assert torch.equal(processor(as_tensor, return_tensors="pt")["pixel_values"], want)
    assert torch.equal(processor(list(videos[1]), return_tensors="pt")["pixel_values"], want[1:])  # a list of frames
    assert torch.equal(processor(videos[0][2], return_tensors="pt")["pixel_values"], want[:1, 2:3])  # one frame
    with pytest.raises(ValueError, match=r"different frame counts \[4, 3\]"):
        processor([videos[0], videos[1][:3]], return_tensors="pt")
    assert [v.shape[0] for v in processor([videos[0], videos[1][:3]])["pixel_values"]] == [4, 3]
    with pytest.raises(ImageInputError, match="video 1: its frames differ in size"):
        processor([videos[0], [videos[1][0], videos[1][1][:20]]])
    with pytest.raises(ValueError, match="do_sample_frames"):
        InstructBlipVideoVideoProcessor(do_sample_frames=True)
    with pytest.raises(ValueError, match="bicubic"):
        InstructBlipVideoVideoProcessor(resample=2)


def test_text_holds_frames_times_queries_video_tokens(golden):
    """The reference always writes 4 x num_query_tokens; ours counts the frames, so 2-frame videos fit the model."""
    _, meta, videos = golden
    processor = InstructBlipVideoProcessor.from_pretrained(GOLDEN / "model")
    short = [v[:2] for v in videos]
    x = processor(images=short, text=meta["texts"], padding=True, return_tensors="pt")
    assert (x["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<video>")).sum(dim=1).tolist() == [8, 8]
    model = blip2.load_model(GOLDEN / "model")
    assert model.generate(**x, max_new_tokens=3).shape == (2, 4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    image_model, _, _, folder = build_pair("vicuna_gqa_caf2", tmp_path_factory)
    # An InstructBLIP (image) checkpoint, as transformers' docs load into the video class: same weights.
    video = InstructBlipVideoForConditionalGeneration.from_pretrained(folder)
    assert isinstance(video.config, InstructBlipVideoConfig) and json.loads(video.config.to_json_string())[
        "model_type"] == "instructblipvideo"
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
