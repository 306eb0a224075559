"""Search algorithms against transformers 4.37 `generate`, token for token.

The stepper here wraps a tiny random reference OPT with its own past_key_values and feeds
it a prompt of embeddings exactly as Blip2 does (query embeddings, then the prompt's token
embeddings), so any difference comes from the search code alone.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from blip2.generation import GenerationConfig, generate, resolve_config

transformers = pytest.importorskip("transformers")
from transformers import OPTConfig, OPTForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

BOS, PAD = 2, 1


class HFStepper:
    """The Stepper protocol over a reference causal LM and its past_key_values."""

    def __init__(self, model, inputs_embeds, attention_mask):
        self.model, self.embeds, self.mask = model, inputs_embeds, attention_mask
        self.past = None
        self.calls = {"prefill": 0, "step": 0, "select": 0}

    def prefill(self):
        self.calls["prefill"] += 1
        out = self.model(inputs_embeds=self.embeds, attention_mask=self.mask, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1]

    def step(self, tokens):
        self.calls["step"] += 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1]

    def select(self, index):
        self.calls["select"] += 1
        self.past = tuple(tuple(t.index_select(0, index) for t in layer) for layer in self.past)
        self.mask = self.mask.index_select(0, index)


def tiny_opt(seed: int) -> OPTForCausalLM:
    """A random OPT whose logits are spread out (std ~3), so near-ties do not decide anything.

    The head is untied from the embeddings: a tied random model mostly repeats its last token.
    """
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    hidden = pick([16, 32])
    config = OPTConfig(
        vocab_size=pick([20, 28, 40]), hidden_size=hidden, word_embed_proj_dim=hidden, ffn_dim=2 * hidden,
        num_hidden_layers=pick([1, 2]), num_attention_heads=pick([2, 4]), max_position_embeddings=64,
        do_layer_norm_before=pick([True, True, False]), dropout=0.0, attention_dropout=0.0,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=3, tie_word_embeddings=False, init_std=0.3,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 3.0 / hidden**0.5)
    return model


def blip_inputs(model, seed: int, batch: int, prompted: bool):
    """Query embeddings then (left-padded) prompt embeddings, with the matching mask, as Blip2 builds them."""
    g = torch.Generator().manual_seed(1000 + seed)
    V, D = model.config.vocab_size, model.config.hidden_size
    queries = torch.randn(batch, 1 + seed % 3, D, generator=g)
    if prompted:
        lengths = torch.randint(1, 6, (batch,), generator=g).tolist()
        lengths[0] = 5  # the longest row, so at least one row is unpadded
    else:
        lengths = [1] * batch  # captioning: the prompt is BOS alone
    width = max(lengths)
    ids = torch.full((batch, width), PAD)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.cat([torch.tensor([BOS]), torch.randint(4, V, (n - 1,), generator=g)])
        mask[row, width - n :] = 1
    with torch.no_grad():
        embeds = torch.cat([queries, model.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat([torch.ones(batch, queries.shape[1], dtype=torch.long), mask], dim=1)
    return embeds, mask


def reference(model, embeds, mask, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


def ours(model, embeds, mask, generator=None, **kwargs):
    stepper = HFStepper(model, embeds, mask)
    config = resolve_config(model.config, **kwargs)
    start = torch.full((embeds.shape[0], 1), config.bos_token_id)
    with torch.no_grad():
        return generate(stepper, start, config, generator=generator), stepper


def assert_same(model, embeds, mask, **kwargs):
    expected = reference(model, embeds, mask, **kwargs)
    got, stepper = ours(model, embeds, mask, **kwargs)
    assert torch.equal(got, expected), f"{kwargs}\nours:\n{got}\nreference:\n{expected}"
    assert stepper.calls["prefill"] == 1
    return got


SEEDS = range(6)

# `eos`: how many of the model's favourite tokens end a sequence ("int" for one as a bare int);
# favourites make eos likely, so hypotheses finish at different lengths and rows get padded.
GREEDY = [
    dict(max_new_tokens=12),
    dict(max_length=9, eos="int"),
    dict(max_new_tokens=15, eos=3),
    dict(max_new_tokens=12, eos="int", pad_token_id=0),
    dict(max_new_tokens=12, repetition_penalty=1.6, eos=2),
    dict(max_new_tokens=12, repetition_penalty=0.6, eos=1),
    dict(max_new_tokens=14, no_repeat_ngram_size=2, eos=2),
    dict(max_new_tokens=14, no_repeat_ngram_size=1),
    dict(max_new_tokens=10, min_length=7, eos=2),
    dict(max_new_tokens=10, min_new_tokens=4, eos=2),
    dict(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=2, eos=3),
    dict(max_new_tokens=8, forced_bos_token_id=7, forced_eos_token_id=[5, 6]),
]

BEAM = [
    dict(num_beams=2, max_new_tokens=10),
    dict(num_beams=2, max_new_tokens=10, eos="int"),
    dict(num_beams=3, max_new_tokens=10, eos=2, num_return_sequences=3),
    dict(num_beams=4, max_new_tokens=9, length_penalty=-1.0, eos=3),
    dict(num_beams=4, max_new_tokens=9, length_penalty=2.0, early_stopping=True, eos=1),
    dict(num_beams=3, max_new_tokens=9, length_penalty=0.0, early_stopping="never", num_return_sequences=2, eos=2),
    dict(num_beams=3, max_new_tokens=9, length_penalty=1.5, early_stopping="never", eos=1),
    dict(num_beams=3, max_new_tokens=9, length_penalty=-2.0, early_stopping="never", eos="int"),
    dict(num_beams=5, max_length=8, length_penalty=-1.0, num_return_sequences=5, eos=3),
    dict(num_beams=5, max_new_tokens=10, early_stopping=True, num_return_sequences=4, eos="int"),
    dict(num_beams=3, max_new_tokens=10, repetition_penalty=1.5, no_repeat_ngram_size=2, eos=1),
    dict(num_beams=3, max_new_tokens=10, min_length=6, num_return_sequences=2, eos=2),
    dict(num_beams=2, max_new_tokens=10, min_new_tokens=3, repetition_penalty=0.8, eos=1),
    dict(num_beams=3, max_length=7, forced_bos_token_id=9, forced_eos_token_id=4, eos=1),
]


def favourite_tokens(model, embeds, mask) -> list[int]:
    """The model's most frequent output tokens for these inputs, most frequent first."""
    got, _ = ours(model, embeds, mask, max_new_tokens=15, eos_token_id=None, pad_token_id=PAD,
                  num_beams=3, num_return_sequences=3)
    counts = torch.bincount(got[:, 1:].flatten(), minlength=model.config.vocab_size)
    counts[[PAD, BOS]] = -1
    return counts.argsort(descending=True, stable=True).tolist()


