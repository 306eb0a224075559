"""bitsandbytes 8/4-bit loading: the reference's config names, the same layers quantized as the
reference quantizes, and clear errors. The CUDA path itself needs a GPU and bitsandbytes, which
this test machine lacks: here the choice of layers and the errors are checked."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import BitsAndBytesConfig
from transformers import Blip2ForConditionalGeneration as RefBlip2
from transformers.integrations.bitsandbytes import get_keys_to_not_convert

from blip2 import Blip2Config, Blip2ForConditionalGeneration
from blip2 import checkpoint as ckpt
from blip2.bnb import BnbSettings, KEEP_IN_FP32, layers_to_quantize, skipped
from conftest import make_ref, ref_config, save_ref
from test_t5_blip2 import ref_t5_config


def test_settings_read_the_reference_config_and_its_shortcuts():
    # (transformers 4.37's BitsAndBytesConfig(load_in_4bit=True) itself needs bitsandbytes: a dict here)
    s = BnbSettings.from_config(dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                     bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    assert (s.load_in_4bit, s.bnb_4bit_compute_dtype, s.bnb_4bit_quant_type, s.bnb_4bit_use_double_quant) == (
        True, torch.bfloat16, "nf4", True)
    s = BnbSettings.from_config({"load_in_8bit": True, "llm_int8_skip_modules": ["vision_model"],
                                 "bnb_4bit_compute_dtype": "float16"})
    assert s.load_in_8bit and s.llm_int8_skip_modules == ["vision_model"] and s.bnb_4bit_compute_dtype == torch.float16
    assert BnbSettings.from_config(load_in_8bit=True).load_in_8bit
    with pytest.raises(ValueError, match="exactly one of load_in_8bit"):
        BnbSettings.from_config({"load_in_8bit": True, "load_in_4bit": True})
    with pytest.raises(ValueError, match="exactly one of load_in_8bit"):
        BnbSettings.from_config({})
    with pytest.raises(ValueError, match="bnb_4bit_quant_type must be"):
        BnbSettings.from_config({"load_in_4bit": True, "bnb_4bit_quant_type": "int3"})
    with pytest.raises(ValueError, match="not both"):
        BnbSettings.from_config(BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=5.0), load_in_4bit=True)
    assert BnbSettings.from_config(BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=5.0)).llm_int8_threshold == 5.0


def _reference_converted(ref, skip: list[str]) -> set[str]:
    """The reference's rule (replace_with_bnb_linear): every nn.Linear whose leaf name is not skipped
    and whose dotted name contains no skipped key."""
    return {n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)
            and n.rsplit(".", 1)[-1] not in skip and not any(k in n for k in skip)}


def _ours_in_reference_names(ours, names: list[str]) -> set[str]:
    from blip2.adapters import reference_linears

    chosen = set(names)
    return {hf for hf, (o, _, _) in reference_linears(ours).items() if o in chosen}


@pytest.mark.parametrize("make_config", [ref_config, ref_t5_config, lambda: ref_t5_config(text=dict(tie_word_embeddings=True))],
                         ids=["opt", "flan-t5", "t5-tied"])
@pytest.mark.parametrize("skip_modules", [None, ["vision_model", "qformer"]], ids=["default", "skip-vision-qformer"])
def test_the_same_layers_are_quantized_as_in_the_reference(make_config, skip_modules):
    config = make_config()
    with init_empty_weights():
        ref = RefBlip2(config)
    ours = ckpt.build_on_meta(lambda: Blip2ForConditionalGeneration(Blip2Config.from_dict(config.to_dict())))
    settings = BnbSettings.from_config({"load_in_8bit": True, "llm_int8_skip_modules": skip_modules})
    ref_skip = (list(skip_modules) if skip_modules else get_keys_to_not_convert(ref)) + list(ref._keep_in_fp32_modules)
    assert sorted(skipped(ours, settings)) == sorted(ref_skip)
    want = _reference_converted(ref, ref_skip)
    assert _ours_in_reference_names(ours, layers_to_quantize(ours, skipped(ours, settings))) == want
    assert any(n.startswith("vision_model.") for n in want) == (skip_modules is None)
    assert KEEP_IN_FP32 == list(ref._keep_in_fp32_modules)


def test_without_cuda_loading_in_8_or_4_bits_is_a_clear_error(tmp_path):
    folder = save_ref(make_ref(RefBlip2, ref_config()), tmp_path / "m")
    assert not torch.cuda.is_available(), "this test is for machines without CUDA"
    for kwargs in ({"load_in_8bit": True}, {"load_in_4bit": True},
                   {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}):
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            Blip2ForConditionalGeneration.from_pretrained(folder, **kwargs)
    with pytest.raises(ValueError, match="exclude each other"):
        Blip2ForConditionalGeneration.from_pretrained(folder, load_in_8bit=True, quantize="int8")
    with pytest.raises(ValueError, match="several devices is not supported"):
        Blip2ForConditionalGeneration.from_pretrained(folder, load_in_8bit=True, device_map="auto")
