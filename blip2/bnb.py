"""8-bit and 4-bit loading on CUDA through bitsandbytes, with the reference's names.

`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_8bit=True))` (transformers'
config object or a dict of its fields), or the shortcuts `load_in_8bit=True` / `load_in_4bit=True`.
Which layers are quantized is decided as the reference decides it, over the reference's module
names: every linear layer except those named (as a substring of the dotted name) by
`llm_int8_skip_modules`, or by default the output head and what is tied to it, plus the modules
the reference keeps in float32 (`wo`) and any a device map puts on the CPU or disk (which needs
`llm_int8_enable_fp32_cpu_offload=True`). Our fused layers are quantized when every reference
projection in them is. Embeddings, norms and the query tokens keep `torch_dtype` (float16 unless
given), as in the reference.

bitsandbytes and a CUDA GPU are needed (`pip install -e ".[quant]"`); the choice of layers and the
errors are tested on CPU, the CUDA path itself is not tested in this repository's CI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# The reference's Blip2 classes keep these in float32 and never quantize them.
KEEP_IN_FP32 = ["wo"]


@dataclass
class BnbSettings:
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: torch.dtype = torch.float32
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config=None, load_in_8bit: bool = False, load_in_4bit: bool = False) -> "BnbSettings":
        """From transformers' BitsAndBytesConfig, a dict of its fields, or the load_in_* shortcuts."""
        if config is not None and (load_in_8bit or load_in_4bit):
            raise ValueError("pass quantization_config or load_in_8bit / load_in_4bit, not both")
        raw = dict(config.to_dict() if hasattr(config, "to_dict") else (config or {}))
        raw.setdefault("load_in_8bit", load_in_8bit)
        raw.setdefault("load_in_4bit", load_in_4bit)
        method = raw.pop("quant_method", "bitsandbytes")
        if str(getattr(method, "value", method)) != "bitsandbytes":
            raise ValueError(f"quantization_config: quant_method {method!r} is not supported (only bitsandbytes)")
        raw.pop("bnb_4bit_quant_storage", None)
        known = {k: raw.pop(k) for k in list(raw) if k in cls.__dataclass_fields__ and k != "extra"}
        settings = cls(**known, extra=raw)
        if settings.load_in_8bit == settings.load_in_4bit:
            raise ValueError("quantization_config needs exactly one of load_in_8bit=True and load_in_4bit=True")
        if settings.bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'fp4' or 'nf4', got {settings.bnb_4bit_quant_type!r}")
        dtype = settings.bnb_4bit_compute_dtype
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"bnb_4bit_compute_dtype must be a torch dtype or its name, got {settings.bnb_4bit_compute_dtype!r}")
        settings.bnb_4bit_compute_dtype = dtype
        return settings


def skipped(model, settings: BnbSettings, device_map: dict | None = None) -> list[str]:
    """The reference's modules_to_not_convert for this model."""
    if settings.llm_int8_skip_modules is not None:
        skip = list(settings.llm_int8_skip_modules)
    else:
        skip = _tied_and_last(model)
    skip += KEEP_IN_FP32
    if isinstance(device_map, dict) and len(device_map) > 1:
        offloaded = [k for k, v in device_map.items() if v in ("cpu", "disk")]
        if offloaded and not settings.llm_int8_enable_fp32_cpu_offload:
            raise ValueError("device_map puts modules on the CPU or disk; with 8/4-bit loading that needs "
                             "llm_int8_enable_fp32_cpu_offload=True (they stay unquantized in float32)")
        skip += offloaded
    return skip


def _tied_and_last(model) -> list[str]:
    """The reference's default, by its names: the output head (its last parameter) and every module
    whose weight is tied to the head or to the embeddings."""
    table = model.key_table()
    tied = {"language_model.lm_head"}
    for copy, ours in table.tied.items():
        tied.add(copy.rsplit(".", 1)[0])
        tied.update(h.rsplit(".", 1)[0] for rule in table.rules if rule.ours == ours for h in rule.hf)
    return sorted(tied)


def layers_to_quantize(model, skip: list[str]) -> list[str]:
    """Our linear layers to quantize: those all of whose reference projections the reference quantizes."""
    from .adapters import reference_linears

    verdict: dict[str, bool] = {}
    for hf, (ours, _, _) in reference_linears(model).items():
        converted = hf.rsplit(".", 1)[-1] not in skip and not any(key in hf for key in skip)
        verdict[ours] = verdict.get(ours, True) and converted
    return sorted(name for name, yes in verdict.items() if yes)


def check_environment() -> None:
    """A clear error before any work when bitsandbytes cannot run here."""
    if not torch.cuda.is_available():
        raise RuntimeError("8-bit and 4-bit loading (bitsandbytes) needs a CUDA GPU and none is available; "
                           "on CPU use quantize='int8' (weight-only int8) instead")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError('8-bit and 4-bit loading needs bitsandbytes: pip install -e ".[quant]"') from None


@torch.no_grad()
def quantize_(model: nn.Module, settings: BnbSettings, names: list[str], device) -> nn.Module:
    """Replaces each named linear layer by bitsandbytes' 8-bit or 4-bit layer on `device` (CUDA)."""
    import bitsandbytes as bnb

    for name in names:
        linear = model.get_submodule(name)
        parent_name, _, attr = name.rpartition(".")
        has_bias = linear.bias is not None
        if settings.load_in_8bit:
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias,
                                      has_fp16_weights=settings.llm_int8_has_fp16_weight,
                                      threshold=settings.llm_int8_threshold)
            new.weight = bnb.nn.Int8Params(linear.weight.data.to(torch.float16), requires_grad=False,
                                           has_fp16_weights=settings.llm_int8_has_fp16_weight)
        else:
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias,
                                    compute_dtype=settings.bnb_4bit_compute_dtype,
                                    compress_statistics=settings.bnb_4bit_use_double_quant,
                                    quant_type=settings.bnb_4bit_quant_type)
            new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False,
                                           compress_statistics=settings.bnb_4bit_use_double_quant,
                                           quant_type=settings.bnb_4bit_quant_type)
        if has_bias:
            new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        new = new.to(device)  # moving the weight to the GPU is what quantizes it
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def load_quantized_(model: nn.Module, settings: BnbSettings, device: torch.device | None = None) -> nn.Module:
    """Quantizes the chosen layers and puts the model on `device` (default the current GPU)."""
    check_environment()
    names = layers_to_quantize(model, skipped(model, settings))
    device = device or torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        raise ValueError(f"8/4-bit layers run on a CUDA GPU, not on {device}")
    for module_name in KEEP_IN_FP32:
        for name, module in model.named_modules():
            if name.endswith("." + module_name):
                module.float()
    quantize_(model, settings, names, device)
    model.to(device)
    model.quantization_config = settings
    return model
