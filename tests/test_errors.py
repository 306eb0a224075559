"""Bad input gets a ValueError or TypeError that names the problem, not a shape error from deep inside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blip2 import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Model,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
)
from blip2.checkpoint import CheckpointError
from conftest import BASE_OPT, BASE_QFORMER, BASE_VISION, make_inputs

VOCAB = BASE_OPT["vocab_size"]
SIZE = BASE_VISION["image_size"]


def config(**kwargs) -> Blip2Config:
    return Blip2Config(vision_config=dict(BASE_VISION), qformer_config=dict(BASE_QFORMER),
                       text_config=dict(BASE_OPT), num_query_tokens=4, **kwargs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Blip2ForConditionalGeneration(config()).eval()


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return Blip2Model(config()).eval()


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(config())


def raises(exc, *words):
    """pytest.raises that also checks the message names each of `words`."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            handled = self.ctx.__exit__(*args)
            if not handled:  # no exception, or one of another type: pytest reports it
                return handled
            message = str(self.info.value)
            for word in words:
                assert word in message, f"{word!r} not in error message: {message}"
            return handled
    return Check()


# ---------------------------------------------------------------- pixel_values
BAD_PIXELS = {
    "rank 3": (torch.zeros(3, SIZE, SIZE), ValueError, ["pixel_values", "(3, 16, 16)"]),
    "rank 5": (torch.zeros(1, 2, 3, SIZE, SIZE), ValueError, ["pixel_values", "(batch, 3, height, width)"]),
    "1 channel": (torch.zeros(2, 1, SIZE, SIZE), ValueError, ["3 channels", "got 1"]),
    "4 channels": (torch.zeros(2, 4, SIZE, SIZE), ValueError, ["3 channels", "got 4"]),
    "wrong size": (torch.zeros(2, 3, 20, 20), ValueError, ["20x20", "16x16", "interpolate_pos_encoding"]),
    "not square": (torch.zeros(2, 3, SIZE, 12), ValueError, ["16x12", "16x16"]),
    "integers": (torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), TypeError, ["pixel_values", "uint8"]),
    "numpy": (np.zeros((2, 3, SIZE, SIZE), dtype=np.float32), TypeError, ["pixel_values", "ndarray"]),
    "None": (None, (TypeError, ValueError), ["pixel_values"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PIXELS))
def test_bad_pixel_values(model, base_model, inputs, case):
    pixels, exc, words = BAD_PIXELS[case]
    ids = inputs["input_ids"]
    with raises(exc, *words):
        model(pixels, ids)
    with raises(exc, *words):
        base_model.get_image_features(pixels)
    with raises(exc, *words):
        base_model.get_qformer_features(pixels)
    vision = Blip2VisionModel(config().vision_config)
    with raises(exc, *words):
        vision(pixels)


def test_images_smaller_than_a_patch_even_with_interpolation(model, inputs):
    with raises(ValueError, "smaller than one 4-pixel patch"):
        model(torch.zeros(2, 3, 3, 16), inputs["input_ids"], interpolate_pos_encoding=True)


# ---------------------------------------------------------------- token ids
@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1000, -1])
def test_token_ids_outside_the_vocabulary(model, base_model, inputs, bad):
    ids = inputs["input_ids"].clone()
    ids[1, 2] = bad
    with raises(ValueError, "input_ids", f"token id {bad}", f"[0, {VOCAB})"):
        model(inputs["pixel_values"], ids)
    with raises(ValueError, f"token id {bad}"):
        base_model.get_text_features(ids)


def test_input_ids_of_the_wrong_type_or_rank(model, inputs):
    with raises(TypeError, "input_ids", "integer"):
        model(inputs["pixel_values"], inputs["input_ids"].float())
    with raises(TypeError, "input_ids"):
        model(inputs["pixel_values"], inputs["input_ids"].tolist())
    with raises(ValueError, "input_ids", "(batch, length)"):
        model(inputs["pixel_values"], inputs["input_ids"][0])


def test_labels_outside_the_vocabulary(model, inputs):
    labels = inputs["labels"].clone()
    labels[0, -1] = VOCAB + 5
    with raises(ValueError, "labels", f"token id {VOCAB + 5}"):
        model(**{**inputs, "labels": labels})


def test_image_token_count_must_match_the_queries(inputs):
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config(image_token_index=VOCAB - 1)).eval()
    ids = inputs["input_ids"].clone()
    ids[:, :3] = VOCAB - 1  # three image tokens, four queries
    with raises(ValueError, "4 image tokens", str(VOCAB - 1)):
        model(inputs["pixel_values"], ids)


def test_sequence_longer_than_the_position_table(model, inputs):
    limit = BASE_OPT["max_position_embeddings"]
    ids = torch.randint(4, VOCAB, (2, limit))  # plus 4 queries: past the table
    with raises(ValueError, "max_position_embeddings", str(limit)):
        model(inputs["pixel_values"], ids)


