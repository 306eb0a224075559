"""Configs: documented defaults, JSON in and out, unknown keys kept, files of 4.37 and of the newest
release, and clear errors for values of the wrong type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import Blip2Config as RefBlip2Config
from transformers import Blip2QFormerConfig as RefBlip2QFormerConfig
from transformers import Blip2VisionConfig as RefBlip2VisionConfig
from transformers import OPTConfig as RefOPTConfig

from blip2 import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, LlamaConfig, OPTConfig, T5Config
from conftest import BASE_OPT, BASE_QFORMER, BASE_VISION, ref_config

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def tiny() -> Blip2Config:
    return Blip2Config(vision_config=dict(BASE_VISION), qformer_config=dict(BASE_QFORMER),
                       text_config=dict(BASE_OPT), num_query_tokens=4)


# ---------------------------------------------------------------- defaults
@pytest.mark.parametrize("ours_cls, ref_cls", [
    (Blip2VisionConfig, RefBlip2VisionConfig),
    (Blip2QFormerConfig, RefBlip2QFormerConfig),
    (OPTConfig, RefOPTConfig),
])
def test_defaults_match_the_reference(ours_cls, ref_cls):
    ours, ref = ours_cls().to_dict(), ref_cls().to_dict()
    for key, value in ours.items():
        if key in ref:
            assert value == ref[key], f"{ours_cls.__name__}.{key}: {value!r} vs reference {ref[key]!r}"


def test_documented_defaults():
    config = Blip2Config()
    assert config.num_query_tokens == 32
    vc, qc, tc = config.vision_config, config.qformer_config, config.text_config
    assert (vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.num_attention_heads) == (1408, 6144, 39, 16)
    assert (vc.image_size, vc.patch_size, vc.hidden_act, vc.layer_norm_eps, vc.qkv_bias) == (224, 14, "gelu", 1e-6, True)
    assert vc.initializer_range == 1e-10
    assert (qc.vocab_size, qc.hidden_size, qc.num_hidden_layers, qc.num_attention_heads) == (30522, 768, 12, 12)
    assert (qc.cross_attention_frequency, qc.encoder_hidden_size, qc.layer_norm_eps) == (2, 1408, 1e-12)
    assert qc.position_embedding_type == "absolute" and qc.max_position_embeddings == 512
    assert isinstance(tc, OPTConfig)
    assert config.use_decoder_only_language_model and not config.is_encoder_decoder
    assert config.tie_word_embeddings


# ---------------------------------------------------------------- JSON round trips
@pytest.mark.parametrize("make", [
    tiny,
    lambda: Blip2VisionConfig(**BASE_VISION),
    lambda: Blip2QFormerConfig(**BASE_QFORMER),
    lambda: OPTConfig(**{k: v for k, v in BASE_OPT.items() if k != "model_type"}),
    lambda: T5Config(d_model=16, num_heads=2, feed_forward_proj="gated-gelu"),
    lambda: Blip2Config(text_config=dict(model_type="t5", d_model=16, num_layers=1)),
], ids=["blip2", "vision", "qformer", "opt", "t5", "blip2-t5"])
def test_dict_json_and_directory_round_trips(make, tmp_path: Path):
    config = make()
    cls = type(config)
    data = config.to_dict()
    assert data["model_type"] == cls.model_type
    assert cls.from_dict(data) == config
    # to_dict has every field (the reference's too); the file form leaves the PretrainedConfig
    # surface out where it holds its defaults, and reads back to an equal config.
    assert json.loads(config.to_json_string(use_diff=False)) == json.loads(json.dumps(data))
    text = config.to_json_string()
    assert cls.from_dict(json.loads(text)) == config
    assert cls.from_dict(json.loads(text)).to_json_string() == text
    config.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_text() == text
    again = cls.from_pretrained(tmp_path)
    assert again == config and again.to_json_string() == text


def test_unknown_keys_survive_every_round_trip(tmp_path: Path):
    config = Blip2Config(
        vision_config={**BASE_VISION, "vision_extra": [1, 2]},
        qformer_config={**BASE_QFORMER, "qformer_extra": {"a": 1}},
        text_config={**BASE_OPT, "text_extra": "x"},
        num_query_tokens=4, top_extra=3.5,
    )
    assert config.top_extra == 3.5 and config.vision_config.vision_extra == [1, 2]
    for loaded in (Blip2Config.from_dict(config.to_dict()), _through_dir(config, tmp_path)):
        data = loaded.to_dict()
        assert data["top_extra"] == 3.5
        assert data["vision_config"]["vision_extra"] == [1, 2]
        assert data["qformer_config"]["qformer_extra"] == {"a": 1}
        assert data["text_config"]["text_extra"] == "x"


def _through_dir(config, directory: Path):
    config.save_pretrained(directory)
    return type(config).from_pretrained(directory)


def test_from_pretrained_overrides_and_from_vision_qformer_text_configs(tmp_path: Path):
    tiny().save_pretrained(tmp_path)
    config = Blip2Config.from_pretrained(tmp_path, num_query_tokens=7)
    assert config.num_query_tokens == 7
    built = Blip2Config.from_vision_qformer_text_configs(
        Blip2VisionConfig(**BASE_VISION), Blip2QFormerConfig(**BASE_QFORMER),
        OPTConfig(**{k: v for k, v in BASE_OPT.items() if k != "model_type"}), num_query_tokens=4,
    )
    assert built == tiny()
    # The reference's config objects are accepted too.
    ref = ref_config()
    mixed = Blip2Config.from_vision_qformer_text_configs(ref.vision_config, ref.qformer_config, ref.text_config)
    assert mixed.vision_config.hidden_size == BASE_VISION["hidden_size"]
    assert mixed.text_config.vocab_size == BASE_OPT["vocab_size"]


def test_text_config_chosen_by_model_type():
    assert isinstance(Blip2Config(text_config={"model_type": "t5"}).text_config, T5Config)
    assert isinstance(Blip2Config(text_config={"model_type": "opt"}).text_config, OPTConfig)
    assert isinstance(Blip2Config(text_config={}).text_config, OPTConfig)  # OPT when absent
    t5 = Blip2Config(text_config={"model_type": "t5"})
    assert t5.is_encoder_decoder and not t5.use_decoder_only_language_model
    assert isinstance(Blip2Config(text_config={"model_type": "llama"}).text_config, LlamaConfig)
    with pytest.raises(ValueError, match="gpt2"):
        Blip2Config(text_config={"model_type": "gpt2"})


# ---------------------------------------------------------------- files of other releases
def test_config_written_by_transformers_437_loads_and_round_trips(tmp_path: Path):
    ref = ref_config(qformer=dict(cross_attention_frequency=3), num_query_tokens=6)
    ref.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    ours = Blip2Config.from_pretrained(tmp_path)
    assert ours.num_query_tokens == 6 and ours.qformer_config.cross_attention_frequency == 3
    assert ours.vision_config.image_size == BASE_VISION["image_size"]
    assert ours.text_config.ffn_dim == BASE_OPT["ffn_dim"]
    # The reference writes only what differs from its defaults; every key it wrote comes back
    # unchanged, nested ones included (ours writes all fields).
    _assert_superset(json.loads(ours.to_json_string()), written, "4.37 config.json")
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    _assert_superset(json.loads((out / "config.json").read_text()), written, "4.37 config.json (saved)")
    # And the reference reads what ours writes back to the same config.
    back = RefBlip2Config.from_pretrained(str(out)).to_dict()
    for key, value in ref.to_dict().items():
        if key != "transformers_version":
            assert back[key] == value, f"{key}: {back[key]!r} != {value!r}"


@pytest.mark.parametrize("name", ["blip2-opt-newest.json", "blip2-t5-newest.json"])
def test_config_written_by_the_newest_release_loads(name: str, tmp_path: Path):
    written = json.loads((CONFIGS / name).read_text())
    assert int(written["transformers_version"].split(".")[0]) >= 5
    (tmp_path / "config.json").write_text(json.dumps(written))
    config = Blip2Config.from_pretrained(tmp_path)
    assert config.image_token_index == written["image_token_index"]
    assert config.num_query_tokens == written["num_query_tokens"]
    assert type(config.text_config).model_type == written["text_config"]["model_type"]
    assert config.qformer_config.hidden_size == written["qformer_config"]["hidden_size"]
    # Round trip: every key of the file survives with its value (ours adds only defaults).
    again = json.loads(config.to_json_string())
    _assert_superset(again, written, name)
    config.save_pretrained(tmp_path / "out")
    _assert_superset(json.loads((tmp_path / "out" / "config.json").read_text()), written, name)


def _assert_superset(got: dict, want: dict, where: str) -> None:
    for key, value in want.items():
        assert key in got, f"{where}: key {key!r} lost"
        if isinstance(value, dict):
            _assert_superset(got[key], value, f"{where}.{key}")
        else:
            assert got[key] == value, f"{where}.{key}: {got[key]!r} != {value!r}"


def test_newest_opt_config_builds_the_fixture_model_shape():
    config = Blip2Config.from_json_file(CONFIGS / "blip2-opt-newest.json")
    assert config.text_config.vocab_size == 40 and config.vision_config.image_size == 16


# ---------------------------------------------------------------- wrong types and values
@pytest.mark.parametrize("make, words", [
    (lambda: Blip2VisionConfig(hidden_size="32"), ["hidden_size", "int", "str"]),
    (lambda: Blip2VisionConfig(qkv_bias=1), ["qkv_bias", "bool"]),
    (lambda: Blip2VisionConfig(layer_norm_eps="1e-6"), ["layer_norm_eps", "float"]),
    (lambda: Blip2QFormerConfig(cross_attention_frequency=1.5), ["cross_attention_frequency", "int"]),
    (lambda: Blip2QFormerConfig(hidden_act=3), ["hidden_act", "str"]),
    (lambda: OPTConfig(do_layer_norm_before="no"), ["do_layer_norm_before", "bool"]),
    (lambda: Blip2Config(num_query_tokens="32"), ["num_query_tokens", "int"]),
    (lambda: Blip2Config(vision_config=3), ["vision_config"]),
    (lambda: Blip2Config(qformer_config="x"), ["qformer_config"]),
    (lambda: Blip2Config(text_config=[1]), ["text_config"]),
    (lambda: Blip2Config.from_dict("{}"), ["from_dict", "dict"]),
    (lambda: Blip2Config(vision_config={"hidden_size": True}), ["hidden_size", "int", "bool"]),
])
def test_wrong_types_raise_type_error_naming_the_field(make, words):
    with pytest.raises(TypeError) as err:
        make()
    for word in words:
        assert word in str(err.value), f"{word!r} missing from: {err.value}"


def _model(config):
    """Builds the model for a config: shape rules are checked there, as in the reference."""
    from blip2 import Blip2Model, Blip2QFormerModel, Blip2VisionModel
    from blip2.modeling.opt import OPTLanguageModel

    cls = {Blip2VisionConfig: Blip2VisionModel, Blip2QFormerConfig: Blip2QFormerModel,
           OPTConfig: OPTLanguageModel, Blip2Config: Blip2Model}[type(config)]
    return cls(config)


# The reference accepts these at construction (its model then fails); ours too, and ours
# names the field when the model is built.
@pytest.mark.parametrize("make, words", [
    (lambda: _model(Blip2VisionConfig(hidden_size=30, num_attention_heads=4)), ["hidden_size", "num_attention_heads"]),
    (lambda: _model(Blip2QFormerConfig(hidden_size=30, num_attention_heads=4)), ["hidden_size", "num_attention_heads"]),
    (lambda: _model(Blip2QFormerConfig(cross_attention_frequency=0)), ["cross_attention_frequency"]),
    (lambda: _model(Blip2QFormerConfig(position_embedding_type="relative_key")), ["position_embedding_type"]),
    (lambda: _model(OPTConfig(hidden_size=30, num_attention_heads=4)), ["hidden_size", "num_attention_heads"]),
    (lambda: _model(Blip2Config(num_query_tokens=0)), ["num_query_tokens"]),
    (lambda: T5Config(feed_forward_proj="gated-gelu-x"), ["feed_forward_proj"]),
])
def test_bad_values_raise_value_error_naming_the_field(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for word in words:
        assert word in str(err.value)


def test_invalid_json_file_raises_value_error_naming_it(tmp_path: Path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        Blip2Config.from_pretrained(tmp_path)


def test_missing_config_file_names_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Blip2Config.from_pretrained(tmp_path)
