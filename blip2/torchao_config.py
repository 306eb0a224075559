"""`quantization_config` in torchao's terms, mapped onto our CPU weight-only layers (`quantize=`).

The reference (transformers 4.43 and later) quantizes on CPU through torchao:
`quantization_config=TorchAoConfig(Int8WeightOnlyConfig())` or `TorchAoConfig("int4_weight_only",
group_size=128)`. Here the same configs select `quantize="int8"` / `"int4"`: the same weight-only
scheme (int8 with a scale per output channel; int4 with a scale and zero per 128 inputs), run by
blip2's own layers, so torchao itself is not needed. One difference is kept and documented: ours
quantizes the language model's linear layers only (the image encoder and Q-Former stay in
`torch_dtype`), where the reference's torchao path also quantizes those.

Accepted: transformers' TorchAoConfig (its `quant_type` a torchao config object or the older
string), or a dict of its fields (`{"quant_method": "torchao", "quant_type": "int8_weight_only"}`).
Anything else torchao offers (dynamic activation quantization, float8, other group sizes) is a
clear error naming it.
"""

from __future__ import annotations

from typing import Any

# torchao's config classes (and the older string names) that mean what ours computes.
KINDS = {"Int8WeightOnlyConfig": "int8", "int8_weight_only": "int8",
         "Int4WeightOnlyConfig": "int4", "PrototypeInt4WeightOnlyConfig": "int4", "int4_weight_only": "int4"}
GROUP_SIZES = {"int8": (None,), "int4": (128,)}  # per output channel; groups of 128 inputs
OUTSIDE_LM = ("query_tokens", "vision_model", "qformer", "language_projection")  # never quantized here


def is_torchao(config: Any) -> bool:
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)) == "torchao"


def _name_and_options(quant_type: Any, config: Any) -> tuple[str, dict]:
    """(torchao config name, its options) from an object, a string, or a serialized dict."""
    if isinstance(quant_type, str):
        kwargs = config.get("quant_type_kwargs") if isinstance(config, dict) else getattr(config, "quant_type_kwargs", None)
        return quant_type, dict(kwargs or {})
    if isinstance(quant_type, dict):  # as transformers 5.x writes it: {"default": {"_type": ..., "_data": {...}}}
        entry = quant_type.get("default", quant_type)
        return str(entry.get("_type")), dict(entry.get("_data") or {})
    options = {k: getattr(quant_type, k) for k in ("group_size",) if hasattr(quant_type, k)}
    return type(quant_type).__name__, options


def quantize_kind(config: Any) -> str:
    """'int8' or 'int4' for a torchao `quantization_config`; a ValueError naming what is not supported."""
    quant_type = config.get("quant_type") if isinstance(config, dict) else getattr(config, "quant_type", None)
    name, options = _name_and_options(quant_type, config)
    kind = KINDS.get(name)
    if kind is None:
        raise ValueError(f"quantization_config: torchao {name!r} is not supported here; on CPU blip2 runs "
                         f"int8 / int4 weight-only ({sorted(KINDS)})")
    group = options.get("group_size", GROUP_SIZES[kind][0])  # torchao's defaults are these
    if group not in GROUP_SIZES[kind]:
        raise ValueError(f"quantization_config: torchao {name} with group_size={group!r} is not supported; "
                         f"{kind} here uses group_size={GROUP_SIZES[kind][0]!r}")
    field = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    inside = [m for m in field("modules_to_not_convert") or () if not m.split(".")[0] in OUTSIDE_LM]
    if inside:
        raise ValueError(f"quantization_config: modules_to_not_convert names {inside}; blip2 quantizes every "
                         f"linear layer of the language model (output head included) and nothing outside it")
    if field("include_input_output_embeddings"):
        raise ValueError("quantization_config: include_input_output_embeddings=True is not supported; "
                         "the embedding tables stay in torch_dtype")
    return kind


__all__ = ["is_torchao", "quantize_kind"]
