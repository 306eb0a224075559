"""Configurations: the documented Blip2 configs and the OPT / T5 text configs.

Each config is a small object holding a table of known fields with defaults. Keys the
table does not know (written by another transformers release, or by the user) are kept
and written back, so a config.json survives a round trip through us unchanged.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, ClassVar

CONFIG_NAME = "config.json"

# Fields every transformers config carries; the models read these three.
_COMMON = {"return_dict": True, "output_attentions": False, "output_hidden_states": False}


def _check_type(cls_name: str, key: str, value: Any, default: Any) -> Any:
    """Validates a field against the type of its default; ints pass where floats are expected."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise TypeError(
            f"{cls_name}.{key} must be {type(default).__name__}, got {type(value).__name__} ({value!r})"
        )
    return value


class BaseConfig:
    """A table of known fields with defaults, plus whatever else the file had."""

    model_type: ClassVar[str] = ""
    fields: ClassVar[dict[str, Any]] = {}
    # Alternative names transformers accepts for some fields (e.g. T5's hidden_size).
    aliases: ClassVar[dict[str, str]] = {}

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)
        # Keys the caller (or file) gave: optional keys are written back only when given or set.
        object.__setattr__(self, "given", frozenset(kwargs))
        for alias, name in self.aliases.items():
            if alias in kwargs and name not in kwargs:
                kwargs[name] = kwargs.pop(alias)
        table = {**_COMMON, **self.fields}
        for key, default in table.items():
            value = kwargs.pop(key, copy.deepcopy(default))
            object.__setattr__(self, key, _check_type(type(self).__name__, key, value, default))
        if isinstance(kwargs.get("id2label"), dict):
            # transformers keeps int keys in memory; JSON has strings. Keep the JSON form so
            # a config equals itself after a save and load.
            kwargs["id2label"] = {str(k): v for k, v in kwargs["id2label"].items()}
        self.extra: dict[str, Any] = kwargs
        self.validate()

    def validate(self) -> None:
        """Checks relations between fields; subclasses add theirs."""

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: serve aliases and kept unknown keys.
        if name in ("extra", "__setstate__", "__deepcopy__"):
            raise AttributeError(name)
        aliases = type(self).aliases
        if name in aliases:
            return getattr(self, aliases[name])
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).aliases:
            name = type(self).aliases[name]
        object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(copy.deepcopy(self.extra))
        for key in {**_COMMON, **self.fields}:
            value = getattr(self, key)
            out[key] = value.to_dict() if isinstance(value, BaseConfig) else copy.deepcopy(value)
        out["model_type"] = self.model_type
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any):
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        return cls(**{**copy.deepcopy(data), **overrides})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike):
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any):
        """Reads config.json from a directory (or a hub id / cache, see `blip2.hub`)."""
        from .hub import resolve_file

        file = resolve_file(path, CONFIG_NAME, **{k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS})
        config = cls.from_json_file(file)
        for key, value in kwargs.items():
            setattr(config, key, value)
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from .io import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / CONFIG_NAME, self.to_json_string())


_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token")


class Blip2VisionConfig(BaseConfig):
    model_type = "blip_2_vision_model"
    fields = {
        "hidden_size": 1408,
        "intermediate_size": 6144,
        "num_hidden_layers": 39,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
        "initializer_range": 1e-10,
        "qkv_bias": True,
    }

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Blip2VisionConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )


class Blip2QFormerConfig(BaseConfig):
    model_type = "blip_2_qformer"
    fields = {
        "vocab_size": 30522,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 512,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "cross_attention_frequency": 2,
        "encoder_hidden_size": 1408,
        # Newer releases: BERT-style text input (word/position embeddings and a text
        # feed-forward per layer), as in the retrieval checkpoints (blip2-itm-vit-g).
        "use_qformer_text_input": False,
    }

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not self.use_qformer_text_input and "use_qformer_text_input" not in self.given:
            del out["use_qformer_text_input"]  # older files have no such key; write none either
        return out

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Blip2QFormerConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.cross_attention_frequency < 1:
            raise ValueError("Blip2QFormerConfig: cross_attention_frequency must be >= 1")
        if self.position_embedding_type != "absolute":
            raise ValueError(
                "Blip2QFormerConfig: only position_embedding_type='absolute' is supported "
                f"(got {self.position_embedding_type!r}); no BLIP-2 checkpoint uses another"
            )


class OPTConfig(BaseConfig):
    model_type = "opt"
    fields = {
        "vocab_size": 50272,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "ffn_dim": 3072,
        "max_position_embeddings": 2048,
        "do_layer_norm_before": True,
        "_remove_final_layer_norm": False,
        "word_embed_proj_dim": None,
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "num_attention_heads": 12,
        "activation_function": "relu",
        "layerdrop": 0.0,
        "init_std": 0.02,
        "use_cache": True,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": True,
        "is_encoder_decoder": False,
    }

    def validate(self) -> None:
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"OPTConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )


