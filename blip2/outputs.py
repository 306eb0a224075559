"""Output objects shaped like transformers': fields by attribute, by name, and by index.

As in transformers, an index counts only the fields that are set (not None), in order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from torch import Tensor


class ModelOutput:
    def _set(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def keys(self):
        return [k for k, _ in self._set()]

    def values(self):
        return [v for _, v in self._set()]

    def items(self):
        return self._set()

    def to_tuple(self) -> tuple:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._set())

    def __contains__(self, key) -> bool:
        return key in self.keys()


T = Optional[Tensor]
Tup = Optional[tuple]


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: T = None
    pooler_output: T = None
    hidden_states: Tup = None
    attentions: Tup = None


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    last_hidden_state: T = None
    pooler_output: T = None
    hidden_states: Tup = None
    past_key_values: Tup = None
    attentions: Tup = None
    cross_attentions: Tup = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: T = None
    logits: T = None
    past_key_values: Tup = None
    hidden_states: Tup = None
    attentions: Tup = None


@dataclass
class Seq2SeqLMOutput(ModelOutput):
    loss: T = None
    logits: T = None
    past_key_values: Tup = None
    decoder_hidden_states: Tup = None
    decoder_attentions: Tup = None
    cross_attentions: Tup = None
    encoder_last_hidden_state: T = None
    encoder_hidden_states: Tup = None
    encoder_attentions: Tup = None


@dataclass
class Blip2ForConditionalGenerationModelOutput(ModelOutput):
    loss: T = None
    logits: T = None
    vision_outputs: Any = None
    qformer_outputs: Any = None
    language_model_outputs: Any = None


@dataclass
class InstructBlipForConditionalGenerationModelOutput(Blip2ForConditionalGenerationModelOutput):
    """The same fields; InstructBLIP's qformer_outputs cover the queries and the instruction."""
