"""BLIP-2 with a T5 language model against transformers 4.37.2 on tiny random configurations.

The reference model is built with re-drawn weights, saved with its own save_pretrained,
and loaded by ours; outputs are compared in fp32 (1e-5), and what ours saves must load
into the reference unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Blip2Config as RefBlip2Config
from transformers import Blip2ForConditionalGeneration as RefBlip2ForConditionalGeneration
from transformers import Blip2Model as RefBlip2Model

from blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2Model, T5Config
from conftest import BASE_QFORMER, BASE_VISION, assert_close, make_inputs, make_ref, max_abs_diff, save_ref, scale_of

# T5 does not scale attention scores: weights re-drawn smaller than the OPT tests' 0.2
# keep its softmaxes as soft as a trained model's (see test_t5.py).
WEIGHT_STD = 0.1
BASE_T5 = dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, num_heads=4, d_ff=37, num_layers=2,
               num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1,
               pad_token_id=0, eos_token_id=1, bos_token_id=1, decoder_start_token_id=0)

# Flan-T5 style (gated GELU, untied head) and original T5 style (ReLU, tied head, rescaled),
# different query counts, layer counts, buckets and Q-Former shapes.
CONFIGS = {
    "flan_t5": dict(),
    "t5_relu_tied": dict(
        text=dict(feed_forward_proj="relu", tie_word_embeddings=True, num_layers=1, num_decoder_layers=3,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128, d_kv=6),
        qformer=dict(cross_attention_frequency=2, num_hidden_layers=3),
        num_query_tokens=6,
    ),
    "flan_t5_narrow": dict(
        text=dict(d_model=24, num_heads=3, d_kv=5, d_ff=20, num_layers=3, num_decoder_layers=1,
                  relative_attention_num_buckets=4, relative_attention_max_distance=6),
        vision=dict(hidden_size=24, num_attention_heads=3, intermediate_size=20),
        num_query_tokens=3,
    ),
}

FLAGS = dict(output_attentions=True, output_hidden_states=True)
SEQ2SEQ_FIELDS = ("logits", "past_key_values", "decoder_hidden_states", "decoder_attentions", "cross_attentions",
                  "encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions")


def ref_t5_config(text=None, vision=None, qformer=None, num_query_tokens=4, **kwargs) -> RefBlip2Config:
    v = {**BASE_VISION, **(vision or {})}
    q = {**BASE_QFORMER, "encoder_hidden_size": v["hidden_size"], **(qformer or {})}
    t = {**BASE_T5, **(text or {})}
    return RefBlip2Config(vision_config=v, qformer_config=q, text_config=t, num_query_tokens=num_query_tokens, **kwargs)


class Case:
    def __init__(self, name: str, directory: Path) -> None:
        self.name = f"blip2-t5:{name}"
        self.hf_config = ref_t5_config(**CONFIGS[name])
        self.ref = make_ref(RefBlip2ForConditionalGeneration, self.hf_config, seed=len(name), std=WEIGHT_STD)
        self.dir = save_ref(self.ref, directory)
        self.ref_model = RefBlip2Model.from_pretrained(str(self.dir)).eval()
        self.ours = Blip2ForConditionalGeneration.from_pretrained(self.dir)
        self.ours_model = Blip2Model.from_pretrained(self.dir)
        self.inputs = make_inputs(self.hf_config, batch=3, seq=6)
        gen = torch.Generator().manual_seed(2)
        labels = torch.randint(2, self.hf_config.text_config.vocab_size, (3, 5), generator=gen)
        labels[1, 3:] = -100
        self.inputs["labels"] = labels

    def text_inputs(self) -> dict:
        return {k: v for k, v in self.inputs.items() if k != "labels"}

    def decoder_inputs(self) -> dict:
        """No labels: the decoder reads given ids under a padded decoder mask."""
        ids = self.ours.language_model.shift_right(self.inputs["labels"])
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        return {**self.text_inputs(), "decoder_input_ids": ids, "decoder_attention_mask": mask}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp(request.param))


def compare(ours, ref, fields, what: str, record: str) -> None:
    for field in fields:
        expected = getattr(ref, field)
        assert expected is not None, f"the reference gave no {what}.{field}"
        assert_close(getattr(ours, field), expected, f"{what}.{field}", record=record)


# ---------------------------------------------------------------- forward
@torch.no_grad()
def test_loss_and_outputs_match_reference(case: Case):
    for ours_model, ref_model in ((case.ours, case.ref), (case.ours_model, case.ref_model)):
        for kwargs in (case.inputs, case.decoder_inputs()):
            ours = ours_model(**kwargs, **FLAGS)
            ref = ref_model(**kwargs, **FLAGS)
            assert scale_of(ref.logits) > 0.1, "reference logits are too small to prove anything"
            assert_close(ours.logits, ref.logits, "logits", record=case.name)
            if "labels" in kwargs:
                assert_close(ours.loss, ref.loss, "loss", record=case.name)
            else:
                assert ours.loss is None and ref.loss is None
            lm = ours.language_model_outputs
            assert type(lm).__name__ == type(ref.language_model_outputs).__name__ == "Seq2SeqLMOutput"
            compare(lm, ref.language_model_outputs, SEQ2SEQ_FIELDS, "language_model_outputs", case.name)
            assert_close(ours.qformer_outputs.last_hidden_state, ref.qformer_outputs.last_hidden_state,
                         "qformer_outputs.last_hidden_state", record=case.name)


@torch.no_grad()
def test_tuples_match_reference(case: Case):
    for ours_model, ref_model in ((case.ours, case.ref), (case.ours_model, case.ref_model)):
        ours = ours_model(**case.inputs, **FLAGS, return_dict=False)
        ref = ref_model(**case.inputs, **FLAGS, return_dict=False)
        assert type(ours) is tuple and len(ours) == len(ref) == 5
        assert_close(ours, ref, "return_dict=False tuple", record=case.name)
        # Without labels the 4.37 reference mislabels T5's tuple: it reads the language model's
        # logits as the loss and its past_key_values as the logits, giving (logits, past, ...).
        # Ours has the documented layout (logits, vision, qformer, language model).
        ours = ours_model(**case.decoder_inputs(), **FLAGS, return_dict=False)
        ref = ref_model(**case.decoder_inputs(), **FLAGS, return_dict=False)
        assert len(ours) == 4 and len(ref) == 5 and ref[1] is ref[4][1]
        assert_close(ours, (ref[0],) + ref[2:], "return_dict=False tuple, no labels", record=case.name)


@torch.no_grad()
def test_text_features_match_reference(case: Case):
    ids, mask = case.inputs["input_ids"], case.inputs["attention_mask"]
    decoder_ids = case.decoder_inputs()["decoder_input_ids"]
    for kwargs in (dict(labels=case.inputs["labels"]), dict(decoder_input_ids=decoder_ids)):
        ours = case.ours_model.get_text_features(ids, mask, **kwargs, **FLAGS)
        ref = case.ref_model.get_text_features(ids, mask, **kwargs, **FLAGS)
        compare(ours, ref, SEQ2SEQ_FIELDS, "get_text_features", case.name)
        if "labels" in kwargs:
            assert_close(ours.loss, ref.loss, "get_text_features.loss", record=case.name)
        assert_close(case.ours_model.get_text_features(ids, mask, **kwargs, return_dict=False),
                     case.ref_model.get_text_features(ids, mask, **kwargs, return_dict=False),
                     "get_text_features tuple", record=case.name)


def test_loss_backpropagates_to_the_qformer(case: Case):
    model = Blip2ForConditionalGeneration.from_pretrained(case.dir)
    model.train()
    model.vision_model.requires_grad_(False)
    model.language_model.requires_grad_(False)
    loss = model(**case.inputs).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    assert model.language_model.shared.weight.grad is None


def test_t5_needs_decoder_inputs_or_labels(case: Case):
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        case.ours(**case.text_inputs())
    bad = case.inputs["labels"].clone()
    bad[0, 0] = 10_000
    with pytest.raises(ValueError, match="outside the vocabulary"):
        case.ours(**case.text_inputs(), labels=bad)


# ---------------------------------------------------------------- checkpoints and configs
@torch.no_grad()
def test_reference_loads_what_ours_saves(case: Case, tmp_path: Path):
    for ours_model, ref_model, ref_cls in ((case.ours, case.ref, RefBlip2ForConditionalGeneration),
                                           (case.ours_model, case.ref_model, RefBlip2Model)):
        out = tmp_path / ref_cls.__name__
        ours_model.save_pretrained(out)
        reloaded = ref_cls.from_pretrained(str(out)).eval()
        for (name, a), (_, b) in zip(sorted(reloaded.state_dict().items()), sorted(ref_model.state_dict().items())):
            assert torch.equal(a, b), f"{name} differs after ours saved it and the reference loaded it"
        expected = ref_model(**case.inputs, **FLAGS, return_dict=False)
        got = reloaded(**case.inputs, **FLAGS, return_dict=False)
        assert max_abs_diff(got, expected, "reference outputs after the round trip") == 0.0
        again = type(ours_model).from_pretrained(out)
        ours_again = again(**case.inputs, return_dict=False)
        assert max_abs_diff(ours_again, ours_model(**case.inputs, return_dict=False)) == 0.0


def test_config_round_trips_through_json(case: Case, tmp_path: Path):
    config = Blip2Config.from_dict(case.hf_config.to_dict())
    assert isinstance(config.text_config, T5Config) and config.is_encoder_decoder
    config.save_pretrained(tmp_path)
    again = Blip2Config.from_pretrained(tmp_path)
    # Compared as JSON: a transformers dict carries id2label with int keys, which JSON makes strings.
    assert again.to_json_string() == config.to_json_string()
    again.save_pretrained(tmp_path / "again")
    assert Blip2Config.from_pretrained(tmp_path / "again") == again
    # And the reference reads what we write.
    ref = RefBlip2Config.from_pretrained(str(tmp_path))
    assert ref.text_config.model_type == "t5" and not ref.use_decoder_only_language_model
    for key in ("d_model", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "feed_forward_proj",
                "relative_attention_num_buckets", "relative_attention_max_distance", "tie_word_embeddings"):
        assert getattr(ref.text_config, key) == getattr(case.hf_config.text_config, key), key


@torch.no_grad()
def test_float16_keeps_wo_in_float32(case: Case):
    half = Blip2ForConditionalGeneration.from_pretrained(case.dir, torch_dtype=torch.float16)
    lm = half.language_model
    assert lm.encoder.layers[0].mlp.wo.weight.dtype == torch.float32
    assert lm.decoder.layers[-1].mlp.wo.weight.dtype == torch.float32
    assert lm.shared.weight.dtype == torch.float16 and half.query_tokens.dtype == torch.float16
    inputs = {k: (v.half() if v.is_floating_point() else v) for k, v in case.inputs.items()}
    out = half(**inputs)
    exact = case.ours(**case.inputs)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert (out.logits.float() - exact.logits).abs().max() < 0.02 * exact.logits.abs().max()
    bf = Blip2ForConditionalGeneration.from_pretrained(case.dir, torch_dtype=torch.bfloat16)
    inputs = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in case.inputs.items()}
    out = bf(**inputs)
    assert torch.isfinite(out.logits).all()
    assert (out.logits.float() - exact.logits).abs().max() < 0.05 * exact.logits.abs().max()


# ---------------------------------------------------------------- generation
def prompts(case: Case, right_pad: bool = True):
    """Prompts of lengths 4, 2, 1, padded on the right as T5 tokenizers pad."""
    gen = torch.Generator().manual_seed(3)
    lengths = [4, 2, 1]
    ids = torch.zeros(3, 4, dtype=torch.long)  # T5's pad id is 0
    mask = torch.zeros(3, 4, dtype=torch.long)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if right_pad else slice(4 - n, 4)
        ids[row, cols] = torch.randint(2, 90, (n,), generator=gen)
        mask[row, cols] = 1
    return case.inputs["pixel_values"], ids, mask


@pytest.mark.parametrize("settings", [dict(max_new_tokens=9), dict(max_new_tokens=7, num_beams=3),
                                      dict(max_new_tokens=6, num_beams=2, num_return_sequences=2,
                                           length_penalty=-1.0, repetition_penalty=1.3)],
                         ids=["greedy", "beam", "beam_returns_penalties"])
@torch.no_grad()
def test_generate_matches_reference(case: Case, settings):
    """Right-padded prompts give the reference's tokens; left-padded ones too, since ours moves the
    padding behind the text (the reference's left-padded rows change with the padding: relative
    positions between the queries and the text count it)."""
    pixel_values, ids, mask = prompts(case)
    for prompt in (dict(input_ids=ids, attention_mask=mask), dict()):
        expected = case.ref.generate(pixel_values=pixel_values, **prompt, **settings)
        got = case.ours.generate(pixel_values, **prompt, **settings)
        assert torch.equal(got, expected), f"{settings}\nours\n{got}\nreference\n{expected}"
        if prompt:
            _, left_ids, left_mask = prompts(case, right_pad=False)
            assert torch.equal(case.ours.generate(pixel_values, left_ids, left_mask, **settings), expected)


@torch.no_grad()
def test_cached_steps_match_a_full_forward(case: Case):
    """The stepper (encoder once, cross-attention projected once, one token per step) against
    the whole decoder sequence in one forward."""
    pixel_values, ids, mask = prompts(case)
    config = case.ours.generation_config.updated(max_new_tokens=6, eos_token_id=None)
    stepper, start = case.ours.stepper(pixel_values, ids, mask, config)
    tokens = torch.randint(2, 90, (3, 5), generator=torch.Generator().manual_seed(4))
    logits = [stepper.prefill()] + [stepper.step(tokens[:, t]) for t in range(5)]
    full = case.ours(pixel_values, ids, mask, decoder_input_ids=torch.cat([start, tokens], dim=1)).logits
    assert_close(torch.stack(logits, dim=1), full, "cached vs full decoder logits", record=case.name)


@torch.no_grad()
def test_image_token_convention_gives_the_same_text(case: Case, tmp_path: Path):
    """With `image_token_index` (32100 in the real checkpoints) the queries fill the prompt's
    `<image>` slots; without slots they go in front. With T5's right padding both are one input."""
    config = Blip2Config.from_pretrained(case.dir)
    config.image_token_index = 98
    model = Blip2ForConditionalGeneration.from_pretrained(case.dir, config=config)
    pixel_values, ids, mask = prompts(case)
    Q = config.num_query_tokens
    slot_ids = torch.cat([torch.full((3, Q), 98), ids], dim=1)
    slot_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], dim=1)
    for settings in (dict(max_new_tokens=8), dict(max_new_tokens=6, num_beams=3)):
        expected = case.ref.generate(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, **settings)
        assert torch.equal(model.generate(pixel_values, slot_ids, slot_mask, **settings), expected)
        assert torch.equal(model.generate(pixel_values, ids, mask, **settings), expected)
    loss = model(pixel_values, slot_ids, slot_mask, labels=case.inputs["labels"]).loss
    assert_close(loss, case.ref(pixel_values=pixel_values, input_ids=ids, attention_mask=mask,
                                labels=case.inputs["labels"]).loss, "loss with <image> slots", record=case.name)
