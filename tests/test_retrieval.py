"""Retrieval classes against the newest reference (transformers 5.x), on committed fixtures.

The fixtures (tests/fixtures/retrieval/) are a tiny random Blip2ForImageTextRetrieval saved by
the reference's own save_pretrained, with the reference's outputs; make_retrieval_fixture.py
in that folder regenerates them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open

from blip2 import (
    Blip2ForImageTextRetrieval,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)
from blip2.checkpoint import CheckpointError
from conftest import assert_close, scale_of

FIXTURES = Path(__file__).parent / "fixtures" / "retrieval"
MODEL = FIXTURES / "model"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "expected.safetensors"))


@pytest.fixture(scope="module")
def model() -> Blip2ForImageTextRetrieval:
    return Blip2ForImageTextRetrieval.from_pretrained(MODEL)


def _inputs(expected, image_tokens: bool) -> dict:
    x = {k.removeprefix("input."): v for k, v in expected.items() if k.startswith("input.")}
    if not image_tokens:
        return x
    Q, B = 4, x["input_ids"].shape[0]
    token = int(_meta()["image_token_index"])
    x["input_ids"] = torch.cat([torch.full((B, Q), token), x["input_ids"]], dim=1)
    x["attention_mask"] = torch.cat([torch.ones(B, Q, dtype=torch.long), x["attention_mask"]], dim=1)
    return x


def _meta() -> dict:
    with safe_open(str(FIXTURES / "expected.safetensors"), framework="pt") as f:
        return f.metadata()


def _check(ours: torch.Tensor, expected: dict, key: str) -> None:
    ref = expected[key]
    assert scale_of(ref) > 0.05, f"{key}: the reference output is too small to tell models apart"
    assert_close(ours, ref, key, record="retrieval-newest")


@pytest.mark.parametrize("image_tokens", [False, True], ids=["text-only-ids", "image-tokens"])
@torch.no_grad()
def test_itm_and_itc_match_newest_reference(model, expected, image_tokens):
    prefix = "image_tokens." if image_tokens else ""
    model.config.image_token_index = int(_meta()["image_token_index"]) if image_tokens else None
    try:
        x = _inputs(expected, image_tokens)
        itm = model(x["pixel_values"], x["input_ids"][:2], x["attention_mask"][:2], use_image_text_matching_head=True)
        _check(itm.logits_per_image, expected, f"{prefix}itm.logits_per_image")
        _check(itm.text_embeds, expected, f"{prefix}itm.text_embeds")
        assert torch.equal(itm.logits_per_text, itm.logits_per_image.t())
        itc = model(**x)
        _check(itc.logits_per_image, expected, f"{prefix}itc.logits_per_image")
        _check(itc.text_embeds, expected, f"{prefix}itc.text_embeds")
        _check(itc.image_embeds, expected, f"{prefix}itc.image_embeds")
    finally:
        model.config.image_token_index = None


@torch.no_grad()
def test_one_sided_models_load_the_full_retrieval_checkpoint(expected):
    x = _inputs(expected, False)
    text = Blip2TextModelWithProjection.from_pretrained(MODEL)
    t = text(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
    _check(t.text_embeds, expected, "text_model.text_embeds")
    _check(t.last_hidden_state, expected, "text_model.last_hidden_state")
    vision = Blip2VisionModelWithProjection.from_pretrained(MODEL)
    v = vision(pixel_values=x["pixel_values"])
    _check(v.image_embeds, expected, "vision_model.image_embeds")
    _check(v.last_hidden_state, expected, "vision_model.last_hidden_state")


@torch.no_grad()
def test_tuple_outputs_follow_the_reference_order(model, expected):
    x = _inputs(expected, False)
    out = model(**x, return_dict=False)
    logits_per_image, logits_per_text, text_embeds, image_embeds, text_out, vision_out = out
    assert logits_per_image.shape == (2, 3) and text_embeds.shape == (3, 16) and image_embeds.shape == (2, 4, 16)
    assert isinstance(text_out, tuple) and isinstance(vision_out, tuple)


@torch.no_grad()
def test_save_and_reload_round_trips_the_reference_keys(model, expected, tmp_path):
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as ours, \
            safe_open(str(MODEL / "model.safetensors"), framework="pt") as ref:
        assert set(ours.keys()) == set(ref.keys())
        for key in ref.keys():
            assert torch.equal(ours.get_tensor(key), ref.get_tensor(key)), key
    again = Blip2ForImageTextRetrieval.from_pretrained(tmp_path)
    x = _inputs(expected, False)
    assert torch.equal(again(**x).logits_per_image, model(**x).logits_per_image)


def test_loading_is_strict_about_the_text_side(tmp_path):
    """A retrieval checkpoint without its text feed-forward is refused by name."""
    from safetensors.torch import save_file

    state = load_file(str(MODEL / "model.safetensors"))
    state = {k: v for k, v in state.items() if ".intermediate.dense" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((MODEL / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing keys: .*intermediate.dense"):
        Blip2ForImageTextRetrieval.from_pretrained(tmp_path)


def test_retrieval_needs_text_input():
    from blip2 import Blip2Config

    with pytest.raises(ValueError, match="use_qformer_text_input"):
        Blip2ForImageTextRetrieval(Blip2Config())


@torch.no_grad()
def test_float16_keeps_the_qformer_in_float32(expected):
    half = Blip2ForImageTextRetrieval.from_pretrained(MODEL, torch_dtype=torch.float16)
    assert half.vision_model.layers[0].mlp.fc1.weight.dtype == torch.float16
    assert half.qformer.layers[0].mlp.fc1.weight.dtype == torch.float32
    assert half.query_tokens.dtype == torch.float32
    x = _inputs(expected, False)
    x["pixel_values"] = x["pixel_values"].half()
    itc = half(**x)
    itm = half(x["pixel_values"], x["input_ids"][:2], x["attention_mask"][:2], use_image_text_matching_head=True)
    assert_close(itc.logits_per_image.float(), expected["itc.logits_per_image"], "fp16 itc", atol=2e-2)
    assert_close(itm.logits_per_image.float(), expected["itm.logits_per_image"], "fp16 itm", atol=5e-2)
