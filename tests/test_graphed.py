"""graphed_generate (static cache, CUDA-graph step) against our own greedy generate.

On CPU the static step runs eagerly: these tests check that it chooses exactly the tokens
`model.generate` chooses (left padding, eos lists, early stop, padding of finished rows,
min_new_tokens / min_length), that its cached buffers are reused safely, and that what it
does not support raises. The CUDA graph itself is exercised by bench/bench_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from blip2 import Blip2Config, Blip2ForConditionalGeneration
from blip2.modeling.graphed import _DECODERS, graphed_generate
from conftest import BASE_OPT, BASE_QFORMER, BASE_VISION, redraw_

T5_TEXT = dict(model_type="t5", vocab_size=40, d_model=32, d_kv=8, num_heads=4, d_ff=37, num_layers=1,
               num_decoder_layers=1, relative_attention_num_buckets=8, relative_attention_max_distance=16,
               pad_token_id=0, eos_token_id=1, bos_token_id=1, decoder_start_token_id=0)


def tiny(text=None, seed=0, queries=3):
    config = Blip2Config(vision_config=dict(BASE_VISION), qformer_config=dict(BASE_QFORMER),
                         text_config={**BASE_OPT, "vocab_size": 40, **(text or {})}, num_query_tokens=queries)
    torch.manual_seed(seed)
    return redraw_(Blip2ForConditionalGeneration(config), std=0.3, seed=seed).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def prompts(model, lengths=(4, 2), seed=0):
    """Images and left-padded prompts starting with BOS."""
    g = torch.Generator().manual_seed(seed)
    B, width = len(lengths), max(lengths)
    pixel_values = torch.randn(B, 3, 16, 16, generator=g)
    ids = torch.full((B, width), BASE_OPT["pad_token_id"])
    mask = torch.zeros(B, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(4, 40, (n,), generator=g)
        ids[row, width - n] = BASE_OPT["bos_token_id"]
        mask[row, width - n:] = 1
    return pixel_values, ids, mask


def same(model, inputs, **kwargs):
    """Asserts graphed_generate == generate for these inputs and settings; returns the ids."""
    expected = model.generate(*inputs, **kwargs)
    got = graphed_generate(model, *inputs, **kwargs)
    assert got.tolist() == expected.tolist(), kwargs
    return got


def early_tokens(model, inputs, n=12):
    """The first n tokens each row generates without eos (candidates for eos ids)."""
    out = model.generate(*inputs, max_new_tokens=n, eos_token_id=None)
    return out[:, 1:].tolist()


def late_eos(rows, after=3):
    """Per row, a token it first chooses after `after` steps and no row chooses sooner: as eos ids,
    every row runs several steps and they end at different steps."""
    return [next(t for i, t in enumerate(row[after:], after)
                 if t not in row[:i] and all(t not in r[:after] for r in rows)) for row in rows]


@pytest.mark.parametrize("lengths", [(3,), (4, 2), (1, 5, 3)])
def test_no_eos_runs_to_max_new_tokens(model, lengths):
    out = same(model, prompts(model, lengths), max_new_tokens=12, eos_token_id=None)
    assert out.shape == (len(lengths), 13)


def test_default_eos_and_captioning_without_prompt(model):
    pixel_values, _, _ = prompts(model, (2, 2))
    same(model, (pixel_values,), max_new_tokens=10)


def test_eos_stops_rows_at_different_steps_and_pads(model):
    inputs = prompts(model, (4, 2, 3), seed=5)  # a seed where every row has a late_eos candidate
    rows = early_tokens(model, inputs)
    eos = late_eos(rows)
    out = same(model, inputs, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    assert 5 <= out.shape[1] < 14 and (out[:, -1] == 0).any()  # ran some steps, stopped early, padded a row
    same(model, inputs, max_new_tokens=16, eos_token_id=eos[:1])  # pad = eos; other rows may run on
    row0 = tuple(t[:1] for t in inputs)
    assert same(model, row0, max_new_tokens=16, eos_token_id=rows[0][0]).shape[1] == 2  # ends at once


def test_min_new_tokens_and_min_length_ban_eos(model):
    inputs = prompts(model, (4, 2))
    first, _ = early_tokens(model, inputs)
    for kwargs in (dict(min_new_tokens=5), dict(min_length=4), dict(min_new_tokens=16)):
        out = same(model, inputs, max_new_tokens=16, eos_token_id=first[0], **kwargs)
        assert out.shape[1] >= 5


def test_one_new_token(model):
    same(model, prompts(model, (4, 2)), max_new_tokens=1)


def test_post_layer_norm_model():
    m = tiny(dict(do_layer_norm_before=False, tie_word_embeddings=False), seed=1, queries=5)
    same(m, prompts(m, (3, 5)), max_new_tokens=10, eos_token_id=None)


def test_any_decoder_only_family_gets_the_static_step():
    """Llama (rotary positions, grouped keys and values) runs the same static step, through its own forward."""
    llama = dict(model_type="llama", intermediate_size=40, num_key_value_heads=2, max_position_embeddings=64,
                 pad_token_id=BASE_OPT["pad_token_id"], bos_token_id=BASE_OPT["bos_token_id"],
                 eos_token_id=BASE_OPT["eos_token_id"])
    config = Blip2Config(vision_config=dict(BASE_VISION), qformer_config=dict(BASE_QFORMER),
                         text_config=dict(llama, vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4), num_query_tokens=3)
    torch.manual_seed(2)
    m = redraw_(Blip2ForConditionalGeneration(config), std=0.3, seed=2).eval()
    same(m, prompts(m, (4, 2)), max_new_tokens=10, eos_token_id=None)
    dynamic = Blip2Config.from_dict({**config.to_dict(), "text_config": {
        **config.text_config.to_dict(), "rope_scaling": {"type": "dynamic", "factor": 2.0}}})
    with pytest.raises(ValueError, match="dynamic rope scaling"):
        graphed_generate(Blip2ForConditionalGeneration(dynamic).eval(), *prompts(m, (3,)), max_new_tokens=4)


def test_cached_decoder_is_reused_and_rebuilt_when_shapes_change(model):
    inputs = prompts(model, (4, 2))
    same(model, inputs, max_new_tokens=10, eos_token_id=None)
    decoder = _DECODERS[model.language_model]
    same(model, prompts(model, (3, 3), seed=1), max_new_tokens=12)  # same batch and bucket: stale slots hidden
    assert _DECODERS[model.language_model] is decoder
    same(model, prompts(model, (4,)), max_new_tokens=10)  # another batch size: a new decoder
    assert _DECODERS[model.language_model] is not decoder


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2), "num_beams"),
    (dict(do_sample=True), "do_sample"),
    (dict(repetition_penalty=1.3), "repetition_penalty"),
    (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
    (dict(forced_eos_token_id=3), "forced_eos_token_id"),
    (dict(cuda_graph=True), "CUDA"),
    (dict(streamer=object()), "stream"),
])
def test_unsupported_settings_raise(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        graphed_generate(model, *prompts(model), max_new_tokens=4, **kwargs)


def test_training_mode_and_t5_raise(model):
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            graphed_generate(model, *prompts(model), max_new_tokens=4)
    finally:
        model.eval()
    config = Blip2Config(vision_config=dict(BASE_VISION), qformer_config=dict(BASE_QFORMER),
                         text_config=T5_TEXT, num_query_tokens=3)
    t5 = Blip2ForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="decoder-only"):
        graphed_generate(t5, torch.randn(1, 3, 16, 16), max_new_tokens=4)
