"""Generation settings: one dataclass, read from `generation_config.json`, the text config and kwargs.

Precedence is kwargs > generation_config.json > the language model's config, and the
meaning of every field is that of transformers 4.37 (`max_length` counts the start
token(s) of the history; `max_new_tokens`, when set, wins over it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

GENERATION_CONFIG_NAME = "generation_config.json"

EarlyStopping = Union[bool, str]


@dataclass
class GenerationConfig:
    """What `generate` should do. Defaults are those of transformers 4.37."""

    # length
    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    # strategy
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    # beam search
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    # sampling
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None  # ours: a seed for a private torch.Generator
    # penalties
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    forced_bos_token_id: int | None = None  # the first new token (when the history is one token long)
    forced_eos_token_id: int | list[int] | None = None  # the last token at max_length
    # special tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    # fields the reference keeps that need no behaviour here (the cache is always used)
    use_cache: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---- building ----
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        """Reads the fields we know; keeps the rest in `extra` and warns about the ones that would matter."""
        known, extra = _split_known(data)
        ignored = sorted(k for k, v in extra.items() if _would_matter(k, v))
        if ignored:
            warnings.warn(f"generation config: ignoring unsupported settings {ignored}", UserWarning, stacklevel=2)
        config = cls(**known, extra=extra)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationConfig":
        """Reads a `generation_config.json` (a file, or a directory holding one)."""
        return cls.from_dict(_read_json(path))

    @classmethod
    def from_model_config(cls, text_config: Any) -> "GenerationConfig":
        """The defaults a language model's config implies: its special tokens and any generation fields it sets."""
        values = {}
        for name in _FIELD_NAMES:
            value = getattr(text_config, name, None)
            if value is not None:
                values[name] = value
        return cls.from_dict(values) if values else cls()

    def updated(self, values: dict[str, Any] | None = None, /, **kwargs: Any) -> "GenerationConfig":
        """A copy with `values` and `kwargs` applied; unknown names raise TypeError (they are typos)."""
        values = {**(values or {}), **kwargs}
        unknown = sorted(set(values) - set(_FIELD_NAMES) - set(NO_OP_KWARGS))
        if unknown:
            raise TypeError(
                f"generate() got unknown keyword arguments {unknown}; supported: {sorted(_FIELD_NAMES)}"
            )
        for name in set(values) & set(NO_OP_KWARGS):
            if values[name] != NO_OP_KWARGS[name]:
                raise ValueError(f"generate(): {name}={values[name]!r} is not supported (only {NO_OP_KWARGS[name]!r})")
        new = dataclasses.replace(self, **{k: v for k, v in values.items() if k in _FIELD_NAMES})
        new.validate()
        return new

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _FIELD_NAMES}
        return {**self.extra, **out}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / GENERATION_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # ---- derived values ----
    @property
    def eos_ids(self) -> list[int]:
        """eos_token_id as a list (empty when there is none)."""
        eos = self.eos_token_id
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else list(eos)

    @property
    def resolved_pad_token_id(self) -> int | None:
        """The pad id, falling back to the first eos id as the reference does."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        eos = self.eos_ids
        return eos[0] if eos else None

    def total_length(self, start_len: int) -> int:
        """The history length at which generation stops: the 4.37 `max_length` after `max_new_tokens`."""
        total = self.max_length if self.max_new_tokens is None else start_len + self.max_new_tokens
        if total <= start_len:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for new tokens: the generated sequence starts "
                f"with {start_len} token(s) (BOS / decoder start) that max_length counts; "
                "raise max_length or set max_new_tokens"
            )
        return total

    def new_token_limit(self, start_len: int) -> int:
        """How many tokens generation may add to a history of `start_len` (the size a KV cache needs)."""
        return self.total_length(start_len) - start_len

    # ---- checks ----
    def validate(self) -> None:
        """Raises ValueError / TypeError with a message naming the field."""
        _check_int("max_length", self.max_length, minimum=1)
        if self.max_new_tokens is not None:
            _check_int("max_new_tokens", self.max_new_tokens)
            if self.max_new_tokens <= 0:
                raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        _check_int("min_length", self.min_length, minimum=0)
        if self.min_new_tokens is not None:
            _check_int("min_new_tokens", self.min_new_tokens, minimum=0)
        _check_int("num_beams", self.num_beams, minimum=1)
        _check_int("num_return_sequences", self.num_return_sequences, minimum=1)
        _check_int("top_k", self.top_k, minimum=0)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, minimum=0)
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        _check_number("length_penalty", self.length_penalty)
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {self.temperature}; "
                "for the most likely token use do_sample=False (greedy)"
            )
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_return_sequences > 1 and not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams}); "
                "greedy search returns one sequence per input, beam search at most num_beams"
            )
        if self.do_sample and self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})"
            )
        for name in ("bos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id"):
            value = getattr(self, name)
            if value is not None:
                # The original InstructBLIP-Vicuna configs say pad_token_id -1 (the reference accepts it).
                _check_int(name, value, minimum=None if name == "pad_token_id" else 0)
        for name in ("eos_token_id", "forced_eos_token_id"):
            ids = getattr(self, name)
            if isinstance(ids, (list, tuple)):
                if not ids:
                    raise ValueError(f"{name} must not be an empty list (use None for none)")
                for e in ids:
                    _check_int(name, e, minimum=0)
                setattr(self, name, list(ids))
            elif ids is not None:
                _check_int(name, ids, minimum=0)
        if self.seed is not None:
            _check_int("seed", self.seed)


# Keyword arguments the reference accepts that we take only at their default value.
NO_OP_KWARGS: dict[str, Any] = {
    "output_scores": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict_in_generate": False,
    "num_beam_groups": 1,
    "synced_gpus": False,
}

_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(GenerationConfig) if f.name != "extra")

# Keys a reference generation_config.json carries that are metadata, not settings.
_METADATA = {"transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash"}

# Reference defaults of settings we do not implement: a file holding exactly these changes nothing.
_HARMLESS_DEFAULTS: dict[str, Any] = {
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0,
    "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "renormalize_logits": False,
    "remove_invalid_values": False, "guidance_scale": None, "penalty_alpha": None, "low_memory": None,
    "bad_words_ids": None, "force_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_decoder_ids": None, "sequence_bias": None,
    "constraints": None, "exponential_decay_length_penalty": None, "max_time": None, "num_assistant_tokens": 5,
    "num_assistant_tokens_schedule": "heuristic", "prompt_lookup_num_tokens": None, "generation_kwargs": {},
    **NO_OP_KWARGS,
}


def _split_known(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    known = {k: v for k, v in data.items() if k in _FIELD_NAMES}
    extra = {k: v for k, v in data.items() if k not in _FIELD_NAMES}
    return known, extra


def _would_matter(key: str, value: Any) -> bool:
    if key in _METADATA or key.startswith("_"):
        return False
    return key not in _HARMLESS_DEFAULTS or _HARMLESS_DEFAULTS[key] != value


def _check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def resolve_config(
    text_config: Any = None,
    file_config: GenerationConfig | dict[str, Any] | str | Path | None = None,
    **kwargs: Any,
) -> GenerationConfig:
    """kwargs > generation_config.json > the text config's own fields, then validated.

    `file_config` may be a GenerationConfig, a dict, or a path; missing files are fine (None).
    """
    config = GenerationConfig.from_model_config(text_config) if text_config is not None else GenerationConfig()
    if isinstance(file_config, (str, Path)):
        file_config = _read_json(file_config)
        GenerationConfig.from_dict(file_config)  # validates the file on its own and warns about what it ignores
    if isinstance(file_config, GenerationConfig):
        # Only fields that differ from the defaults override the text config.
        given = file_config
        file_config = {k: v for k, v in given.to_dict().items() if k in _FIELD_NAMES and _explicit(given, k)}
    if file_config:
        known, _ = _split_known(file_config)
        config = config.updated(known)
    return config.updated(kwargs)


def _explicit(config: GenerationConfig, name: str) -> bool:
    """Whether a field differs from the dataclass default (i.e. was set by whoever made it)."""
    default = GenerationConfig.__dataclass_fields__[name].default
    return getattr(config, name) != default


def _read_json(path: str | Path) -> dict[str, Any]:
    """A generation_config.json (or a directory holding one) as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / GENERATION_CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