def concrete(case: dict, favourites: list[int]) -> dict:
    case = dict(case)
    eos = case.pop("eos", None)
    # Skipping the very favourite keeps most sequences from ending at once.
    if eos == "int":
        case["eos_token_id"] = favourites[1]
    elif eos:
        case["eos_token_id"] = favourites[1 : 1 + eos]
    case.setdefault("pad_token_id", PAD)
    return case


def run_grid(seed, prompted, grid):
    model = tiny_opt(seed)
    embeds, mask = blip_inputs(model, seed, batch=1 + seed % 3, prompted=prompted)
    favourites = favourite_tokens(model, embeds, mask)
    return [assert_same(model, embeds, mask, **concrete(case, favourites)) for case in grid]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("prompted", [False, True], ids=["caption", "prompt"])
def test_greedy_matches_reference(seed, prompted):
    run_grid(seed, prompted, GREEDY)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("prompted", [False, True], ids=["caption", "prompt"])
def test_beam_search_matches_reference(seed, prompted):
    run_grid(seed, prompted, BEAM)


def test_cases_exercise_eos_and_padding():
    """The grids are only meaningful if sequences do end early, at different lengths."""
    ended = padded = 0
    for seed in SEEDS[:3]:
        for grid in (GREEDY, BEAM):
            for out in run_grid(seed, True, grid):
                ended += int((out[:, 1:] == PAD).any(dim=1).sum())
                padded += int(out.shape[1] < 8)
    assert ended >= 20 and padded >= 3, (ended, padded)


def test_defaults_come_from_the_model_config():
    """No kwargs: max_length 20 (BOS counts), eos/pad/bos from the text config, as the reference."""
    model = tiny_opt(1)
    embeds, mask = blip_inputs(model, 1, batch=2, prompted=True)
    got = assert_same(model, embeds, mask)
    assert got.shape[1] <= 20 and (got[:, 0] == BOS).all()


