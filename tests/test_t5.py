"""T5 core against transformers 4.37.2: tiny random reference models, saved with the
reference's own save_pretrained, loaded with ours through the key table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration

from conftest import ATOL, assert_close, make_ref, save_ref, scale_of

from blip2.checkpoint import CheckpointError, hf_to_ours, load_into, ours_to_hf
from blip2.config import Blip2Config, T5Config
from blip2.keymap import t5_rules
from blip2.generation import GenerationConfig, generate
from blip2.modeling import t5 as t5_module
from blip2.modeling.t5 import T5LanguageModel, T5Stepper, relative_position_bucket

VOCAB = 99
EOS = 1
# T5 does not scale attention scores (its initialisation does instead), so weights re-drawn
# at the other tests' 0.2 make every softmax far sharper than a trained T5's and turn
# float32 rounding (e.g. PyTorch's tanh-GELU kernel against the reference's formula) into
# differences of 1e-5. At 0.1 the outputs are still of order one.
WEIGHT_STD = 0.1

# Gated and not, tied and untied, several bucket counts and distances, uneven stacks,
# d_kv * heads != d_model. Sequences below run past max_distance so the far buckets count.
CONFIGS = {
    "flan_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_model=32, d_kv=8,
                        num_heads=4, d_ff=37, num_layers=2, num_decoder_layers=3,
                        relative_attention_num_buckets=8, relative_attention_max_distance=20),
    "t5_relu_tied": dict(feed_forward_proj="relu", tie_word_embeddings=True, d_model=24, d_kv=6,
                         num_heads=4, d_ff=40, num_layers=3, num_decoder_layers=2,
                         relative_attention_num_buckets=32, relative_attention_max_distance=128),
    "flan_tied_narrow_heads": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=True, d_model=32, d_kv=5,
                                   num_heads=3, d_ff=29, num_layers=2, num_decoder_layers=2,
                                   relative_attention_num_buckets=16, relative_attention_max_distance=10),
    "relu_untied_few_buckets": dict(feed_forward_proj="relu", tie_word_embeddings=False, d_model=16, d_kv=4,
                                    num_heads=2, d_ff=24, num_layers=1, num_decoder_layers=2,
                                    relative_attention_num_buckets=4, relative_attention_max_distance=8),
    "gated_silu_untied": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False, d_model=16, d_kv=8,
                              num_heads=2, d_ff=20, num_layers=2, num_decoder_layers=1,
                              relative_attention_num_buckets=12, relative_attention_max_distance=30),
}


def hf_config(**overrides) -> HFT5Config:
    base = dict(vocab_size=VOCAB, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS)
    return HFT5Config(**{**base, **overrides})


class Pair:
    """A reference model (weights re-drawn so outputs are not small) and ours, loaded from
    the reference's own checkpoint through the key table."""

    def __init__(self, name: str, hc: HFT5Config, directory: Path, seed: int = 0, edit=None) -> None:
        self.name = f"t5:{name}"
        self.ref = make_ref(T5ForConditionalGeneration, hc, seed, std=WEIGHT_STD)
        if edit is not None:
            with torch.no_grad():
                edit(self.ref)
        self.directory = save_ref(self.ref, directory)
        self.cfg = T5Config.from_pretrained(directory)
        self.table = t5_rules(self.cfg, prefix="")
        self.ours = self.load(None)

    def load(self, dtype, keep_fp32=()) -> T5LanguageModel:
        return load_into(lambda: T5LanguageModel(self.cfg), self.directory, self.table, dtype, keep_fp32).eval()

    def check(self, actual, expected, what: str, atol: float = ATOL) -> None:
        """fp32 parity, recorded for the per-configuration summary."""
        assert scale_of(expected) > 1e-2, f"{what} is too small to prove anything"
        assert_close(actual, expected, what, atol, record=self.name)


def make_pair(name: str, directory: Path, edit=None, **overrides) -> Pair:
    return Pair(name, hf_config(**CONFIGS[name], **overrides), directory, edit=edit)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory) -> Pair:
    return make_pair(request.param, tmp_path_factory.mktemp(request.param))


