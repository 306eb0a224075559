"""Configurations: the documented Blip2 configs and the OPT / T5 / Llama text configs.

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

from .families import FAMILIES

CONFIG_NAME = "config.json"

# Fields every transformers config carries; the models read these three, and they are always written.
_COMMON = {"return_dict": True, "output_attentions": False, "output_hidden_states": False}

# The rest of the surface transformers' PretrainedConfig gives every config (user code and
# libraries read and set these). Written to JSON only when they differ from these defaults,
# as the reference's save_pretrained does.
_SURFACE = {
    "torchscript": False, "torch_dtype": None, "use_bfloat16": False, "pruned_heads": {},
    "is_decoder": False, "add_cross_attention": False, "tie_encoder_decoder": False,
    "cross_attention_hidden_size": None, "chunk_size_feed_forward": 0, "architectures": None,
    "finetuning_task": None, "tokenizer_class": None, "prefix": None, "task_specific_params": None,
    "problem_type": None, "bos_token_id": None, "pad_token_id": None, "eos_token_id": None,
    "sep_token_id": None, "decoder_start_token_id": None, "tie_word_embeddings": True,
    "is_encoder_decoder": False, "_name_or_path": "",
}

# Labels: in memory the reference keys id2label by int; JSON keys are strings.
_DEFAULT_LABELS = {0: "LABEL_0", 1: "LABEL_1"}


def _check_type(cls_name: str, key: str, value: Any, default: Any) -> Any:
    """Validates a field against the type of its default; ints pass where floats are expected.

    Token ids may also be lists of ints (several eos tokens, as the reference allows)."""
    if default is None or value is None:
        return value
    if key.endswith("_token_id") and isinstance(value, (list, tuple)):
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = list(value)
    elif isinstance(default, bool):
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


def _torch_dtype(value: Any) -> Any:
    """'float16' / 'torch.float16' / torch.float16 -> torch.float16 (the reference's in-memory form)."""
    if isinstance(value, str) and value != "auto":
        import torch

        found = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(found, torch.dtype):
            raise ValueError(f"torch_dtype {value!r} is not a torch dtype name")
        return found
    return value


def _json_value(key: str, value: Any) -> Any:
    """The dict form of a field: dtypes as their names (json.dumps writes id2label's int keys as strings)."""
    if key == "torch_dtype" and value is not None and not isinstance(value, str):
        return str(value).removeprefix("torch.")
    return copy.deepcopy(value)


class BaseConfig:
    """A table of known fields with defaults, plus whatever else the file had.

    Attribute access follows transformers' PretrainedConfig: fields and kept keys read and
    assign as attributes; a new attribute is kept and written to JSON like any other key.
    """

    model_type: ClassVar[str] = ""
    fields: ClassVar[dict[str, Any]] = {}
    # Alternative names transformers accepts for some fields (e.g. T5's hidden_size).
    aliases: ClassVar[dict[str, str]] = {}
    # Where this config sits inside a whole BLIP-2 config.json ("vision_config", ...), if it does,
    # and that whole config's model_type.
    section: ClassVar[str | None] = None
    composite_type: ClassVar[str] = "blip-2"
    is_composition: ClassVar[bool] = False
    # Other model_types whose files hold this config too (read without complaint).
    also_reads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)
        # Keys the caller (or file) gave: optional keys are written back only when given or set.
        object.__setattr__(self, "given", frozenset(kwargs))
        object.__setattr__(self, "extra", {})
        for alias, name in self.aliases.items():
            if alias in kwargs and name not in kwargs:
                kwargs[name] = kwargs.pop(alias)
        labels = _labels(kwargs.pop("id2label", None), kwargs.pop("label2id", None), kwargs.pop("num_labels", None))
        object.__setattr__(self, "id2label", labels[0])
        object.__setattr__(self, "label2id", labels[1])
        for key, default in self._table().items():
            value = kwargs.pop(key, copy.deepcopy(default))
            if key == "torch_dtype":
                value = _torch_dtype(value)
            object.__setattr__(self, key, _check_type(type(self).__name__, key, value, default))
        self.extra.update(kwargs)
        self.validate()

    @classmethod
    def _table(cls) -> dict[str, Any]:
        return {**_SURFACE, **_COMMON, **cls.fields}

    def validate(self) -> None:
        """Fills fields derived from others; subclasses add theirs. Shape rules (divisibility)
        are checked when a model is built, as the reference does, not here."""

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: serve aliases and kept unknown keys.
        if name in ("extra", "given", "__setstate__", "__deepcopy__", "__getstate__"):
            raise AttributeError(name)
        aliases = type(self).aliases
        if name in aliases:
            return getattr(self, aliases[name])
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        name = type(self).aliases.get(name, name)
        if name == "torch_dtype":
            value = _torch_dtype(value)
        if name in self._table() or name in self.__dict__ or hasattr(type(self), name):
            object.__setattr__(self, name, value)
        else:
            self.extra[name] = value  # a new key: kept and written, as the reference does

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__.get("extra", {}):
            del self.extra[name]
        else:
            object.__delattr__(self, name)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # ---- the reference's derived views ----
    @property
    def use_return_dict(self) -> bool:
        return self.return_dict and not self.torchscript

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if self.id2label is None or len(self.id2label) != n:
            self.id2label, self.label2id = _labels(None, None, n)

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    @name_or_path.setter
    def name_or_path(self, value) -> None:
        self._name_or_path = str(value)

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        """Every field, the PretrainedConfig surface included (as the reference's to_dict)."""
        return self._as_dict(full=True)

    def _as_dict(self, full: bool) -> dict[str, Any]:
        """full=False is the file form: the surface only where it was set or differs from its default."""
        out: dict[str, Any] = dict(copy.deepcopy(self.extra))
        for key, default in self._table().items():
            value = getattr(self, key)
            if not full and key in _SURFACE and key not in self.fields and value == default and key not in self.given:
                continue
            out[key] = value._as_dict(full) if isinstance(value, BaseConfig) else _json_value(key, value)
        if full or self.id2label != _DEFAULT_LABELS or "id2label" in self.given:
            out["id2label"] = _json_value("id2label", self.id2label)
            out["label2id"] = dict(self.label2id)
        out["model_type"] = self.model_type
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """What differs from a default config of this class (the reference's use_diff form)."""
        default = type(self)().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "model_type" or default.get(k, object()) != v}

    def to_json_string(self, use_diff: bool = True) -> str:
        """use_diff=True (the default, and what save_pretrained writes) leaves out the PretrainedConfig
        surface where it holds its defaults; the model's own fields are always written."""
        return json.dumps(self._as_dict(full=not use_diff), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        from .io import atomic_write_text

        atomic_write_text(Path(json_file_path), self.to_json_string(use_diff))

    def update(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            setattr(self, key, value)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any):
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        return cls(**{**copy.deepcopy(data), **overrides})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike):
        return cls.from_dict(cls._checked(_read_config_file(Path(path)), path))

    @classmethod
    def _checked(cls, data: dict[str, Any], file) -> dict[str, Any]:
        """`data` read from `file`, refused when its model_type names another kind of model (the
        reference only warns, then fails later or loads weights into the wrong shapes)."""
        found = data.get("model_type")
        allowed = {cls.model_type, *cls.also_reads} | ({cls.composite_type} if cls.section else set())
        if cls.model_type and found is not None and found not in allowed:
            raise ValueError(f"{file}: model_type {found!r} is not a {cls.__name__} "
                             f"(expected {' or '.join(repr(a) for a in sorted(allowed))})")
        return data

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any):
        """Reads config.json from a directory (or a hub id / cache, see `blip2.hub`).

        Other keyword arguments override fields; `subfolder=` reads from a folder inside;
        `return_unused_kwargs=True` also returns those that name no field. A vision or Q-Former
        config read from a whole BLIP-2 checkpoint is that checkpoint's section, as in the reference.
        """
        from .hub import resolve_file

        unused_wanted = kwargs.pop("return_unused_kwargs", False)
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
        file = resolve_file(path, CONFIG_NAME, **hub)
        data = cls._checked(_read_config_file(file), file)
        if cls.section and data.get("model_type") == cls.composite_type:
            data = data.get(cls.section) or {}
        config = cls.from_dict(data)
        unused = {}
        for key, value in kwargs.items():
            if key in config._table() or key in config.extra or hasattr(config, key) or key in cls.aliases:
                setattr(config, key, value)
            else:
                unused[key] = value
        if not unused_wanted:
            config.update(unused)  # no caller to hand them back to: keep them, as before
        return (config, unused) if unused_wanted else config

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_json_file(directory / CONFIG_NAME)


