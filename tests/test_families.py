"""The language-model registry: each family's pieces resolve, defaults come from the config,
and a new family is one entry."""

from __future__ import annotations

import pytest
import torch

from blip2 import Blip2Config, Blip2ForConditionalGeneration
from blip2.config import OPTConfig
from blip2.families import FAMILIES, LanguageModelFamily, family, question_template, register
from conftest import BASE_OPT, BASE_QFORMER, BASE_VISION, redraw_

T5_TEXT = dict(model_type="t5", vocab_size=40, d_model=32, d_kv=8, num_heads=4, d_ff=37, num_layers=1,
               decoder_start_token_id=0)


def blip2_config(text: dict) -> Blip2Config:
    return Blip2Config(vision_config=dict(BASE_VISION), qformer_config=dict(BASE_QFORMER), text_config=text,
                       num_query_tokens=3)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_piece_of_every_family_resolves(model_type):
    f = family(model_type)
    assert f.config_class.model_type == model_type
    for piece in (f.module_class, f.key_table, f.forward_adapter, f.stepper_class):
        assert callable(piece)
    assert "{}" in f.question_template


def test_question_template_comes_from_the_config_not_the_name():
    assert question_template(blip2_config(dict(BASE_OPT))) == "Question: {} Answer:"
    assert question_template(blip2_config(T5_TEXT)) == "Question: {} Short answer:"


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="'gpt9'.*opt"):
        family("gpt9")
    with pytest.raises(ValueError, match="model_type 'gpt9'"):
        blip2_config({"model_type": "gpt9"})


class AliasOPTConfig(OPTConfig):
    model_type = "opt-alias"


def test_a_new_family_is_one_entry(tmp_path):
    """A family registered from outside: config parsing, the model, its key table and generation follow."""
    opt = FAMILIES["opt"]
    register(LanguageModelFamily(
        model_type="opt-alias", decoder_only=True, question_template="Q: {} A:",
        config=f"{__name__}:AliasOPTConfig", module=opt.module, key_rules=opt.key_rules,
        forward=opt.forward, stepper=opt.stepper,
    ))
    try:
        config = blip2_config({**BASE_OPT, "model_type": "opt-alias"})
        assert type(config.text_config) is AliasOPTConfig and question_template(config) == "Q: {} A:"
        torch.manual_seed(0)
        model = redraw_(Blip2ForConditionalGeneration(config), std=0.3).eval()
        pixel_values = torch.randn(1, 3, 16, 16)
        ids = model.generate(pixel_values, max_new_tokens=4, eos_token_id=None)
        assert ids.shape == (1, 5)
        model.save_pretrained(tmp_path)
        again = Blip2ForConditionalGeneration.from_pretrained(tmp_path)  # through the family's key rules
        assert again.generate(pixel_values, max_new_tokens=4, eos_token_id=None).tolist() == ids.tolist()
    finally:
        del FAMILIES["opt-alias"]
