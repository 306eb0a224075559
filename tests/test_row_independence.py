"""A batch gives each row what it gives alone.

Random batches (prompt lengths, padding side, one image or one per row, greedy / beam / seeded
sampling, eos ids that end rows at different steps) over tiny OPT, T5 and Llama models: every row of
the batched `generate` must equal the same prompt generated alone, followed by padding. In
float32 exactly; in bfloat16 rows may part where two tokens tie within bf16's precision, and
the rate of rows that agree is reported at the end of the run (`BLIP2_ROW_CASES=200` for a
larger sample) and must stay above a floor.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from blip2 import Blip2Config, Blip2ForConditionalGeneration
from conftest import AGREEMENT, BASE_OPT, BASE_QFORMER, BASE_VISION, redraw_

CASES = int(os.environ.get("BLIP2_ROW_CASES", "12"))
BF16_FLOOR = 0.8  # rows that agree in bfloat16; measured rates are in the terminal summary

T5_TEXT = dict(model_type="t5", vocab_size=40, d_model=32, d_kv=8, num_heads=4, d_ff=37, num_layers=2,
               num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
               bos_token_id=1, decoder_start_token_id=0)
LLAMA_TEXT = dict(model_type="llama", vocab_size=40, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
# Not Llama's dynamic rope scaling: its base grows with the padded length, as the reference's does.
TEXT = {"opt": {**BASE_OPT, "vocab_size": 40}, "t5": T5_TEXT, "llama": LLAMA_TEXT}


def tiny(kind: str):
    config = Blip2Config(vision_config=dict(BASE_VISION), qformer_config=dict(BASE_QFORMER),
                         text_config=dict(TEXT[kind]), num_query_tokens=3)
    torch.manual_seed(0)
    std = 0.1 if kind == "t5" else 0.3  # T5 does not scale attention scores: keep its softmaxes soft
    return redraw_(Blip2ForConditionalGeneration(config), std=std, seed=1).eval()


@pytest.fixture(scope="module", params=list(TEXT))
def model(request):
    return tiny(request.param)


def random_batch(model, rng: random.Random):
    """(pixel_values, padded ids, mask, each row's unpadded prompt, the row's image index)."""
    text = model.config.text_config
    rows = rng.randint(2, 4)
    one_image = rng.random() < 0.3  # several questions about one image
    images = torch.randn(1 if one_image else rows, 3, 16, 16,
                         generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    prompts = []
    for _ in range(rows):
        body = [rng.randrange(4, text.vocab_size) for _ in range(rng.randint(1, 6))]
        if model.config.use_decoder_only_language_model:
            body[0] = text.bos_token_id
        prompts.append(body)
    side = rng.choice(["left", "right", "mixed"])
    width = max(map(len, prompts)) + rng.randint(0, 2)  # sometimes every row is padded
    ids = torch.full((rows, width), text.pad_token_id)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for r, body in enumerate(prompts):
        left = side == "left" or (side == "mixed" and rng.random() < 0.5)
        span = slice(width - len(body), width) if left else slice(0, len(body))
        ids[r, span] = torch.tensor(body)
        mask[r, span] = 1
    return images, ids, mask, prompts


def random_settings(rng: random.Random, vocab: int) -> dict:
    settings = dict(max_new_tokens=rng.randint(3, 7), eos_token_id=rng.sample(range(4, vocab), 2))
    kind = rng.choice(["greedy", "beam", "sample", "beam_sample"])
    if kind in ("beam", "beam_sample"):
        settings.update(num_beams=rng.choice([2, 3]), num_return_sequences=rng.choice([1, 2]))
    if kind in ("sample", "beam_sample"):
        settings.update(do_sample=True, seed=rng.randrange(1000), top_k=0, num_return_sequences=rng.choice([1, 2]))
    if rng.random() < 0.3:
        settings["repetition_penalty"] = 1.3
    return settings


def rows_agree(model, images, ids, mask, prompts, settings, dtype) -> list[bool]:
    """For each prompt: whether its rows of the batched output equal its solo run (then padding)."""
    pixels = images.to(dtype)
    batched = model.generate(pixels, ids, mask, **settings)
    copies = settings.get("num_return_sequences", 1)
    pad = model.generation_config.resolved_pad_token_id
    agree = []
    for r, body in enumerate(prompts):
        image = pixels[:1] if images.shape[0] == 1 else pixels[r : r + 1]
        alone = model.generate(image, torch.tensor([body]), **settings)  # (copies, L)
        mine = batched[r * copies : (r + 1) * copies]
        L = alone.shape[1]
        agree.append(mine.shape[1] >= L and torch.equal(mine[:, :L], alone) and bool((mine[:, L:] == pad).all()))
    return agree


def run_cases(model, dtype, cases: int, seed: int) -> tuple[int, int, list]:
    rng = random.Random(seed)
    equal = total = 0
    failures = []
    for case in range(cases):
        images, ids, mask, prompts = random_batch(model, rng)
        settings = random_settings(rng, model.config.text_config.vocab_size)
        agree = rows_agree(model, images, ids, mask, prompts, settings, dtype)
        equal += sum(agree)
        total += len(agree)
        if not all(agree):
            failures.append((case, settings, mask.tolist(), agree))
    return equal, total, failures


def test_every_row_equals_its_solo_run_in_float32(model):
    equal, total, failures = run_cases(model, torch.float32, CASES, seed=0)
    name = f"{model.config.text_config.model_type} float32"
    AGREEMENT[name] = [equal, total]
    assert not failures, f"{name}: rows differ from their solo runs: {failures}"


def test_bfloat16_rows_agree_up_to_ties(model):
    bf16 = tiny(model.config.text_config.model_type).to(torch.bfloat16)
    equal, total, failures = run_cases(bf16, torch.bfloat16, CASES, seed=1)
    name = f"{model.config.text_config.model_type} bfloat16"
    AGREEMENT[name] = [equal, total]
    assert equal >= BF16_FLOOR * total, f"{name}: {equal}/{total} rows agree: {failures}"



def test_graphed_generate_re_lays_right_padding_too():
    """graphed_generate builds the same stepper: right-padded prompts give the left-padded tokens."""
    from blip2.modeling.graphed import graphed_generate

    model = tiny("opt")
    rng = random.Random(5)
    while True:
        images, ids, mask, prompts = random_batch(model, rng)
        if not bool(mask[:, -1].all()) and images.shape[0] == ids.shape[0]:
            break  # a batch where some row ends in padding
    left_ids, left_mask = ids.clone(), mask.clone()
    width = ids.shape[1]
    for r, body in enumerate(prompts):
        left_ids[r] = model.config.text_config.pad_token_id
        left_ids[r, width - len(body):] = torch.tensor(body)
        left_mask[r] = 0
        left_mask[r, width - len(body):] = 1
    expected = model.generate(images, left_ids, left_mask, max_new_tokens=6)
    assert torch.equal(graphed_generate(model, images, ids, mask, max_new_tokens=6), expected)