def _labels(id2label, label2id, num_labels) -> tuple[dict[int, str], dict[str, int]]:
    """The reference's label tables: int keys in memory; num_labels=n makes LABEL_0..LABEL_{n-1}."""
    if id2label is not None:
        id2label = {int(k): v for k, v in dict(id2label).items()}
    elif num_labels is not None:
        id2label = {i: f"LABEL_{i}" for i in range(int(num_labels))}
    else:
        id2label = dict(_DEFAULT_LABELS)
    if label2id is None:
        label2id = {v: k for k, v in id2label.items()}
    return id2label, {k: int(v) for k, v in dict(label2id).items()}


def _read_config_file(path: Path) -> dict[str, Any]:
    from .hub import read_json

    return read_json(path)


HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "subfolder")


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
    section = "vision_config"


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

    section = "qformer_config"

    def _as_dict(self, full: bool) -> dict[str, Any]:
        out = super()._as_dict(full)
        if not self.use_qformer_text_input and "use_qformer_text_input" not in self.given:
            del out["use_qformer_text_input"]  # older files have no such key; write none either
        return out


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


ROPE_SCALING_KINDS = ("linear", "dynamic")  # what transformers 4.37's Llama accepts


class LlamaConfig(BaseConfig):
    """Llama-family decoders (Llama 1/2, Vicuna, Mistral-style grouped-query attention)."""

    model_type = "llama"
    fields = {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "pad_token_id": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "is_encoder_decoder": False,
    }

    def validate(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict) or set(scaling) != {"type", "factor"}:
            raise ValueError(f"LlamaConfig.rope_scaling must be {{'type': ..., 'factor': ...}}, got {scaling!r}")
        if scaling["type"] not in ROPE_SCALING_KINDS:
            raise ValueError(
                f"LlamaConfig.rope_scaling type must be one of {list(ROPE_SCALING_KINDS)}, got {scaling['type']!r}"
            )
        factor = scaling["factor"]
        if not isinstance(factor, float) or factor <= 1.0:
            raise ValueError(f"LlamaConfig.rope_scaling factor must be a float > 1, got {factor!r}")


