"""quantization_config in torchao's terms (the reference's CPU int8 / int4) selects quantize=."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Blip2ForConditionalGeneration as RefBlip2

from blip2 import Blip2ForConditionalGeneration
from blip2.modeling.quant import Int4Linear, Int8Linear
from blip2.torchao_config import quantize_kind
from conftest import make_inputs, make_ref, ref_config, save_ref


class Int8WeightOnlyConfig:  # named as torchao's; transformers' TorchAoConfig holds such an object
    group_size = None


class Int4WeightOnlyConfig:
    def __init__(self, group_size=128):
        self.group_size = group_size


def torchao(quant_type, **fields):
    return SimpleNamespace(quant_method="torchao", quant_type=quant_type, **fields)


@pytest.mark.parametrize("config, kind", [
    (torchao(Int8WeightOnlyConfig()), "int8"),
    (torchao(Int4WeightOnlyConfig(128), modules_to_not_convert=["vision_model", "qformer"]), "int4"),
    ({"quant_method": "torchao", "quant_type": "int8_weight_only"}, "int8"),  # transformers 4.4x
    ({"quant_method": "torchao", "quant_type": "int4_weight_only", "quant_type_kwargs": {"group_size": 128}}, "int4"),
    ({"quant_method": "torchao", "quant_type": {"default": {"_type": "Int4WeightOnlyConfig",  # 5.x's to_dict
                                                             "_data": {"group_size": 128}}}}, "int4"),
])
def test_torchao_configs_map_onto_quantize(config, kind):
    assert quantize_kind(config) == kind


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "torchao", "quant_type": "int8_dynamic_activation_int8_weight"}, "'int8_dynamic_activation_int8_weight' is not supported"),
    (torchao(Int4WeightOnlyConfig(32)), "Int4WeightOnlyConfig with group_size=32"),
    (torchao(Int8WeightOnlyConfig(), modules_to_not_convert=["lm_head"]), r"modules_to_not_convert names \['lm_head'\]"),
    (torchao(Int8WeightOnlyConfig(), include_input_output_embeddings=True), "include_input_output_embeddings"),
])
def test_unsupported_torchao_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        quantize_kind(config)


def test_from_pretrained_with_a_torchao_config_is_quantize(tmp_path):
    config = ref_config()
    folder = save_ref(make_ref(RefBlip2, config), tmp_path)
    inputs = make_inputs(config)
    with torch.no_grad():
        for kind, layer in (("int8", Int8Linear), ("int4", Int4Linear)):
            want = Blip2ForConditionalGeneration.from_pretrained(folder, quantize=kind)
            got = Blip2ForConditionalGeneration.from_pretrained(
                folder, quantization_config={"quant_method": "torchao", "quant_type": f"{kind}_weight_only"})
            assert any(isinstance(m, layer) for m in got.language_model.modules())
            assert not any(isinstance(m, layer) for m in got.vision_model.modules())
            assert torch.equal(got(**inputs).logits, want(**inputs).logits)
    with pytest.raises(ValueError, match="exclude each other"):
        Blip2ForConditionalGeneration.from_pretrained(folder, quantize="int8", quantization_config=torchao(Int8WeightOnlyConfig()))