def inputs(seed: int = 1, batch: int = 3, src: int = 31, tgt: int = 23):
    """Token ids with right padding on the encoder side and labels with ignored tails."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, src), generator=g)
    mask = torch.ones_like(ids)
    mask[1, src - src // 3:] = 0
    if batch > 2:
        mask[2, : src // 5] = 0  # left padding too
    labels = torch.randint(2, VOCAB, (batch, tgt), generator=g)
    labels[0, tgt - tgt // 4:] = -100
    return ids, mask, labels


def close(actual, expected, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- parity, fp32
@torch.no_grad()
def test_encoder_matches_reference(pair):
    ids, mask, _ = inputs()
    ref = pair.ref.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    ours = pair.ours.encode(pair.ours.embed(ids), mask, need_hidden=True, need_weights=True)
    pair.check(ours.last_hidden_state, ref.last_hidden_state, "encoder last_hidden_state")
    pair.check(ours.hidden_states, ref.hidden_states, "encoder hidden_states")
    pair.check(ours.attentions, ref.attentions, "encoder attentions")


@torch.no_grad()
def test_forward_logits_and_loss_match_reference(pair):
    ids, mask, labels = inputs()
    dec_mask = torch.ones_like(labels)
    dec_mask[0, -5:] = 0
    ref = pair.ref(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask,
                   output_hidden_states=True, output_attentions=True)
    ours = pair.ours(pair.ours.embed(ids), mask, labels=labels, decoder_attention_mask=dec_mask,
                     need_hidden=True, need_weights=True)
    pair.check(ours.logits, ref.logits, "logits")
    pair.check(ours.loss, ref.loss, "loss")
    pair.check(ours.encoder.last_hidden_state, ref.encoder_last_hidden_state, "encoder_last_hidden_state")
    pair.check(ours.decoder.hidden_states, ref.decoder_hidden_states, "decoder_hidden_states")
    pair.check(ours.decoder.attentions, ref.decoder_attentions, "decoder_attentions")
    pair.check(ours.decoder.cross_attentions, ref.cross_attentions, "cross_attentions")


@torch.no_grad()
def test_fused_attention_path_matches_reference(pair):
    """Without weights asked for, attention runs in PyTorch's fused kernel."""
    ids, mask, labels = inputs(seed=12)
    ref = pair.ref(input_ids=ids, attention_mask=mask, labels=labels)
    ours = pair.ours(pair.ours.embed(ids), mask, labels=labels)
    pair.check(ours.logits, ref.logits, "logits (fused attention)")
    pair.check(ours.loss, ref.loss, "loss (fused attention)")


@torch.no_grad()
def test_explicit_decoder_input_ids(pair):
    ids, mask, labels = inputs(seed=2)
    dec = pair.ours.shift_right(labels)
    assert torch.equal(dec, pair.ref._shift_right(labels))
    ref = pair.ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    ours = pair.ours(pair.ours.embed(ids), mask, decoder_input_ids=dec)
    assert ours.loss is None
    pair.check(ours.logits, ref.logits, "logits")


