"""BLIP-2 with OPT against transformers 4.37.2 on tiny random configurations.

Each configuration is built by the reference with re-drawn weights, saved with the reference's
own save_pretrained, loaded by ours, and compared output by output (fp32, 1e-5). The reverse
direction — what ours saves, the reference loads — must give bit-identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration as RefBlip2ForConditionalGeneration
from transformers import Blip2Model as RefBlip2Model
from transformers import Blip2QFormerModel as RefBlip2QFormerModel
from transformers import Blip2VisionModel as RefBlip2VisionModel

import blip2
from blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2Model, Blip2QFormerModel, Blip2VisionModel
from conftest import assert_close, make_inputs, make_ref, max_abs_diff, ref_config, save_ref, scale_of

FIXTURE = Path(__file__).parent / "fixtures" / "interpolate"

# Between them: hidden sizes and head counts of each part, cross_attention_frequency 1, 2, 3,
# num_query_tokens 1..8, vision qkv_bias off, OPT post-LN (do_layer_norm_before=False) and
# without biases, OPT without norm affines or final norm, untied lm_head, other activations,
# layer counts 1..5 and image sizes 16..32 with patches of 4..16.
CONFIGS = {
    "base_caf1": dict(),
    "caf2_no_qkv_bias": dict(
        vision=dict(qkv_bias=False, image_size=24, patch_size=8, num_hidden_layers=3),
        qformer=dict(cross_attention_frequency=2, num_hidden_layers=3, num_attention_heads=2),
        num_query_tokens=6,
    ),
    "caf3_opt_postln_nobias": dict(
        qformer=dict(cross_attention_frequency=3, num_hidden_layers=4),
        text=dict(do_layer_norm_before=False, enable_bias=False),
        num_query_tokens=5,
    ),
    "mixed_widths_1query": dict(
        vision=dict(hidden_size=24, num_attention_heads=3, intermediate_size=20, image_size=28, patch_size=7),
        qformer=dict(hidden_size=40, num_attention_heads=5, intermediate_size=24, layer_norm_eps=1e-6),
        text=dict(hidden_size=48, num_attention_heads=6, ffn_dim=30, num_hidden_layers=1),
        num_query_tokens=1,
    ),
    "untied_other_acts": dict(
        vision=dict(hidden_act="quick_gelu", num_hidden_layers=1, image_size=32, patch_size=16),
        qformer=dict(hidden_act="gelu_new", num_hidden_layers=1, cross_attention_frequency=2),
        text=dict(tie_word_embeddings=False, activation_function="gelu", num_hidden_layers=3),
        num_query_tokens=8,
    ),
    "opt_no_affine_deep_qformer": dict(
        vision=dict(hidden_size=16, num_attention_heads=8, intermediate_size=24, num_hidden_layers=4),
        qformer=dict(hidden_size=24, num_attention_heads=1, intermediate_size=16, num_hidden_layers=5,
                     cross_attention_frequency=2),
        text=dict(layer_norm_elementwise_affine=False, hidden_size=16, num_attention_heads=2, ffn_dim=20),
        num_query_tokens=3,
    ),
    "opt_postln_bias_no_final_norm": dict(
        vision=dict(qkv_bias=False, num_attention_heads=2),
        qformer=dict(num_attention_heads=8, cross_attention_frequency=3, num_hidden_layers=3),
        text=dict(do_layer_norm_before=False, _remove_final_layer_norm=True, num_attention_heads=8),
        num_query_tokens=2,
    ),
}

FLAGS = dict(output_attentions=True, output_hidden_states=True)


class Case:
    """One configuration: the reference models, ours loaded from the reference's checkpoint, inputs."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.hf_config = ref_config(**CONFIGS[name])
        self.ref = make_ref(RefBlip2ForConditionalGeneration, self.hf_config, seed=len(name))
        self.dir = save_ref(self.ref, directory)
        self.ref_model = RefBlip2Model.from_pretrained(str(self.dir)).eval()
        self.ours = Blip2ForConditionalGeneration.from_pretrained(self.dir)
        self.ours_model = Blip2Model.from_pretrained(self.dir)
        self.inputs = make_inputs(self.hf_config)

    def text_inputs(self) -> dict:
        return {k: v for k, v in self.inputs.items() if k != "labels"}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp(request.param))


def compare_outputs(ours, ref, fields, what: str, record: str) -> None:
    for field in fields:
        expected = getattr(ref, field)
        assert expected is not None, f"the reference gave no {what}.{field}"
        assert_close(getattr(ours, field), expected, f"{what}.{field}", record=record)