# ---------------------------------------------------------------- batch sizes
def test_mismatched_batch_sizes(model, base_model, inputs):
    pixels, ids = inputs["pixel_values"], inputs["input_ids"]
    with raises(ValueError, "batch sizes differ", "2 images", "3 rows"):
        model(pixels, torch.cat([ids, ids[:1]]))
    with raises(ValueError, "batch sizes differ"):
        base_model(pixels[:1], ids)
    with raises(ValueError, "attention_mask", "(3, 5)", "(2, 5)"):
        model(pixels, ids, attention_mask=torch.ones(3, 5, dtype=torch.long))
    with raises(ValueError, "attention_mask", "(2, 4)"):
        model(pixels, ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with raises(ValueError, "labels", "(3, 5)"):
        model(pixels, ids, labels=torch.zeros(3, 5, dtype=torch.long))
    with raises(ValueError, "labels", "(2, 50)"):
        model(pixels, ids, labels=torch.zeros(2, 50, dtype=torch.long))


# ---------------------------------------------------------------- the standalone Q-Former
@pytest.fixture(scope="module")
def qformer():
    torch.manual_seed(0)
    return Blip2QFormerModel(Blip2QFormerConfig(**BASE_QFORMER)).eval()


def test_qformer_inputs(qformer):
    D, Dv = BASE_QFORMER["hidden_size"], BASE_QFORMER["encoder_hidden_size"]
    queries, image = torch.zeros(2, 4, D), torch.zeros(2, 17, Dv)
    with raises(ValueError, "query_embeds", f"(batch, num_queries, {D})", "(2, 4, 24)"):
        qformer(torch.zeros(2, 4, 24), encoder_hidden_states=image)
    with raises(ValueError, "query_embeds", "(4, 32)"):
        qformer(torch.zeros(4, D), encoder_hidden_states=image)
    with raises(ValueError, "batch sizes differ", "query_embeds 2", "encoder_hidden_states 3"):
        qformer(queries, encoder_hidden_states=torch.zeros(3, 17, Dv))
    with raises(ValueError, "encoder_hidden_states", f"(batch, length, {Dv})", "(2, 17, 24)"):
        qformer(queries, encoder_hidden_states=torch.zeros(2, 17, 24))
    with raises(ValueError, "attention_mask", "(2, 5)", "(2, 4)"):
        qformer(queries, attention_mask=torch.ones(2, 5), encoder_hidden_states=image)
    with raises(ValueError, "encoder_attention_mask", "(2, 9)", "(2, 17)"):
        qformer(queries, encoder_attention_mask=torch.ones(2, 9), encoder_hidden_states=image)
    with raises(ValueError, "head_mask", "(3, 4)"):
        qformer(queries, head_mask=torch.ones(3, 4), encoder_hidden_states=image)
    with raises(ValueError, "encoder_hidden_states must be given"):
        qformer(queries)


# ---------------------------------------------------------------- configs of the wrong type
def test_models_reject_configs_of_the_wrong_class():
    with raises(TypeError, "Blip2Model", "Blip2Config", "Blip2VisionConfig"):
        Blip2Model(Blip2VisionConfig())
    with raises(TypeError, "Blip2ForConditionalGeneration", "Blip2Config", "dict"):
        Blip2ForConditionalGeneration({"num_query_tokens": 4})
    with raises(TypeError, "Blip2VisionModel", "Blip2VisionConfig", "Blip2Config"):
        Blip2VisionModel(Blip2Config())
    with raises(TypeError, "Blip2QFormerModel", "Blip2QFormerConfig", "Blip2VisionConfig"):
        Blip2QFormerModel(Blip2VisionConfig())


def test_config_fields_of_the_wrong_type():
    with raises(TypeError, "Blip2VisionConfig.image_size", "int", "str"):
        Blip2Config(vision_config={"image_size": "224"})
    with raises(TypeError, "Blip2QFormerConfig.num_hidden_layers", "int", "float"):
        Blip2Config(qformer_config={"num_hidden_layers": 2.0})
    with raises(TypeError, "OPTConfig.vocab_size"):
        Blip2Config(text_config={"model_type": "opt", "vocab_size": None} | {"vocab_size": "big"})
    with raises(TypeError, "Blip2Config.text_config"):
        Blip2Config(text_config=5)


def test_config_file_with_a_wrong_type_is_named(tmp_path: Path):
    data = config().to_dict()
    data["vision_config"]["patch_size"] = "14"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with raises(TypeError, "patch_size", "str"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)


# ---------------------------------------------------------------- loading
def test_loading_errors_are_value_and_file_errors(tmp_path: Path):
    assert issubclass(CheckpointError, ValueError)
    with raises(FileNotFoundError, "/nonexistent/blip2-dir"):
        Blip2Model.from_pretrained("/nonexistent/blip2-dir")
    with raises(FileNotFoundError, "config.json", str(tmp_path)):
        Blip2Model.from_pretrained(tmp_path)
    config().save_pretrained(tmp_path)
    with raises(CheckpointError, "no weights", str(tmp_path)):
        Blip2Model.from_pretrained(tmp_path)
    with raises(TypeError, "unexpected", "low_cpu_mem_usage_typo"):
        Blip2Model.from_pretrained(tmp_path, low_cpu_mem_usage_typo=True)