def test_max_length_counts_bos_and_max_new_tokens_wins():
    model = tiny_opt(2)
    embeds, mask = blip_inputs(model, 2, batch=1, prompted=True)
    kw = dict(eos_token_id=None, pad_token_id=PAD)
    assert ours(model, embeds, mask, max_length=6, **kw)[0].shape == (1, 6)
    assert ours(model, embeds, mask, max_new_tokens=6, **kw)[0].shape == (1, 7)
    assert ours(model, embeds, mask, max_length=30, max_new_tokens=4, **kw)[0].shape == (1, 5)
    assert_same(model, embeds, mask, max_length=30, max_new_tokens=4, **kw)


def test_beams_prefill_once_and_expand_by_select():
    model = tiny_opt(3)
    embeds, mask = blip_inputs(model, 3, batch=2, prompted=True)
    _, stepper = ours(model, embeds, mask, num_beams=4, max_new_tokens=5, eos_token_id=None, pad_token_id=PAD)
    assert stepper.calls == {"prefill": 1, "step": 4, "select": 5}  # one expansion, then one reorder per step


# ---- processors, one by one, against the reference's classes ----

def test_processors_equal_the_reference_classes():
    from transformers.generation.logits_process import (
        NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper,
    )
    from blip2.generation import processors as P

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        V, L = 30, 1 + trial
        scores = torch.randn(4, V, generator=g) * 3
        history = torch.randint(0, 6, (4, L), generator=g)  # few distinct ids: n-grams repeat
        for n in (1, 2, 3, 4):
            expected = NoRepeatNGramLogitsProcessor(n)(history, scores.clone())
            assert torch.equal(P.no_repeat_ngram(scores.clone(), history, n), expected), (trial, n)
        for penalty in (0.5, 1.7):
            expected = RepetitionPenaltyLogitsProcessor(penalty)(history, scores.clone())
            assert torch.equal(P.repetition_penalty(scores.clone(), history, penalty), expected)
        for k, keep in ((1, 1), (5, 1), (3, 4)):
            expected = TopKLogitsWarper(k, min_tokens_to_keep=keep)(history, scores.clone())
            assert torch.equal(P.top_k(scores.clone(), k, keep), expected)
        for p, keep in ((0.3, 1), (0.9, 1), (0.05, 3), (1e-6, 1)):
            expected = TopPLogitsWarper(p, min_tokens_to_keep=keep)(history, scores.clone())
            assert torch.equal(P.top_p(scores.clone(), p, keep), expected)


# ---- sampling ----

SAMPLING = [
    dict(do_sample=True, max_new_tokens=10),
    dict(do_sample=True, max_new_tokens=10, temperature=0.7, top_k=5, num_return_sequences=3),
    dict(do_sample=True, max_new_tokens=10, top_k=0, top_p=0.8, eos_token_id=[3, 5]),
    dict(do_sample=True, max_new_tokens=10, temperature=1.5, top_p=0.9, repetition_penalty=1.3),
    dict(do_sample=True, num_beams=3, max_new_tokens=8, top_k=10, eos_token_id=[3, 5], num_return_sequences=2),
]


@pytest.mark.parametrize("seed", range(3))
def test_sampling_draws_like_the_reference_under_a_global_seed(seed):
    """Same logits, same filters, same multinomial calls: the same draws as the reference."""
    model = tiny_opt(seed)
    embeds, mask = blip_inputs(model, seed, batch=2, prompted=True)
    for case in SAMPLING:
        torch.manual_seed(seed)
        expected = reference(model, embeds, mask, pad_token_id=PAD, **case)
        torch.manual_seed(seed)
        got, _ = ours(model, embeds, mask, pad_token_id=PAD, **case)
        assert torch.equal(got, expected), case


def test_top_k_1_is_greedy():
    model = tiny_opt(4)
    embeds, mask = blip_inputs(model, 4, batch=3, prompted=True)
    greedy, _ = ours(model, embeds, mask, max_new_tokens=12, pad_token_id=PAD)
    sampled, _ = ours(model, embeds, mask, max_new_tokens=12, pad_token_id=PAD, do_sample=True, top_k=1)
    assert torch.equal(sampled, greedy)