VISION_FIELDS = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")
QFORMER_FIELDS = ("last_hidden_state", "pooler_output", "hidden_states", "attentions", "cross_attentions")
LM_FIELDS = ("logits", "past_key_values", "hidden_states", "attentions")


# ---------------------------------------------------------------- the whole model
@torch.no_grad()
def test_forward_matches_reference(case: Case):
    for ours_model, ref_model in ((case.ours, case.ref), (case.ours_model, case.ref_model)):
        ours = ours_model(**case.text_inputs(), **FLAGS)
        ref = ref_model(**case.text_inputs(), **FLAGS)
        assert scale_of(ref.logits) > 0.5, "reference logits are too small to prove anything"
        assert ours.loss is None and ref.loss is None
        assert_close(ours.logits, ref.logits, "logits", record=case.name)
        compare_outputs(ours.vision_outputs, ref.vision_outputs, VISION_FIELDS, "vision_outputs", case.name)
        compare_outputs(ours.qformer_outputs, ref.qformer_outputs, QFORMER_FIELDS, "qformer_outputs", case.name)
        compare_outputs(ours.language_model_outputs, ref.language_model_outputs, LM_FIELDS,
                        "language_model_outputs", case.name)


@torch.no_grad()
def test_loss_and_trimmed_logits(case: Case):
    labels = case.inputs["labels"]
    for ours_model, ref_model in ((case.ours, case.ref), (case.ours_model, case.ref_model)):
        ours = ours_model(**case.inputs)
        ref = ref_model(**case.inputs)
        assert ours.logits.shape[1] == labels.shape[1], "with labels the logits are trimmed to their length"
        assert_close(ours.logits, ref.logits, "logits (labels given)", record=case.name)
        assert_close(ours.loss, ref.loss, "loss", record=case.name)
    # Labels shorter than the text: the last len(labels) positions are scored.
    short = labels[:, -3:]
    ours = case.ours(**case.text_inputs(), labels=short)
    ref = case.ref(**case.text_inputs(), labels=short)
    assert_close(ours.loss, ref.loss, "loss (short labels)", record=case.name)


@torch.no_grad()
def test_tuples_match_reference(case: Case):
    """return_dict=False: the same tuple layout as the reference, nested outputs included."""
    for ours_model, ref_model in ((case.ours, case.ref), (case.ours_model, case.ref_model)):
        for kwargs in (case.text_inputs(), case.inputs):
            ours = ours_model(**kwargs, **FLAGS, return_dict=False)
            ref = ref_model(**kwargs, **FLAGS, return_dict=False)
            assert type(ours) is tuple and len(ours) == len(ref)
            for i, (a, b) in enumerate(zip(ours, ref)):
                assert type(a) is type(b), f"item {i}: {type(a).__name__} vs {type(b).__name__}"
            assert_close(ours, ref, "return_dict=False tuple", record=case.name)


@torch.no_grad()
def test_feature_getters_match_reference(case: Case):
    ours, ref = case.ours_model, case.ref_model
    pixels, ids, mask = case.inputs["pixel_values"], case.inputs["input_ids"], case.inputs["attention_mask"]
    text = ours.get_text_features(ids, mask, **FLAGS)
    ref_text = ref.get_text_features(ids, mask, **FLAGS)
    assert type(text).__name__ == type(ref_text).__name__ == "CausalLMOutputWithPast"
    compare_outputs(text, ref_text, LM_FIELDS, "get_text_features", case.name)
    image = ours.get_image_features(pixels, **FLAGS)
    ref_image = ref.get_image_features(pixels, **FLAGS)
    assert type(image).__name__ == type(ref_image).__name__
    compare_outputs(image, ref_image, VISION_FIELDS, "get_image_features", case.name)
    query = ours.get_qformer_features(pixels, **FLAGS)
    ref_query = ref.get_qformer_features(pixels, **FLAGS)
    assert type(query).__name__ == type(ref_query).__name__
    compare_outputs(query, ref_query, QFORMER_FIELDS, "get_qformer_features", case.name)
    # And as tuples.
    assert_close(ours.get_text_features(ids, mask, return_dict=False),
                 ref.get_text_features(ids, mask, return_dict=False), "get_text_features tuple")
    assert_close(ours.get_qformer_features(pixels, return_dict=False),
                 ref.get_qformer_features(pixels, return_dict=False), "get_qformer_features tuple")


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