@torch.no_grad()
def test_loss_gradients_match_reference(pair):
    ids, mask, labels = inputs(seed=3, batch=2, src=9, tgt=6)
    pair.ref.zero_grad()
    with torch.enable_grad():
        pair.ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        model = pair.load(None)
        model(model.embed(ids), mask, labels=labels).loss.backward()
    theirs = {k: p.grad for k, p in pair.ref.named_parameters() if p.grad is not None}
    mine = ours_to_hf({k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()},
                      pair.table)
    for key, grad in mine.items():
        close(grad, theirs[key], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- cached decoding
@torch.no_grad()
def test_cached_steps_match_full_decode(pair):
    ids, mask, labels = inputs(seed=4)
    dec = pair.ours.shift_right(labels)
    model = pair.ours
    enc = model.encode(model.embed(ids), mask).last_hidden_state
    full = model.decode(dec, enc, mask).logits  # (B, T, V)
    cache = model.new_cache(enc, mask, max_len=dec.shape[1])
    pieces = [model.decode(dec[:, :5], cache=cache).logits]  # a prefill of several tokens, then single steps
    for t in range(5, dec.shape[1]):
        pieces.append(model.decode(dec[:, t : t + 1], cache=cache).logits)
    assert cache.length == dec.shape[1]
    close(torch.cat(pieces, dim=1), full)


@torch.no_grad()
def test_cache_reorder_expands_and_permutes_rows(pair):
    ids, mask, labels = inputs(seed=5, batch=2)
    dec = pair.ours.shift_right(labels)[:, :9]
    model = pair.ours
    enc = model.encode(model.embed(ids), mask).last_hidden_state
    cache = model.new_cache(enc, mask, max_len=9)
    model.decode(dec[:, :3], cache=cache)
    expand = torch.tensor([0, 0, 1, 1])
    cache.reorder(expand)  # beam expansion: 2 rows -> 4
    rows = dec[expand].clone()
    rows[1, 3:] = (rows[1, 3:] + 7) % VOCAB  # the beams of one input diverge
    steps = [model.decode(rows[:, 3:6], cache=cache).logits]
    permute = torch.tensor([1, 0, 3, 2])  # within each input: cross-attention rows stay put
    cache.reorder(permute)
    rows = rows[permute]
    steps.append(model.decode(rows[:, 6:8], cache=cache).logits)
    across = torch.tensor([2, 3, 0, 1])  # across inputs: they move too
    cache.reorder(across)
    rows = rows[across]
    steps.append(model.decode(rows[:, 8:], cache=cache).logits)
    order = expand[permute][across]
    full = model.decode(rows, enc[order], mask[order]).logits
    close(steps[2], full[:, 8:])
    close(steps[1][across], full[:, 6:8])
    close(steps[0][permute][across], full[:, 3:6])


def greedy(model: T5LanguageModel, ids, mask, max_new_tokens: int) -> torch.Tensor:
    """The reference's greedy search, over our cache: start token, then stop rows at eos."""
    cfg = model.config
    enc = model.encode(model.embed(ids), mask).last_hidden_state
    cache = model.new_cache(enc, mask, max_len=max_new_tokens)
    token = torch.full((ids.shape[0], 1), cfg.decoder_start_token_id)
    out, done = [token], torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = model.decode(token, cache=cache).logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, cfg.pad_token_id), nxt)
        done |= nxt == cfg.eos_token_id
        token = nxt[:, None]
        out.append(token)
        if done.all():
            break
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_greedy_generation_matches_reference(pair):
    ids, mask, _ = inputs(seed=6, batch=4, src=17)
    mask[3, :] = 1
    ref = pair.ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1)
    ours = greedy(pair.ours, ids, mask, 12)
    assert torch.equal(ours, ref), (ours, ref)


@torch.no_grad()
def test_greedy_stops_at_eos_like_reference(tmp_path):
    pair = make_pair("flan_untied", tmp_path)
    ids, mask, _ = inputs(seed=7, batch=3, src=11)
    # Turn the token row 0 would pick third into eos: that row stops early, the others run on.
    third = greedy(pair.ours, ids, mask, 3)[0, 3]
    pair.ref.lm_head.weight[EOS] = pair.ref.lm_head.weight[third] * 1.01
    pair.ref.save_pretrained(tmp_path)
    ours = greedy(pair.load(None), ids, mask, 10)
    ref = pair.ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert (ours == EOS).any() and ours.shape[1] > 4
    assert torch.equal(ours, ref), (ours, ref)


def run_generate(model: T5LanguageModel, ids, mask, **settings) -> torch.Tensor:
    """Our generation package over T5Stepper, with the model's special tokens."""
    cfg = model.config
    config = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                              decoder_start_token_id=cfg.decoder_start_token_id, **settings)
    stepper = T5Stepper(model, model.embed(ids), mask, config.new_token_limit(1))
    return generate(stepper, stepper.start_ids, config)


SEARCHES = {
    "greedy": dict(max_new_tokens=9),
    "beam": dict(num_beams=3, max_new_tokens=9),
    "beam_returns_and_penalty": dict(num_beams=4, num_return_sequences=2, length_penalty=-1.0, max_new_tokens=7),
    "beam_early_stopping": dict(num_beams=2, early_stopping=True, max_new_tokens=8, min_new_tokens=3),
    "penalties": dict(repetition_penalty=1.5, no_repeat_ngram_size=2, max_new_tokens=10),
    "sampling": dict(do_sample=True, top_k=10, top_p=0.9, temperature=0.7, max_new_tokens=8),
}