class T5Config(BaseConfig):
    model_type = "t5"
    aliases = {"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}
    fields = {
        "vocab_size": 32128,
        "d_model": 512,
        "d_kv": 64,
        "d_ff": 2048,
        "num_layers": 6,
        "num_decoder_layers": None,
        "num_heads": 8,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "feed_forward_proj": "relu",
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": None,
        "decoder_start_token_id": 0,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
    }

    def validate(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        act = self.feed_forward_proj.split("-")
        if len(act) > 2 or (len(act) == 2 and act[0] != "gated"):
            raise ValueError(
                f"T5Config: feed_forward_proj {self.feed_forward_proj!r} must be 'ACT' or 'gated-ACT'"
            )

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        # transformers maps "gated-gelu" to the tanh approximation for backwards compatibility.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act


TEXT_CONFIGS: dict[str, type[BaseConfig]] = {"opt": OPTConfig, "t5": T5Config}


def _sub_config(cls_: type[BaseConfig], value: Any, what: str) -> BaseConfig:
    if value is None:
        return cls_()
    if isinstance(value, cls_):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        return cls_.from_dict(value)
    raise TypeError(f"Blip2Config.{what} must be a dict or {cls_.__name__}, got {type(value).__name__}")


def text_config_from(value: Any) -> BaseConfig:
    """Picks OPT or T5 by `model_type` (OPT when absent, as transformers does)."""
    if value is None:
        return OPTConfig()
    if isinstance(value, BaseConfig) and value.model_type in TEXT_CONFIGS:
        return copy.deepcopy(value)
    if hasattr(value, "to_dict") and not isinstance(value, dict):
        value = value.to_dict()  # a transformers config object
    if not isinstance(value, dict):
        raise TypeError(f"Blip2Config.text_config must be a dict or config, got {type(value).__name__}")
    model_type = value.get("model_type", "opt")
    if model_type not in TEXT_CONFIGS:
        raise ValueError(
            f"Blip2Config.text_config has model_type {model_type!r}; supported: {sorted(TEXT_CONFIGS)}"
        )
    return TEXT_CONFIGS[model_type].from_dict(value)


class Blip2Config(BaseConfig):
    model_type = "blip-2"
    fields = {
        "num_query_tokens": 32,
        "image_token_index": None,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        # Newer releases: width of the image-text contrastive space (retrieval projections).
        "image_text_hidden_size": 256,
    }

    def __init__(self, vision_config=None, qformer_config=None, text_config=None, num_query_tokens=32, **kwargs):
        for derived in ("use_decoder_only_language_model", "is_encoder_decoder", "tie_word_embeddings"):
            kwargs.pop(derived, None)
        self.vision_config = _sub_config(Blip2VisionConfig, _plain(vision_config), "vision_config")
        self.qformer_config = _sub_config(Blip2QFormerConfig, _plain(qformer_config), "qformer_config")
        self.text_config = text_config_from(text_config)
        super().__init__(num_query_tokens=num_query_tokens, **kwargs)

    def validate(self) -> None:
        if self.num_query_tokens < 1:
            raise ValueError(f"Blip2Config.num_query_tokens must be >= 1, got {self.num_query_tokens}")

    @property
    def use_decoder_only_language_model(self) -> bool:
        return not self.text_config.is_encoder_decoder

    @property
    def is_encoder_decoder(self) -> bool:
        return self.text_config.is_encoder_decoder

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text_config.tie_word_embeddings

    @classmethod
    def from_vision_qformer_text_configs(cls, vision_config, qformer_config, text_config, **kwargs):
        return cls(
            vision_config=_plain(vision_config),
            qformer_config=_plain(qformer_config),
            text_config=_plain(text_config),
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["qformer_config"] = self.qformer_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        out["use_decoder_only_language_model"] = self.use_decoder_only_language_model
        out["is_encoder_decoder"] = self.is_encoder_decoder
        out["tie_word_embeddings"] = self.tie_word_embeddings
        if self.image_token_index is None and "image_token_index" not in self.given:
            del out["image_token_index"]  # older files have no such key; write none either
        if self.image_text_hidden_size == 256 and "image_text_hidden_size" not in self.given:
            del out["image_text_hidden_size"]  # likewise: only newer files carry it, and readers default it
        return out


def _plain(value: Any) -> Any:
    """Accepts our configs, transformers configs or dicts."""
    if isinstance(value, BaseConfig) or value is None or isinstance(value, dict):
        return value
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value
