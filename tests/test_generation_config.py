"""GenerationConfig: 4.37 defaults, generation_config.json, precedence, validation messages."""

from __future__ import annotations

import json
import warnings

import pytest

from blip2.config import OPTConfig
from blip2.generation import GenerationConfig, resolve_config


def test_defaults_are_those_of_transformers_4_37():
    from transformers import GenerationConfig as HFGenerationConfig

    ref = HFGenerationConfig()
    ours = GenerationConfig()
    for name, value in ours.to_dict().items():
        if name != "seed":
            assert getattr(ref, name) == value, name


def test_reads_a_reference_generation_config_json(tmp_path):
    from transformers import GenerationConfig as HFGenerationConfig

    HFGenerationConfig(num_beams=3, max_new_tokens=7, eos_token_id=[3, 5], length_penalty=-1.0,
                       early_stopping="never", pad_token_id=1).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # metadata such as transformers_version is not worth a warning
        config = GenerationConfig.from_file(tmp_path)
    assert (config.num_beams, config.max_new_tokens, config.eos_token_id) == (3, 7, [3, 5])
    assert (config.length_penalty, config.early_stopping, config.pad_token_id) == (-1.0, "never", 1)
    assert config.max_length == 20  # untouched fields keep their defaults


def test_unsupported_file_settings_warn_and_are_kept(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"num_beams": 2, "typical_p": 0.5, "forced_eos_token_id": None}))
    with pytest.warns(UserWarning, match="typical_p"):
        config = GenerationConfig.from_file(path)
    assert config.num_beams == 2 and config.extra["typical_p"] == 0.5


def test_precedence_kwargs_over_file_over_text_config(tmp_path):
    text = OPTConfig(bos_token_id=2, eos_token_id=50118, pad_token_id=1)
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 4, "max_length": 30,
                                                                 "eos_token_id": 7}))
    config = resolve_config(text, tmp_path, num_beams=2)
    assert (config.num_beams, config.max_length, config.eos_token_id) == (2, 30, 7)
    assert (config.bos_token_id, config.pad_token_id) == (2, 1)
    assert resolve_config(text).eos_token_id == 50118
    assert resolve_config(text, None, eos_token_id=[5, 6]).eos_ids == [5, 6]


def test_pad_falls_back_to_the_first_eos():
    assert GenerationConfig(eos_token_id=[9, 4]).resolved_pad_token_id == 9
    assert GenerationConfig(eos_token_id=9, pad_token_id=0).resolved_pad_token_id == 0
    assert GenerationConfig().resolved_pad_token_id is None


def test_lengths_follow_4_37():
    assert GenerationConfig().total_length(1) == 20  # max_length counts the BOS
    assert GenerationConfig(max_new_tokens=5).total_length(1) == 6
    assert GenerationConfig(max_length=50, max_new_tokens=5).new_token_limit(1) == 5  # max_new_tokens wins
    with pytest.raises(ValueError, match="max_length"):
        GenerationConfig(max_length=1).total_length(1)


def test_unknown_and_unsupported_kwargs():
    with pytest.raises(TypeError, match="'top_q'"):
        GenerationConfig().updated(top_q=0.5)
    GenerationConfig().updated(output_scores=False, return_dict_in_generate=False, use_cache=True)
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        GenerationConfig().updated(return_dict_in_generate=True)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be a positive integer"),
    (dict(num_beams=0), ValueError, "num_beams"),
    (dict(num_beams=2.5), TypeError, "num_beams"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(num_beams=3, num_return_sequences=4), ValueError, r"num_return_sequences \(4\) must be <= num_beams \(3\)"),
    (dict(eos_token_id="2"), TypeError, "eos_token_id"),
    (dict(do_sample="yes"), TypeError, "do_sample"),
])
def test_validation_messages(kwargs, error, message):
    with pytest.raises(error, match=message):
        GenerationConfig().updated(**kwargs)


def test_temperature_is_free_without_sampling():
    assert GenerationConfig().updated(temperature=0.0).temperature == 0.0


def test_save_round_trip(tmp_path):
    config = GenerationConfig(num_beams=5, max_new_tokens=10, length_penalty=-1.0, eos_token_id=[1, 2])
    config.save(tmp_path)
    assert GenerationConfig.from_file(tmp_path) == config