@pytest.mark.parametrize("search", sorted(SEARCHES))
@torch.no_grad()
def test_generate_matches_reference(pair, search):
    ids, mask, _ = inputs(seed=11, batch=3, src=13)
    settings = SEARCHES[search]
    torch.manual_seed(0)
    ref = pair.ref.generate(input_ids=ids, attention_mask=mask, **settings)
    torch.manual_seed(0)
    ours = run_generate(pair.ours, ids, mask, **settings)
    assert torch.equal(ours, ref), (ours, ref)


@torch.no_grad()
def test_beam_search_with_eos_matches_reference(tmp_path):
    pair = make_pair("flan_untied", tmp_path)
    ids, mask, _ = inputs(seed=7, batch=3, src=11)
    third = greedy(pair.ours, ids, mask, 3)[0, 3]
    pair.ref.lm_head.weight[EOS] = pair.ref.lm_head.weight[third] * 2.0  # beams end at different steps
    pair.ref.save_pretrained(tmp_path)
    ours_model = pair.load(None)
    for settings in (dict(num_beams=3, max_new_tokens=10), dict(num_beams=3, length_penalty=-1.0, max_new_tokens=10)):
        ref = pair.ref.generate(input_ids=ids, attention_mask=mask, **settings)
        ours = run_generate(ours_model, ids, mask, **settings)
        assert (ref == EOS).any()
        assert torch.equal(ours, ref), (settings, ours, ref)


# ---------------------------------------------------------------- buckets
def test_relative_position_buckets_match_reference():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    for buckets, distance in ((32, 128), (8, 20), (16, 10), (4, 8), (12, 30)):
        for bidirectional in (True, False):
            ref = T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            ours = relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(ours, ref), (buckets, distance, bidirectional)


# ---------------------------------------------------------------- the key table
def test_key_table_round_trips_the_reference_state(pair):
    state = pair.ref.state_dict()
    mine = ours_to_hf(pair.ours.state_dict(), pair.table)
    copies = set(state) - set(mine)
    assert copies <= set(pair.table.tied), copies - set(pair.table.tied)
    for key, tensor in mine.items():
        assert torch.equal(tensor, state[key]), key