# ---------------------------------------------------------------- standalone parts
@torch.no_grad()
def test_vision_model_standalone(case: Case, tmp_path: Path):
    vision_config = case.hf_config.vision_config
    ref = make_ref(RefBlip2VisionModel, vision_config, seed=3)
    save_ref(ref, tmp_path / "ref")
    ours = Blip2VisionModel.from_pretrained(tmp_path / "ref")
    pixels = case.inputs["pixel_values"]
    compare_outputs(ours(pixels, **FLAGS), ref(pixels, **FLAGS), VISION_FIELDS, "Blip2VisionModel", case.name)
    assert_close(ours(pixels, return_dict=False), ref(pixels, return_dict=False), "Blip2VisionModel tuple")
    ours.save_pretrained(tmp_path / "ours")
    back = RefBlip2VisionModel.from_pretrained(str(tmp_path / "ours")).eval()
    assert max_abs_diff(back(pixels).last_hidden_state, ref(pixels).last_hidden_state) == 0.0


@torch.no_grad()
def test_qformer_model_standalone_with_masks(case: Case, tmp_path: Path):
    qc = case.hf_config.qformer_config
    ref = make_ref(RefBlip2QFormerModel, qc, seed=4)
    save_ref(ref, tmp_path / "ref")
    ours = Blip2QFormerModel.from_pretrained(tmp_path / "ref")
    gen = torch.Generator().manual_seed(5)
    B, Q, N = 2, case.hf_config.num_query_tokens + 1, 7
    queries = torch.randn(B, Q, qc.hidden_size, generator=gen)
    image = torch.randn(B, N, qc.encoder_hidden_size, generator=gen)
    mask = torch.ones(B, Q)
    mask[1, -1] = 0
    image_mask = torch.ones(B, N)
    image_mask[0, :3] = 0
    head_mask = torch.ones(qc.num_hidden_layers, qc.num_attention_heads)
    head_mask[0, -1] = 0
    mask3d = torch.tril(torch.ones(Q, Q)).expand(B, Q, Q)
    variants = {
        "plain": dict(),
        "attention_mask": dict(attention_mask=mask),
        "3d attention_mask": dict(attention_mask=mask3d),
        "encoder_attention_mask": dict(encoder_attention_mask=image_mask),
        "head_mask (layers, heads)": dict(head_mask=head_mask),
        "head_mask (heads,)": dict(head_mask=head_mask[0]),
        "all masks": dict(attention_mask=mask, encoder_attention_mask=image_mask, head_mask=head_mask),
    }
    for label, kwargs in variants.items():
        got = ours(queries, encoder_hidden_states=image, **kwargs, **FLAGS)
        expected = ref(queries, encoder_hidden_states=image, **kwargs, **FLAGS)
        compare_outputs(got, expected, QFORMER_FIELDS, f"Blip2QFormerModel[{label}]", case.name)
    assert_close(ours(queries, encoder_hidden_states=image, return_dict=False),
                 ref(queries, encoder_hidden_states=image, return_dict=False), "Blip2QFormerModel tuple")
    ours.save_pretrained(tmp_path / "ours")
    back = RefBlip2QFormerModel.from_pretrained(str(tmp_path / "ours")).eval()
    assert max_abs_diff(back(queries, encoder_hidden_states=image).last_hidden_state,
                        ref(queries, encoder_hidden_states=image).last_hidden_state) == 0.0


# ---------------------------------------------------------------- output objects and flags
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Case:
    return Case("base_caf1", tmp_path_factory.mktemp("base"))