def _sub_config(cls_: type[BaseConfig], value: Any, what: str) -> BaseConfig:
    if value is None:
        return cls_()
    if isinstance(value, cls_):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        return cls_.from_dict(value)
    raise TypeError(f"Blip2Config.{what} must be a dict or {cls_.__name__}, got {type(value).__name__}")


def text_config_from(value: Any) -> BaseConfig:
    """Picks the family's config class by `model_type` (OPT when absent, as transformers does)."""
    if value is None:
        return OPTConfig()
    if isinstance(value, BaseConfig) and value.model_type in FAMILIES:
        return copy.deepcopy(value)
    if hasattr(value, "to_dict") and not isinstance(value, dict):
        value = value.to_dict()  # a transformers config object
    if not isinstance(value, dict):
        raise TypeError(f"Blip2Config.text_config must be a dict or config, got {type(value).__name__}")
    model_type = value.get("model_type", "opt")
    if model_type not in FAMILIES:
        raise ValueError(
            f"Blip2Config.text_config has model_type {model_type!r}; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type].config_class.from_dict(value)


class Blip2Config(BaseConfig):
    model_type = "blip-2"
    fields = {
        "num_query_tokens": 32,
        "image_token_index": None,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        # Newer releases: width of the image-text contrastive space (retrieval projections).
        "image_text_hidden_size": 256,
        # Derived from the parts in __init__ (as the reference does); assignable afterwards.
        "use_decoder_only_language_model": True,
        "is_encoder_decoder": False,
        "tie_word_embeddings": True,
    }

    vision_class: ClassVar[type[BaseConfig]] = Blip2VisionConfig
    qformer_class: ClassVar[type[BaseConfig]] = Blip2QFormerConfig

    def __init__(self, vision_config=None, qformer_config=None, text_config=None, num_query_tokens=32, **kwargs):
        # The parts first: validate() derives fields from them.
        parts = type(self)
        object.__setattr__(self, "vision_config", _sub_config(parts.vision_class, _plain(vision_config), "vision_config"))
        object.__setattr__(self, "qformer_config", _sub_config(parts.qformer_class, _plain(qformer_config), "qformer_config"))
        object.__setattr__(self, "text_config", text_config_from(text_config))
        super().__init__(num_query_tokens=num_query_tokens, **kwargs)

    def validate(self) -> None:
        """The fields the reference derives from the parts, whatever the file or caller said."""
        text = self.text_config
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size  # the Q-Former reads the image
        self.use_decoder_only_language_model = not text.is_encoder_decoder
        self.is_encoder_decoder = text.is_encoder_decoder
        self.tie_word_embeddings = text.tie_word_embeddings

    @classmethod
    def from_vision_qformer_text_configs(cls, vision_config, qformer_config, text_config, **kwargs):
        return cls(
            vision_config=_plain(vision_config),
            qformer_config=_plain(qformer_config),
            text_config=_plain(text_config),
            **kwargs,
        )

    def _as_dict(self, full: bool) -> dict[str, Any]:
        out = super()._as_dict(full)
        out["vision_config"] = self.vision_config._as_dict(full)
        out["qformer_config"] = self.qformer_config._as_dict(full)
        out["text_config"] = self.text_config._as_dict(full)
        if self.image_token_index is None and "image_token_index" not in self.given:
            out.pop("image_token_index", None)  # older files have no such key; write none either
        if self.image_text_hidden_size == 256 and "image_text_hidden_size" not in self.given:
            del out["image_text_hidden_size"]  # likewise: only newer files carry it, and readers default it
        return out


# ---------------------------------------------------------------- InstructBLIP
class InstructBlipVisionConfig(Blip2VisionConfig):
    """The same image encoder as BLIP-2's, under InstructBLIP's model_type."""

    model_type = "instructblip_vision_model"
    composite_type = "instructblip"


class InstructBlipQFormerConfig(Blip2QFormerConfig):
    """BLIP-2's Q-Former fields; this Q-Former always reads the instruction (word and position
    embeddings, a text feed-forward per layer), so there is no switch for it."""

    model_type = "instructblip_qformer"
    composite_type = "instructblip"
    fields = {k: v for k, v in Blip2QFormerConfig.fields.items() if k != "use_qformer_text_input"}
    use_qformer_text_input: ClassVar[bool] = True


class InstructBlipConfig(Blip2Config):
    """InstructBLIP (Dai et al., 2023): BLIP-2 whose Q-Former also reads the instruction."""

    model_type = "instructblip"
    vision_class = InstructBlipVisionConfig
    qformer_class = InstructBlipQFormerConfig


class InstructBlipVideoVisionConfig(InstructBlipVisionConfig):
    model_type = "instructblipvideo_vision_model"
    composite_type = "instructblipvideo"


class InstructBlipVideoQFormerConfig(InstructBlipQFormerConfig):
    model_type = "instructblipvideo_qformer"
    composite_type = "instructblipvideo"


class InstructBlipVideoConfig(InstructBlipConfig):
    """InstructBLIP over videos (transformers 5.x `instructblipvideo`): the same parts and weights.

    Its prompts hold `<video>` tokens (`video_token_index`), frames x num_query_tokens of them;
    `image_token_index` reads and writes that same field, so the image path's merge fills them.
    """

    model_type = "instructblipvideo"
    also_reads = ("instructblip",)  # the same parts and weights; transformers' docs load those repos so
    vision_class = InstructBlipVideoVisionConfig
    qformer_class = InstructBlipVideoQFormerConfig
    fields = {**{k: v for k, v in InstructBlipConfig.fields.items() if k != "image_token_index"},
              "video_token_index": None}
    aliases = {"image_token_index": "video_token_index", "video_token_id": "video_token_index"}


def _plain(value: Any) -> Any:
    """Accepts our configs, transformers configs or dicts."""
    if isinstance(value, BaseConfig) or value is None or isinstance(value, dict):
        return value
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value
