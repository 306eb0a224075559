"""The language-model families BLIP-2 can sit on: one entry per family, and nothing else knows them.

Everything that differs between language models is in its entry: the config class that reads
`text_config`, the core module, the key rules that map checkpoint names to it, the adapter
that gives the documented classes their forward outputs, the generation stepper, whether it
is decoder-only, and its default VQA question template. Callers ask `family_of(config)`;
nobody tests `model_type == ...` or guesses from a model's name.

Adding a family (as `llama` was added; say `mistral`):
1. write the core module, `modeling/mistral.py`, speaking the interface `modeling/llama.py` does:
   `embed(ids)`, `new_cache(batch, max_len, dtype, device)` and
   `forward(inputs_embeds, attention_mask, cache, ..., last_logits=None, positions=None)`, where
   `positions` (`modeling.attention.Positions`: ids, cache slots, mask as tensors) replaces the
   cache's count; a decoder-only model then reuses `DecoderStepper`, `decoder_forward` and the
   graphed decode (CUDA graphs) unchanged;
2. add its config class to `config.py` and its key rules (a function `cfg -> KeyTable`) to
   `keymap.py`;
3. add one `LanguageModelFamily` to `FAMILIES` below (or call `register` from outside).
Code is named as "module:attribute" and imported on first use, so this table imports nothing
and a family's code is only loaded when a model uses it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LanguageModelFamily:
    model_type: str  # text_config.model_type
    decoder_only: bool  # prompts feed a decoder (left padding) rather than an encoder
    question_template: str  # the paper's VQA prompt for this family; "{}" is the question
    config: str  # the text config class
    module: str  # the core language model: nn.Module(text_config)
    key_rules: str  # (text_config) -> KeyTable for the `language_model.` keys
    forward: str  # the documented classes' call: (lm, embeds, mask, ...) -> (loss, logits, outputs)
    stepper: str  # the generation Stepper over this language model
    # Positions from a learned table (OPT): a prompt plus new tokens must fit max_position_embeddings.
    # Rotary (Llama) and relative (T5) positions have no such limit.
    learned_positions: bool = False

    @property
    def config_class(self) -> type:
        return _resolve(self.config)

    @property
    def module_class(self) -> type:
        return _resolve(self.module)

    @property
    def key_table(self):
        return _resolve(self.key_rules)

    @property
    def forward_adapter(self):
        return _resolve(self.forward)

    @property
    def stepper_class(self) -> type:
        return _resolve(self.stepper)


def _resolve(name: str) -> Any:
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


FAMILIES: dict[str, LanguageModelFamily] = {
    "opt": LanguageModelFamily(
        model_type="opt",
        decoder_only=True,
        question_template="Question: {} Answer:",
        config="blip2.config:OPTConfig",
        module="blip2.modeling.opt:OPTLanguageModel",
        key_rules="blip2.keymap:opt_rules",
        forward="blip2.hf_compat:decoder_forward",
        stepper="blip2.modeling.blip2:DecoderStepper",
        learned_positions=True,
    ),
    "t5": LanguageModelFamily(
        model_type="t5",
        decoder_only=False,
        # The paper's prompt for Flan-T5 (its zero-shot VQA setting).
        question_template="Question: {} Short answer:",
        config="blip2.config:T5Config",
        module="blip2.modeling.t5:T5LanguageModel",
        key_rules="blip2.keymap:t5_rules",
        forward="blip2.hf_compat:t5_forward",
        stepper="blip2.modeling.t5:T5Stepper",
    ),
    "llama": LanguageModelFamily(  # Llama 1/2, Vicuna (InstructBLIP's language model), GQA models
        model_type="llama",
        decoder_only=True,
        question_template="Question: {} Answer:",
        config="blip2.config:LlamaConfig",
        module="blip2.modeling.llama:LlamaLanguageModel",
        key_rules="blip2.keymap:llama_rules",
        forward="blip2.hf_compat:llama_forward",
        stepper="blip2.modeling.blip2:DecoderStepper",
    ),
}


def register(family: LanguageModelFamily) -> None:
    """Adds (or replaces) a family from outside this file."""
    FAMILIES[family.model_type] = family


def family(model_type: str) -> LanguageModelFamily:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"no language model family {model_type!r}; supported: {sorted(FAMILIES)}"
        ) from None


def family_of(config) -> LanguageModelFamily:
    """The family of a Blip2Config (through its text_config) or of a text config itself."""
    text = getattr(config, "text_config", config)
    return family(text.model_type)


def question_template(config) -> str:
    """The default VQA prompt for a model, from its config."""
    return family_of(config).question_template