@torch.no_grad()
def test_output_fields_by_attribute_name_and_index(base: Case):
    out = base.ours(**base.inputs)
    assert out.keys() == ["loss", "logits", "vision_outputs", "qformer_outputs", "language_model_outputs"]
    assert out[0] is out.loss and out["loss"] is out.loss
    assert out[1] is out.logits and out["logits"] is out.logits
    # By index, nested output objects become tuples (as the reference's to_tuple gives them).
    assert isinstance(out[2], tuple) and torch.equal(out[2][0], out.vision_outputs.last_hidden_state)
    vision = out.vision_outputs
    assert vision.keys() == ["last_hidden_state", "pooler_output"]  # flags off: no hidden states or attentions
    assert vision[1] is vision.pooler_output and vision.hidden_states is None and vision.attentions is None
    qformer = out.qformer_outputs
    assert qformer.keys() == ["last_hidden_state", "pooler_output"]
    assert torch.equal(qformer.pooler_output, qformer.last_hidden_state[:, 0])
    lm = out.language_model_outputs
    assert lm.keys() == ["logits", "past_key_values"]
    assert len(lm.past_key_values) == base.hf_config.text_config.num_hidden_layers
    # Without labels the loss is absent and the indices shift, as in the reference.
    out = base.ours(**base.text_inputs())
    assert out.loss is None and out[0] is out.logits
    with pytest.raises(KeyError):
        out["loss"]
    # Shapes the docs give.
    B, Q = base.inputs["input_ids"].shape[0], base.hf_config.num_query_tokens
    vc = base.hf_config.vision_config
    seq = (vc.image_size // vc.patch_size) ** 2 + 1
    assert out.vision_outputs.last_hidden_state.shape == (B, seq, vc.hidden_size)
    assert out.vision_outputs.pooler_output.shape == (B, vc.hidden_size)
    assert out.logits.shape == (B, Q + base.inputs["input_ids"].shape[1], base.hf_config.text_config.vocab_size)


@torch.no_grad()
def test_flags_default_to_the_config(base: Case):
    model = base.ours_model
    counts = {}
    for flag in ("output_attentions", "output_hidden_states"):
        setattr(model.config, flag, True)
        try:
            out = model.get_image_features(base.inputs["pixel_values"])
        finally:
            setattr(model.config, flag, False)
        counts[flag] = out.attentions if flag == "output_attentions" else out.hidden_states
    layers = base.hf_config.vision_config.num_hidden_layers
    assert len(counts["output_attentions"]) == layers
    assert len(counts["output_hidden_states"]) == layers + 1
    model.config.return_dict = False
    try:
        assert isinstance(model.get_image_features(base.inputs["pixel_values"]), tuple)
    finally:
        model.config.return_dict = True


def test_dropout_only_in_training_mode(base: Case):
    model = base.ours
    assert base.hf_config.qformer_config.hidden_dropout_prob > 0 and base.hf_config.text_config.dropout > 0
    with torch.no_grad():
        first = model(**base.inputs).logits
        second = model(**base.inputs).logits
        assert torch.equal(first, second), "eval mode must be deterministic"
        model.train()
        try:
            torch.manual_seed(0)
            a = model(**base.inputs).logits
            b = model(**base.inputs).logits
        finally:
            model.eval()
        assert not torch.equal(a, b), "training mode should apply dropout"
        assert torch.equal(model(**base.inputs).logits, first)


def test_loss_backpropagates(base: Case):
    model = Blip2ForConditionalGeneration.from_pretrained(base.dir)
    model.language_model.requires_grad_(False)
    model.vision_model.requires_grad_(False)
    model(**base.inputs).loss.backward()
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    assert model.language_projection.weight.grad is not None
    assert all(p.grad is None for p in model.language_model.parameters())


# ---------------------------------------------------------------- interpolate_pos_encoding
@pytest.fixture(scope="module")
def interpolate():
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    return expected, Blip2ForConditionalGeneration.from_pretrained(FIXTURE)


@pytest.mark.parametrize("size", ["24x20", "32x32", "12x12", "16x16"])
@torch.no_grad()
def test_interpolate_pos_encoding_matches_newest_reference(interpolate, size: str):
    expected, model = interpolate
    pixels = expected[f"pixel_values_{size}"]
    vision = Blip2VisionModel(model.config.vision_config).eval()
    vision.load_state_dict(model.vision_model.state_dict())
    out = vision(pixels, interpolate_pos_encoding=True)
    record = f"interpolate(newest ref) {size}"
    assert_close(out.last_hidden_state, expected[f"vision_last_hidden_state_{size}"], "last_hidden_state", record=record)
    assert_close(out.pooler_output, expected[f"vision_pooler_output_{size}"], "pooler_output", record=record)
    if size != "16x16":
        with pytest.raises(ValueError, match="interpolate_pos_encoding"):
            vision(pixels)


@torch.no_grad()
def test_interpolate_pos_encoding_whole_model_with_image_tokens(interpolate):
    expected, model = interpolate
    assert model.config.image_token_index == 39
    out = model(expected["pixel_values_24x20"], expected["input_ids"], expected["attention_mask"],
                interpolate_pos_encoding=True)
    assert_close(out.logits, expected["logits_24x20"], "logits", record="interpolate(newest ref) model")
    features = Blip2Model.from_pretrained(FIXTURE).get_image_features(expected["pixel_values_24x20"],
                                                                      interpolate_pos_encoding=True)
    assert_close(features.last_hidden_state, expected["vision_last_hidden_state_24x20"], "get_image_features")


def test_fixture_is_small_and_from_a_newer_release():
    import json

    total = sum(p.stat().st_size for p in FIXTURE.iterdir())
    assert total < 200_000, f"interpolate fixture is {total} bytes"
    meta = json.loads((FIXTURE / "meta.json").read_text())
    assert int(meta["transformers_version"].split(".")[0]) >= 5
    assert isinstance(blip2.Blip2Config.from_pretrained(FIXTURE), Blip2Config)
