"""Generation faults: non-finite options, empty or non-finite pixel batches, and a T5 max_new_tokens far
beyond what is generated (the cache and the history grow instead of being allocated up front)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from blip2 import Blip2Config, Blip2ForConditionalGeneration
from blip2.generation import search
from blip2.modeling import t5

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14)
QFORMER = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               encoder_hidden_size=32)
T5_TEXT = dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, num_heads=4, d_ff=37, num_layers=2,
               num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
               bos_token_id=1, decoder_start_token_id=0)
OPT_TEXT = dict(model_type="opt", vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=37,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1,
                bos_token_id=2, eos_token_id=2)


def tiny(text: dict, seed: int = 0) -> Blip2ForConditionalGeneration:
    torch.manual_seed(seed)
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text, num_query_tokens=4)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def opt():
    return tiny(OPT_TEXT)


@pytest.fixture(scope="module")
def flan():
    return tiny(T5_TEXT)


def pixels(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -1.0), ("top_p", math.nan),
    ("repetition_penalty", math.nan), ("length_penalty", math.inf), ("length_penalty", math.nan),
])
def test_non_finite_or_negative_options_are_named(opt, name, value):
    with pytest.raises(ValueError, match=name):
        opt.generate(pixels(), max_new_tokens=3, do_sample=name == "temperature", **{name: value})


def test_an_empty_batch_is_a_clear_error(opt):
    with pytest.raises(ValueError, match="no images"):
        opt.generate(pixels(0), max_new_tokens=3)


def test_nan_or_infinite_pixel_values_are_refused_naming_the_image(opt):
    bad = pixels(3)
    bad[1, 0, 5, 5] = math.nan
    with pytest.raises(ValueError, match=r"image\(s\) \[1\]"):
        opt.generate(bad, max_new_tokens=3)
    bad[1, 0, 5, 5] = math.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        opt(pixel_values=bad, input_ids=torch.ones(3, 2, dtype=torch.long))
    bad[1, 0, 5, 5], bad[2, 1, 0, 0] = -math.inf, math.inf  # the sum is NaN; both images named, in bfloat16 too
    with pytest.raises(ValueError, match=r"image\(s\) \[1, 2\]"):
        copy.deepcopy(opt).to(torch.bfloat16).generate(bad.to(torch.bfloat16), max_new_tokens=3)


def test_huge_finite_pixel_values_are_not_mistaken_for_infinite(opt):
    big = pixels(2)
    big[:, :, :2, :2] = 3e38  # finite, but their float32 sum overflows
    assert opt.generate(big, max_new_tokens=2).shape[0] == 2


@pytest.mark.parametrize("beams", [1, 3])
def test_growing_the_t5_cache_and_history_changes_no_token(flan, monkeypatch, beams):
    expected = flan.generate(pixels(), max_new_tokens=20, num_beams=beams, min_new_tokens=20)
    monkeypatch.setattr(t5.T5Stepper, "FIRST_CACHE_LEN", 2)
    monkeypatch.setattr(search, "FIRST_HISTORY_LEN", 3)
    grown = flan.generate(pixels(), max_new_tokens=20, num_beams=beams, min_new_tokens=20)
    assert torch.equal(grown, expected)


def test_t5_max_new_tokens_beyond_memory_costs_only_what_is_generated(flan):
    first = flan.generate(pixels(1), max_new_tokens=4)[0, 1:].tolist()
    stop = first[2]
    # With that token as eos, generation ends after a few tokens however many it was allowed:
    # a cache or history allocated for 10**9 tokens (terabytes) would fail here.
    ids = flan.generate(pixels(1), max_new_tokens=10**9, eos_token_id=stop)
    assert ids.shape[1] <= 4 and ids[0, -1].item() == stop