def test_seed_and_generator_make_sampling_reproducible():
    model = tiny_opt(5)
    embeds, mask = blip_inputs(model, 5, batch=2, prompted=True)
    kw = dict(max_new_tokens=12, pad_token_id=PAD, do_sample=True, top_k=0, temperature=2.0)
    a, _ = ours(model, embeds, mask, seed=7, **kw)
    b, _ = ours(model, embeds, mask, seed=7, **kw)
    d, _ = ours(model, embeds, mask, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, d)  # at temperature 2 over 24 tokens a collision is vanishingly unlikely
    # seed=: every input draws from its own stream, as it would alone (the first row of a is row 0 alone).
    for row in range(2):
        c, _ = ours(model, embeds[row : row + 1], mask[row : row + 1], generator=torch.Generator().manual_seed(7), **kw)
        assert torch.equal(a[row, : c.shape[1]], c[0]) and bool((a[row, c.shape[1]:] == PAD).all())
    # generator=: one stream for the whole batch, drawn as the reference draws from the global RNG.
    e, _ = ours(model, embeds, mask, generator=torch.Generator().manual_seed(7), **kw)
    torch.manual_seed(7)
    assert torch.equal(e, ours(model, embeds, mask, **kw)[0])


class FixedLogits:
    """A stepper whose first logits are given: for checking the sampling distribution itself."""

    def __init__(self, logits):
        self.logits = logits

    def prefill(self):
        return self.logits.clone()

    def step(self, tokens):
        raise AssertionError("one token only")

    def select(self, index):
        self.logits = self.logits.index_select(0, index)


def expected_probs(logits, temperature, k, p):
    """The distribution the filters should leave, computed the plain way: sort, cut, renormalise."""
    scaled = (logits.double() / temperature).tolist()
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = order[: k or len(order)]
    probs = torch.tensor([scaled[i] for i in keep], dtype=torch.double).softmax(0).tolist()
    kept, mass = [], 0.0
    for i, q in zip(keep, probs):
        kept.append(i)
        mass += q
        if mass >= p - 1e-12:
            break
    out = torch.zeros(len(scaled), dtype=torch.double)
    out[kept] = torch.tensor([scaled[i] for i in kept], dtype=torch.double).softmax(0)
    return out


@pytest.mark.parametrize("temperature,k,p", [(1.0, 0, 1.0), (0.7, 6, 1.0), (1.3, 0, 0.75), (0.9, 8, 0.8)])
def test_first_token_frequencies_match_the_filtered_softmax(temperature, k, p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=g) * 1.5
    draws = 20000
    config = GenerationConfig(do_sample=True, max_new_tokens=1, temperature=temperature, top_k=k, top_p=p,
                              num_return_sequences=draws, seed=123)
    tokens = generate(FixedLogits(logits), torch.zeros(1, 1, dtype=torch.long), config)[:, 1]
    counts = torch.bincount(tokens, minlength=12).double()
    probs = expected_probs(logits[0], temperature, k, p)
    assert (counts[probs == 0] == 0).all(), "a filtered-out token was drawn"
    live = probs > 0
    expected = probs[live] * draws
    chi2 = float(((counts[live] - expected) ** 2 / expected).sum())
    dof = int(live.sum()) - 1
    # Far above the 99.9th percentile of chi-square for these degrees of freedom (<= 11): ~31.
    assert chi2 < max(dof, 1) + 8 * (2 * max(dof, 1)) ** 0.5, (chi2, dof)


# ---- errors ----

@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(eos_token_id=[]), "eos_token_id"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(None, **kwargs)


def test_unknown_kwargs_are_named():
    with pytest.raises(TypeError, match="num_beam'"):
        resolve_config(None, num_beam=3)


def test_max_length_without_room_is_an_error():
    config = GenerationConfig(max_length=1)
    with pytest.raises(ValueError, match="max_length"):
        generate(FixedLogits(torch.zeros(1, 5)), torch.zeros(1, 1, dtype=torch.long), config)


def test_streamer_with_beams_is_an_error():
    config = GenerationConfig(num_beams=2)
    with pytest.raises(ValueError, match="num_beams"):
        generate(FixedLogits(torch.zeros(1, 5)), torch.zeros(1, 1, dtype=torch.long), config, streamer=object())