def test_key_table_is_strict(pair):
    state = dict(pair.ref.state_dict())  # includes embed_tokens (and a tied lm_head) copies: accepted
    expected = {k: v.shape for k, v in pair.ours.state_dict().items()}
    hf_to_ours(state, pair.table, expected)
    missing = dict(state)
    del missing["decoder.block.0.layer.1.EncDecAttention.k.weight"]
    with pytest.raises(CheckpointError, match="EncDecAttention.k.weight"):
        hf_to_ours(missing, pair.table, expected)
    extra = {**state, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected"):
        hf_to_ours(extra, pair.table, expected)


def test_tied_and_untied_heads():
    tied = T5LanguageModel(T5Config(**CONFIGS["t5_relu_tied"], vocab_size=VOCAB))
    untied = T5LanguageModel(T5Config(**CONFIGS["flan_untied"], vocab_size=VOCAB))
    assert tied.lm_head.weight is tied.shared.weight
    assert untied.lm_head.weight is not untied.shared.weight
    assert "lm_head.weight" in t5_rules(tied.config, "").tied
    assert any(r.ours == "lm_head.weight" for r in t5_rules(untied.config, "").rules)


def test_blip2_prefix_and_config_round_trip():
    text = hf_config(**CONFIGS["flan_untied"]).to_dict()
    config = Blip2Config(text_config=text, num_query_tokens=4, image_token_index=32100)
    again = Blip2Config.from_dict(config.to_dict())
    assert again == config and isinstance(again.text_config, T5Config)
    assert again.is_encoder_decoder and not again.use_decoder_only_language_model
    assert again.text_config.feed_forward_proj == "gated-gelu" and again.text_config.num_decoder_layers == 3
    table = t5_rules(config.text_config)
    keys = {k for r in table.rules for k in r.hf}
    assert "language_model.shared.weight" in keys and "language_model.lm_head.weight" in keys
    assert "language_model.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in keys
    assert "language_model.encoder.embed_tokens.weight" in table.tied


# ---------------------------------------------------------------- low precision
def _blow_up(ref: T5ForConditionalGeneration, factor: float = 1e6) -> None:
    """Scales some feed-forward outputs past float16's range, as T5 v1.1's real weights do."""
    ref.encoder.block[0].layer[1].DenseReluDense.wo.weight *= factor
    ref.decoder.block[0].layer[2].DenseReluDense.wo.weight *= factor


@pytest.fixture(scope="module")
def large_activations(tmp_path_factory) -> Pair:
    return make_pair("flan_untied", tmp_path_factory.mktemp("large"), edit=_blow_up)


def _run(model, ids, mask, dec):
    return model(model.embed(ids), mask, decoder_input_ids=dec, need_hidden=True)


@torch.no_grad()
def test_float16_with_large_activations_stays_finite_and_close(large_activations, monkeypatch):
    pair = large_activations
    ids, mask, labels = inputs(seed=8)
    dec = pair.ours.shift_right(labels)
    exact = _run(pair.ours, ids, mask, dec)
    close(exact.logits, pair.ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
    peak = max(h.abs().max().item() for h in exact.encoder.hidden_states + exact.decoder.hidden_states)
    assert peak > 2 * torch.finfo(torch.float16).max  # the true activations do not fit in float16

    # Ours: loaded in float16 with wo kept in float32.
    half = pair.load(torch.float16, keep_fp32=T5LanguageModel.keep_in_fp32)
    assert half.encoder.layers[0].mlp.wo.weight.dtype == torch.float32
    assert half.encoder.layers[0].mlp.wi.weight.dtype == torch.float16
    out = _run(half, ids, mask, dec)
    assert out.logits.dtype == torch.float16 and torch.isfinite(out.logits).all()
    scale = exact.logits.abs().max()
    assert (out.logits.float() - exact.logits).abs().max() < 0.01 * scale
    close(out.encoder.last_hidden_state.float(), exact.encoder.last_hidden_state, atol=0.01, rtol=0.01)
    # ... and agrees with the reference loaded the same way.
    ref16 = T5ForConditionalGeneration.from_pretrained(pair.directory, torch_dtype=torch.float16).eval()
    theirs = ref16(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert (out.logits.float() - theirs.float()).abs().max() < 0.01 * scale

    # Naive float16: every weight in float16 and nothing done about overflow.
    naive = pair.load(torch.float16)
    monkeypatch.setattr(t5_module, "clamp_inf", lambda x: x)
    bad = _run(naive, ids, mask, dec)
    assert not torch.isfinite(bad.logits).all()
    monkeypatch.undo()
    # Clamping alone (the reference's fallback for an all-float16 model) does not rescue it:
    # the overflowing projection already mixes +inf and -inf into NaN, or clamped values are wrong.
    clamped = _run(naive, ids, mask, dec).logits.float()
    assert not (torch.isfinite(clamped).all() and (clamped - exact.logits).abs().max() < 0.1 * scale)


@torch.no_grad()
def test_float16_loss_and_cached_decoding(large_activations):
    pair = large_activations
    ids, mask, labels = inputs(seed=9)
    half = pair.load(torch.float16, keep_fp32=T5LanguageModel.keep_in_fp32)
    exact = pair.ours(pair.ours.embed(ids), mask, labels=labels)
    out = half(half.embed(ids), mask, labels=labels)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    close(out.loss, exact.loss, atol=0.02, rtol=0.01)
    dec = half.shift_right(labels)
    enc = half.encode(half.embed(ids), mask).last_hidden_state
    cache = half.new_cache(enc, mask, max_len=dec.shape[1])
    steps = torch.cat([half.decode(dec[:, t : t + 1], cache=cache).logits for t in range(dec.shape[1])], dim=1)
    assert torch.isfinite(steps).all()
    close(steps.float(), out.logits.float(), atol=0.02 * out.logits.abs().max().item(), rtol=0)


@torch.no_grad()
def test_bfloat16(large_activations):
    pair = large_activations
    ids, mask, labels = inputs(seed=10)
    low = pair.load(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    exact = pair.ours(pair.ours.embed(ids), mask, labels=labels)
    out = low(low.embed(ids), mask, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert (out.logits.float() - exact.logits).abs().max() < 0.05 * exact.logits.abs().max()
    close(out.loss, exact.loss, atol=0.1, rtol=0.02)
