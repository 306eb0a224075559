"""The documented transformers classes, built on the lean core.

Each class is a core module plus the reference's calling convention: `output_attentions`,
`output_hidden_states`, `return_dict`, output objects, and `from_pretrained` /
`save_pretrained` in the transformers checkpoint format.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint as ckpt
from .adapters import PeftAdapterMixin, base_state_dict
from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, BaseConfig
from .families import family_of
from .generation import GENERATION_CONFIG_NAME, GenerationConfig, resolve_config
from .hub import resolve_file
from .keymap import KeyTable, blip2_table, qformer_rules, vision_rules
from .modeling.attention import Positions
from .modeling.blip2 import Blip2, check_pixel_values
from .modeling.checkpointing import is_checkpointing
from .modeling.inference import InferenceLayout, quantize_model
from .modeling.init import init_model_
from .modeling.quant import QUANTIZERS, QuantizedLoad
from .modeling.qformer import QFormer
from .modeling.vision import VisionEncoder
from .outputs import (
    BaseModelOutputWithPooling,
    BaseModelOutputWithPoolingAndCrossAttentions,
    Blip2ForConditionalGenerationModelOutput,
    CausalLMOutputWithPast,
    Seq2SeqLMOutput,
)

HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "subfolder")


def fast_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype `torch_dtype="fast"` picks: bfloat16 where the hardware computes it natively
    (CPUs with AVX512-BF16 or AMX, CUDA GPUs with bf16), float32 elsewhere."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        native = (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                  or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def _dtype(value, device=None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "fast":
        return fast_dtype(device)
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
    raise ValueError(f"torch_dtype must be a torch.dtype, 'auto', 'fast' or a dtype name, got {value!r}")


def _resized(old: nn.Module, n: int, std: float) -> nn.Module:
    """A copy of an embedding or head layer with n rows: the first rows kept, new ones drawn."""
    weight = old.weight
    new = torch.empty(n, weight.shape[1], dtype=weight.dtype, device=weight.device)
    nn.init.normal_(new, 0.0, std)
    keep = min(n, weight.shape[0])
    with torch.no_grad():
        new[:keep] = weight[:keep]
    if isinstance(old, nn.Embedding):
        padding = old.padding_idx if old.padding_idx is not None and old.padding_idx < n else None
        layer = nn.Embedding(n, weight.shape[1], padding_idx=padding, device="meta")
    else:
        layer = nn.Linear(weight.shape[1], n, bias=old.bias is not None, device="meta")
        if old.bias is not None:
            bias = torch.zeros(n, dtype=old.bias.dtype, device=old.bias.device)
            with torch.no_grad():
                bias[:keep] = old.bias[:keep]
            layer.bias = nn.Parameter(bias, requires_grad=old.bias.requires_grad)
    layer.weight = nn.Parameter(new, requires_grad=weight.requires_grad)
    return layer


def checkpoint_dir(name_or_path, **hub) -> Path:
    """The local folder holding config.json and the weights (downloading them if needed)."""
    config_file = resolve_file(name_or_path, "config.json", **hub)
    folder = config_file.parent
    if Path(name_or_path).is_dir():
        return folder
    # From the hub: fetch the index first, then whatever weight files it names.
    for index in (ckpt.SAFE_INDEX, ckpt.BIN_INDEX):
        found = resolve_file(name_or_path, index, required=False, **hub)
        if found is not None:
            from .hub import read_json

            for shard in sorted(set(read_json(found).get("weight_map", {}).values())):
                resolve_file(name_or_path, shard, **hub)
            return folder
    for name in (ckpt.SAFE_WEIGHTS, ckpt.BIN_WEIGHTS):
        if resolve_file(name_or_path, name, required=False, **hub) is not None:
            return folder
    return folder


# from_pretrained's keyword arguments: name -> (default, what it does). Other features add rows
# here; a name neither here nor a config field is an error that lists these.
FROM_PRETRAINED_KWARGS: dict[str, tuple[object, str]] = {
    "config": (None, "a config to build the model from instead of the checkpoint's config.json"),
    "torch_dtype": (None, "a torch.dtype or its name; 'auto': the dtype config.json records (else the weights'); "
                          "'fast': bfloat16 where the hardware computes it natively, else float32; "
                          "default float32 (torch's default dtype), whatever the file holds, as the reference"),
    "device": (None, "where to put the model (default CPU)"),
    "device_map": (None, "a device or {'': device}: the whole model there; 'auto', 'balanced', 'balanced_low_0', "
                         "'sequential' or a dict of module -> device: placement over several devices through "
                         "accelerate (blip2.device_map), as the reference places it"),
    "max_memory": (None, "with a device_map strategy: the most each device may hold, {0: '10GiB', 'cpu': '30GiB'}"),
    "offload_folder": (None, "where modules a device_map puts on 'disk' are written and read back from"),
    "quantization_config": (None, "transformers' BitsAndBytesConfig (or a dict of its fields): 8-bit or 4-bit "
                                  "linear layers on a CUDA GPU through bitsandbytes, chosen as the reference "
                                  "chooses them (blip2.bnb); or a TorchAoConfig asking for int8 / int4 "
                                  "weight-only, which selects quantize= (blip2.torchao_config)"),
    "load_in_8bit": (False, "the reference's shortcut for quantization_config=BitsAndBytesConfig(load_in_8bit=True)"),
    "load_in_4bit": (False, "the reference's shortcut for quantization_config=BitsAndBytesConfig(load_in_4bit=True)"),
    "quantize": (None, "'int8' or 'int4': the language model's linear layers as int8 weights with per-channel "
                       "scales or int4 ones with a scale and zero per 128 inputs (weight-only, CPU decoding; "
                       "inference only)"),
    "state_dict": (None, "tensors under the checkpoint's names, loaded instead of the weight files"),
    "output_loading_info": (False, "also return {'missing_keys', 'unexpected_keys', 'mismatched_keys', "
                                   "'error_msgs'}: always empty lists, since loading is strict and raises instead"),
    "low_cpu_mem_usage": (None, "accepted for compatibility: the model is always built on the meta device "
                                "and filled from lazily read tensors"),
    "use_safetensors": (None, "accepted: safetensors files are preferred when both formats are present"),
    "revision": (None, "hub revision (branch, tag or commit)"),
    "cache_dir": (None, "the hub cache folder"),
    "local_files_only": (False, "never download"),
    "token": (None, "hub access token"),
    "subfolder": (None, "the folder inside the checkpoint that holds config.json and the weights"),
}


def _from_pretrained_options(cls, kwargs: dict) -> tuple[dict, dict]:
    """(options with defaults filled in, config-field overrides); raises on any other name."""
    opts = {name: kwargs.pop(name, default) for name, (default, _) in FROM_PRETRAINED_KWARGS.items()}
    fields = cls.config_class._table() if hasattr(cls.config_class, "_table") else {}
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    if kwargs:
        raise TypeError(
            f"{cls.__name__}.from_pretrained got unexpected keyword argument(s) {sorted(kwargs)}; it takes "
            f"{', '.join(FROM_PRETRAINED_KWARGS)} (see blip2.hf_compat.FROM_PRETRAINED_KWARGS) or a config field"
        )
    return opts, overrides


def _load_dtype(torch_dtype, config, folder: Path | None, state, device) -> torch.dtype:
    """The dtype to load into: float32 (torch's default) unless asked, as the reference does."""
    if torch_dtype is None:
        return torch.get_default_dtype()
    if torch_dtype == "auto":
        # 4.x writes "torch_dtype", 5.x writes "dtype"; without either, the weights' own dtype.
        recorded = config.torch_dtype or config.extra.get("dtype")
        if recorded is not None:
            return _dtype(recorded, device)
        return ckpt.stored_float_dtype(folder, state) or torch.get_default_dtype()
    return _dtype(torch_dtype, device)


def _places_over_devices(device_map) -> bool:
    """A placement strategy or a dict naming modules: accelerate's work (`blip2.device_map`)."""
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return True
    return isinstance(device_map, dict) and set(device_map) != {""}


def _device_from_map(device_map, device) -> torch.device | None:
    """device_map as the reference spells a single device (a device, or {'': device})."""
    if device_map is None or _places_over_devices(device_map):
        return torch.device(device) if device is not None else None
    target = device_map[""] if isinstance(device_map, dict) else device_map
    if isinstance(target, int):
        target = torch.device("cuda", target)
    try:
        target = torch.device(target)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map: cannot read {device_map!r} as a device") from None
    if device is not None and torch.device(device) != target:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
    return target


# model_type of a whole checkpoint -> the class that generates with it
WHOLE_MODELS = {"blip-2": "Blip2ForConditionalGeneration", "instructblip": "InstructBlipForConditionalGeneration",
                "instructblipvideo": "InstructBlipVideoForConditionalGeneration"}


def check_model_family(cls, config_file: Path) -> None:
    """A BLIP-2 checkpoint given to an InstructBLIP class (or the reverse) is named as such,
    rather than failing later on a list of unexpected keys."""
    import json

    expected = cls.config_class.model_type
    try:
        found = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # the config reader reports unreadable files itself
    if expected in WHOLE_MODELS and found in WHOLE_MODELS and found != expected and \
            found not in cls.config_class.also_reads:
        raise ValueError(
            f"{config_file.parent} holds a {found!r} checkpoint, but {cls.__name__} loads {expected!r} ones: "
            f"use {WHOLE_MODELS[found]} (or blip2.load_model, which picks the class from config.json)"
        )


def _torchao_to_quantize(opts: dict) -> None:
    """A torchao quantization_config (the reference's CPU int8 / int4) becomes quantize= (blip2.torchao_config)."""
    from .torchao_config import is_torchao, quantize_kind

    if opts["quantization_config"] is None or not is_torchao(opts["quantization_config"]):
        return
    if opts["quantize"] is not None or opts["load_in_8bit"] or opts["load_in_4bit"]:
        raise ValueError("a torchao quantization_config and quantize= / load_in_8bit / load_in_4bit exclude each "
                         "other; pass one")
    opts["quantize"] = quantize_kind(opts["quantization_config"])
    opts["quantization_config"] = None


def _bnb_settings(opts: dict):
    """bitsandbytes settings when 8/4-bit loading is asked for (checked before any weight is read)."""
    if opts["quantization_config"] is None and not (opts["load_in_8bit"] or opts["load_in_4bit"]):
        return None
    from .bnb import BnbSettings, check_environment

    if opts["quantize"] is not None:
        raise ValueError("quantize= (CPU int8) and bitsandbytes 8/4-bit loading exclude each other; pass one")
    settings = BnbSettings.from_config(opts["quantization_config"], opts["load_in_8bit"], opts["load_in_4bit"])
    if _places_over_devices(opts["device_map"]):
        raise ValueError("8/4-bit loading with a device_map over several devices is not supported here; "
                         "load onto one GPU (device_map=None or {'': 0})")
    check_environment()
    return settings


def _place(model, opts: dict, dtype, device, bnb) -> None:
    """After loading on the CPU: 8/4-bit layers on the GPU, or a device map through accelerate,
    or one device."""
    if bnb is not None:
        from .bnb import load_quantized_

        load_quantized_(model, bnb, device)
        return
    if _places_over_devices(opts["device_map"]):
        if opts["device"] is not None or opts["quantize"] is not None:
            raise ValueError("a device_map over several devices cannot be combined with device or quantize")
        from .device_map import dispatch

        dispatch(model, opts["device_map"], opts["max_memory"], opts["offload_folder"], dtype)
    elif opts["max_memory"] is not None or opts["offload_folder"] is not None:
        raise ValueError("max_memory and offload_folder need a device_map (e.g. device_map='auto')")
    if device is not None:
        model.to(device)


class PreTrainedModel(PeftAdapterMixin, InferenceLayout):
    """from_pretrained / save_pretrained through the key table, dtype and device, and LoRA adapters.

    Linear layers are prepacked for CPU inference on first use and unpacked for training
    (`blip2.modeling.inference.InferenceLayout`)."""

    config_class: type[BaseConfig] = BaseConfig
    main_input_name = "pixel_values"
    keep_in_fp32: tuple[str, ...] = ()  # module names kept in float32 when loading float16
    # Classes a device map never splits across devices (their residual sums need one device).
    _no_split_modules: list[str] = ["VisionBlock", "QFormerLayer", "OPTLayer", "EncoderLayer", "DecoderLayer"]

    # What libraries (accelerate, peft, trainers) read off a transformers model; values as the reference's.
    base_model_prefix = "blip"
    supports_gradient_checkpointing = True
    _keep_in_fp32_modules = ["wo"]
    _skip_keys_device_placement = "past_key_values"
    _tied_weights_keys: list[str] | None = None
    # Blocks that must stay whole on one device: our module classes (the reference names its own).
    _no_split_modules = ["VisionBlock", "QFormerLayer", "OPTLayer", "EncoderLayer", "DecoderLayer", "LlamaLayer"]

    def key_table(self) -> KeyTable:
        raise NotImplementedError

    def init_weights(self) -> None:
        """Draws every weight afresh by the reference's rules (see `blip2.modeling.init`)."""
        self.plain_layout()  # into the plain weights; the next inference packs them
        init_model_(self, self.config)
        for module in self.modules():
            if module is not self and hasattr(module, "tie_weights"):
                module.tie_weights()

    @classmethod
    def can_generate(cls) -> bool:
        return callable(getattr(cls, "generate", None))

    @property
    def dtype(self) -> torch.dtype:
        return self.first_parameter().dtype

    @property
    def device(self) -> torch.device:
        return self.first_parameter().device

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted as the reference counts them: tied ones once; embedding tables
        (`nn.Embedding`, and tables the reference keeps in one, `counts_as_embedding`) left out on request."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for m in self.modules():
                if isinstance(m, nn.Embedding) or getattr(m, "counts_as_embedding", False):
                    params.pop(id(m.weight), None)
        return sum(p.numel() for p in params.values() if p.requires_grad or not only_trainable)

    # ---- embeddings ----
    def get_input_embeddings(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} has no input embedding layer")

    def get_output_embeddings(self) -> nn.Module | None:
        return None  # no language-modelling head

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None) -> nn.Embedding:
        """Grows or shrinks the vocabulary: rows kept, new rows ~ N(0, initializer_range), the head
        (untied) resized alike, the text config's vocab_size updated. Returns the input embeddings."""
        old = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return old
        n = old.num_embeddings if new_num_tokens is None else int(new_num_tokens)
        if pad_to_multiple_of:
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        if n < 1:
            raise ValueError(f"resize_token_embeddings: new_num_tokens must be >= 1, got {new_num_tokens}")
        head = self.get_output_embeddings()
        tied = head is not None and head.weight is old.weight
        self.set_input_embeddings(_resized(old, n, self.config.initializer_range))
        if head is not None and not tied:
            self.set_output_embeddings(_resized(head, n, self.config.initializer_range))
        self._set_vocab_size(n)
        for module in self.modules():
            if module is not self and hasattr(module, "tie_weights"):
                module.tie_weights()
        return self.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no input embedding layer to replace")

    def set_output_embeddings(self, value: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no output embedding layer to replace")

    def _set_vocab_size(self, n: int) -> None:
        self.config.vocab_size = n

    # ---- gradient checkpointing ----
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recomputes each layer's activations in the backward pass instead of keeping them (while
        training); gradients are the same. Keyword arguments go to torch.utils.checkpoint.checkpoint."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        for module in self.modules():
            if hasattr(type(module), "checkpointing"):
                module.checkpointing = kwargs

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if hasattr(type(module), "checkpointing"):
                module.checkpointing = None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "checkpointing", None) is not None for m in self.modules())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None, *model_args, **kwargs):
        """Loads a transformers-format checkpoint: a local directory or a hub id.

        The keyword arguments are those of `FROM_PRETRAINED_KWARGS` (which says what each does),
        plus any config field (`output_hidden_states=True`, ...), which overrides the file's.
        """
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes the path and keyword arguments only; "
                            f"got extra positional arguments {model_args!r}")
        opts, overrides = _from_pretrained_options(cls, kwargs)
        hub = {k: opts[k] for k in HUB_KWARGS if opts[k] is not None}
        name = pretrained_model_name_or_path
        config, state = opts["config"], opts["state_dict"]
        if name is None and (config is None or state is None):
            raise ValueError(f"{cls.__name__}.from_pretrained needs a path or hub id (or both config= and state_dict=)")
        folder = None
        if name is not None:
            folder = resolve_file(name, "config.json", **hub).parent if state is not None else checkpoint_dir(name, **hub)
        if config is None:
            check_model_family(cls, folder / "config.json")
            config = cls.config_class.from_json_file(folder / "config.json")
        for key, value in overrides.items():
            setattr(config, key, value)
        _torchao_to_quantize(opts)
        bnb = _bnb_settings(opts)
        if bnb is not None and opts["torch_dtype"] is None:
            opts["torch_dtype"] = torch.float16  # the reference's default for 8/4-bit loading
        dtype = _load_dtype(opts["torch_dtype"], config, folder, state, opts["device"])
        device = _device_from_map(opts["device_map"], opts["device"])
        if opts["quantize"] is not None and opts["quantize"] not in QUANTIZERS:
            raise ValueError(f"quantize must be None or one of {sorted(QUANTIZERS)}, got {opts['quantize']!r}")
        skeleton = ckpt.build_on_meta(lambda: cls(config))
        # On the CPU the language model is quantized as it is read: the float model never exists whole.
        early = QuantizedLoad(skeleton, opts["quantize"]) if opts["quantize"] and device in (None, torch.device("cpu")) \
            else None
        model = ckpt.load_into(lambda: skeleton, folder, skeleton.key_table(), dtype, skeleton.keep_in_fp32, state=state,
                               sinks=early.sinks if early else None)
        if early:
            early.install()
        model.eval()
        _place(model, opts, dtype, device, bnb)
        quantize_model(model, opts["quantize"])  # what loading did not quantize: a tied output head
        model.name_or_path = str(name) if name is not None else ""
        config.name_or_path = model.name_or_path
        if opts["output_loading_info"]:
            # Loading is strict: anything missing, unexpected or misshapen raised above.
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    def save_pretrained(self, directory: str | os.PathLike, safe_serialization: bool = True,
                        max_shard_size: int | str | None = "5GB") -> None:
        """Writes config.json and the weights under the reference's names, atomically. A model
        holding LoRA adapters writes its active adapter alone, as transformers does
        (`save_base_pretrained` writes the model without them)."""
        if self._hf_peft_config_loaded:
            self._save_active_adapter(directory, safe_serialization)
            return
        self.save_base_pretrained(directory, safe_serialization=safe_serialization, max_shard_size=max_shard_size)

    def save_base_pretrained(self, directory: str | os.PathLike, safe_serialization: bool = True,
                             max_shard_size: int | str | None = "5GB") -> None:
        """Writes config.json and the weights, leaving out any LoRA adapters."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        hf = ckpt.ours_to_hf(base_state_dict(self), self.key_table())
        ckpt.save_state(hf, directory, safe_serialization, ckpt.parse_size(max_shard_size))
        # The file records the dtype and class, as the reference's does; the model's own config
        # is left as it was (the reference sets both on it as a side effect).
        written = copy.deepcopy(self.config)
        written.torch_dtype = self.dtype
        written.architectures = self.config.architectures or [type(self).__name__]
        written.save_pretrained(directory)

    @classmethod
    def _check_config(cls, config) -> None:
        whole = cls.config_class.model_type in WHOLE_MODELS  # BLIP-2 and InstructBLIP configs are not interchangeable
        if not isinstance(config, cls.config_class) or (whole and config.model_type != cls.config_class.model_type):
            raise TypeError(
                f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}"
            )

    def _flags(self, output_attentions, output_hidden_states, return_dict) -> tuple[bool, bool, bool]:
        cfg = self.config
        return (
            cfg.output_attentions if output_attentions is None else output_attentions,
            cfg.output_hidden_states if output_hidden_states is None else output_hidden_states,
            cfg.return_dict if return_dict is None else return_dict,
        )


# ---------------------------------------------------------------- vision
class Blip2VisionModel(PreTrainedModel, VisionEncoder):
    config_class = Blip2VisionConfig

    def __init__(self, config: Blip2VisionConfig) -> None:
        self._check_config(config)
        VisionEncoder.__init__(self, config)
        self.init_weights()

    def key_table(self) -> KeyTable:
        return KeyTable(vision_rules(self.config, prefix=""), {})

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def forward(self, pixel_values=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, interpolate_pos_encoding: bool = False):
        attn, hidden, as_dict = self._flags(output_attentions, output_hidden_states, return_dict)
        if pixel_values is None:
            raise ValueError("pixel_values must be given")
        check_pixel_values(pixel_values, self.config, interpolate_pos_encoding)
        self.fit_layout()
        out = VisionEncoder.forward(self, pixel_values, interpolate_pos_encoding, hidden, attn)
        return vision_output(out, as_dict)


def vision_output(out, as_dict: bool):
    result = BaseModelOutputWithPooling(out.last_hidden_state, out.pooled, out.hidden_states, out.attentions)
    return result if as_dict else result.to_tuple()


# ---------------------------------------------------------------- Q-Former
class Blip2QFormerModel(PreTrainedModel, QFormer):
    config_class = Blip2QFormerConfig
    main_input_name = "query_embeds"

    def __init__(self, config: Blip2QFormerConfig) -> None:
        self._check_config(config)
        QFormer.__init__(self, config)
        self.init_weights()

    def key_table(self) -> KeyTable:
        return KeyTable(qformer_rules(self.config, prefix=""), {})

    def forward(self, query_embeds, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        attn, hidden, as_dict = self._flags(output_attentions, output_hidden_states, return_dict)
        self._check_inputs(query_embeds, attention_mask, encoder_hidden_states, encoder_attention_mask,
                           past_key_values)
        self.fit_layout()
        out = QFormer.forward(
            self, query_embeds, encoder_hidden_states, attention_mask, encoder_attention_mask, head_mask,
            past=past_key_values, use_cache=bool(use_cache), need_hidden=hidden, need_weights=attn,
        )
        return qformer_output(out, as_dict)

    def _check_inputs(self, query_embeds, attention_mask, encoder_hidden_states, encoder_attention_mask,
                      past_key_values) -> None:
        cfg = self.config
        if not isinstance(query_embeds, Tensor) or query_embeds.dim() != 3 or query_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"query_embeds must be a tensor of shape (batch, num_queries, {cfg.hidden_size}), "
                f"got {tuple(getattr(query_embeds, 'shape', ())) or type(query_embeds).__name__}"
            )
        B, T, _ = query_embeds.shape
        if encoder_hidden_states is not None:
            if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[-1] != cfg.encoder_hidden_size:
                raise ValueError(
                    f"encoder_hidden_states must have shape (batch, length, {cfg.encoder_hidden_size}), "
                    f"got {tuple(encoder_hidden_states.shape)}"
                )
            if encoder_hidden_states.shape[0] != B:
                raise ValueError(
                    f"batch sizes differ: query_embeds {B}, encoder_hidden_states {encoder_hidden_states.shape[0]}"
                )
            N = encoder_hidden_states.shape[1]
            if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) not in ((B, N), (B, T, N)):
                raise ValueError(
                    f"encoder_attention_mask has shape {tuple(encoder_attention_mask.shape)}, "
                    f"expected ({B}, {N}) for encoder_hidden_states {tuple(encoder_hidden_states.shape)}"
                )
        S = T + (past_key_values[0][0].shape[2] if past_key_values is not None else 0)
        if attention_mask is not None and tuple(attention_mask.shape) not in ((B, S), (B, T, S)):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({B}, {S})")


def qformer_output(out, as_dict: bool):
    last = out.last_hidden_state
    result = BaseModelOutputWithPoolingAndCrossAttentions(
        last, last[:, 0, :], out.hidden_states, out.present, out.attentions, out.cross_attentions
    )
    return result if as_dict else result.to_tuple()


# ---------------------------------------------------------------- language model calls
def decoder_lm_outputs(lm, inputs_embeds, attention_mask, hidden: bool, attn: bool, **lm_kwargs) -> CausalLMOutputWithPast:
    # The reference returns each layer's keys and values when the config says use_cache (the default).
    # As in the reference, no cache while gradient checkpointing trains (a recomputed layer would write it twice).
    cache = None
    if lm.config.use_cache and not is_checkpointing(lm):
        B, T, _ = inputs_embeds.shape
        cache = lm.new_cache(B, T, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
    out = lm(inputs_embeds, attention_mask, cache, need_hidden=hidden, need_weights=attn, **lm_kwargs)
    past = tuple(zip(cache.k, cache.v)) if cache is not None else None
    return CausalLMOutputWithPast(logits=out.logits, past_key_values=past, hidden_states=out.hidden_states,
                                  attentions=out.attentions)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The reference's alignment: the last len(labels) logits, each predicting the next label."""
    B, T, V = logits.shape
    if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.shape[0] != B or labels.shape[1] > T:
        raise ValueError(
            f"labels must have shape ({B}, length <= {T}), got {tuple(getattr(labels, 'shape', ())) or type(labels).__name__}"
        )
    bad = (labels != -100) & ((labels < 0) | (labels >= V))
    if bad.any():
        raise ValueError(f"labels contain token id {labels[bad][0].item()}, outside the vocabulary [0, {V}) and not -100")
    labels = labels.to(logits.device)
    logits = logits[:, -labels.shape[1]:, :]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    return loss, logits


# ---------------------------------------------------------------- BLIP-2
class _Blip2Base(PreTrainedModel, Blip2):
    config_class = Blip2Config

    def __init__(self, config: Blip2Config) -> None:
        self._check_config(config)
        Blip2.__init__(self, config)
        tied = getattr(self.language_model, "_tied_weights_keys", None)
        self._tied_weights_keys = [f"language_model.{k}" for k in tied] if tied else None
        self.init_weights()

    def key_table(self) -> KeyTable:
        return blip2_table(self.config)

    @property
    def keep_in_fp32(self):  # instance view of the language model's needs
        return getattr(self.language_model, "keep_in_fp32", ())

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens if hasattr(self.language_model, "embed_tokens") else self.language_model.shared

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.lm_head

    def set_input_embeddings(self, value: nn.Module) -> None:
        lm = self.language_model
        setattr(lm, "embed_tokens" if hasattr(lm, "embed_tokens") else "shared", value)

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.lm_head = value

    def _set_vocab_size(self, n: int) -> None:
        self.config.text_config.vocab_size = n

    def forward(self, pixel_values, input_ids, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, output_attentions=None, output_hidden_states=None,
                labels=None, return_dict=None, interpolate_pos_encoding: bool = False):
        flags = self._flags(output_attentions, output_hidden_states, return_dict)
        return self._conditional_forward(pixel_values, input_ids, attention_mask, decoder_input_ids,
                                         decoder_attention_mask, labels, flags, interpolate_pos_encoding)

    def _conditional_forward(self, pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                             labels, flags, interpolate_pos_encoding: bool = False, output_class=None,
                             **query_inputs):
        """Image -> Q-Former (with `query_inputs`: InstructBLIP's instruction) -> language model."""
        attn, hidden, as_dict = flags
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)  # first: its batch size is used next
        self.check_input_ids(input_ids, pixel_values.shape[0])
        self.fit_layout()
        vis = self.image_features(pixel_values, interpolate_pos_encoding, hidden, attn)
        qf = self.query_features(vis.last_hidden_state, hidden, attn, **query_inputs)
        lm_inputs = self.language_projection(qf.last_hidden_state[:, : self.config.num_query_tokens])
        embeds, mask = self.merge(lm_inputs, input_ids, attention_mask)
        loss, logits, lm_out = self.language_forward(
            embeds, mask, decoder_input_ids, decoder_attention_mask, labels, need_hidden=hidden, need_weights=attn
        )
        output_class = output_class or Blip2ForConditionalGenerationModelOutput
        result = output_class(loss, logits, vision_output(vis, True), qformer_output(qf, True), lm_out)
        return result if as_dict else result.to_tuple()

    def language_forward(self, embeds, mask, decoder_input_ids=None, decoder_attention_mask=None, labels=None,
                         *, need_hidden: bool = False, need_weights: bool = False):
        """The language model on merged embeddings, through its family's adapter -> (loss, logits, outputs)."""
        forward = family_of(self.config).forward_adapter
        return forward(self.language_model, embeds, mask, decoder_input_ids, decoder_attention_mask, labels,
                       need_hidden=need_hidden, need_weights=need_weights)


# The families' forward adapters (see `blip2.families`):
# (lm, inputs_embeds, mask, decoder ids, decoder mask, labels, *, need_hidden, need_weights) -> (loss, logits, outputs)
def decoder_forward(lm, embeds, mask, decoder_input_ids, decoder_attention_mask, labels, *,
                    need_hidden: bool, need_weights: bool, **lm_kwargs):
    """Any decoder-only language model: decoder inputs do not apply; the loss is next-token."""
    lm_out = decoder_lm_outputs(lm, embeds, mask, need_hidden, need_weights, **lm_kwargs)
    loss, logits = None, lm_out.logits
    if labels is not None:
        loss, logits = causal_lm_loss(lm_out.logits, labels)
    return loss, logits, lm_out


def llama_forward(lm, embeds, mask, *args, **kwargs):
    """Llama: the reference's forward numbers positions 0..T-1 whatever the padding (its generate
    counts only unmasked tokens, as our stepper does)."""
    B, T, _ = embeds.shape
    at = Positions.after_cache(None, mask, embeds)._replace(ids=torch.arange(T, device=embeds.device).expand(B, T))
    return decoder_forward(lm, embeds, mask, *args, positions=at, **kwargs)


def t5_forward(lm, embeds, mask, decoder_input_ids, decoder_attention_mask, labels, *,
               need_hidden: bool, need_weights: bool):
    # T5 computes its own loss (labels shifted right feed the decoder); like the reference it
    # reports each decoder layer's keys and values when the config says use_cache.
    out = lm(embeds, mask, decoder_input_ids, decoder_attention_mask, labels, need_hidden=need_hidden,
             need_weights=need_weights, keep_cache=lm.config.use_cache and not is_checkpointing(lm.decoder))
    lm_out = Seq2SeqLMOutput(
        loss=out.loss, logits=out.logits,
        past_key_values=out.cache.per_layer() if out.cache is not None else None,
        decoder_hidden_states=out.decoder.hidden_states, decoder_attentions=out.decoder.attentions,
        cross_attentions=out.decoder.cross_attentions, encoder_last_hidden_state=out.encoder.last_hidden_state,
        encoder_hidden_states=out.encoder.hidden_states, encoder_attentions=out.encoder.attentions,
    )
    return out.loss, out.logits, lm_out


class Blip2Model(_Blip2Base):
    """BLIP-2 with feature accessors for each stage."""

    def get_text_features(self, input_ids=None, attention_mask=None, decoder_input_ids=None,
                          decoder_attention_mask=None, labels=None, output_attentions=None,
                          output_hidden_states=None, return_dict=None):
        """The language model's outputs for text alone."""
        attn, hidden, as_dict = self._flags(output_attentions, output_hidden_states, return_dict)
        self.check_input_ids(input_ids)
        self.fit_layout()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.language_model.embed(input_ids)
        # Labels only mean something to an encoder-decoder here (the reference ignores them otherwise).
        _, _, out = self.language_forward(
            embeds, attention_mask, decoder_input_ids, decoder_attention_mask,
            None if family_of(self.config).decoder_only else labels, need_hidden=hidden, need_weights=attn,
        )
        return out if as_dict else out.to_tuple()

    def get_image_features(self, pixel_values=None, output_attentions=None, output_hidden_states=None,
                           return_dict=None, interpolate_pos_encoding: bool = False):
        """The image encoder's outputs."""
        attn, hidden, as_dict = self._flags(output_attentions, output_hidden_states, return_dict)
        self.fit_layout()
        return vision_output(self.image_features(pixel_values, interpolate_pos_encoding, hidden, attn), as_dict)

    def get_qformer_features(self, pixel_values=None, output_attentions=None, output_hidden_states=None,
                             return_dict=None, interpolate_pos_encoding: bool = False):
        """The Q-Former's outputs for each image."""
        attn, hidden, as_dict = self._flags(output_attentions, output_hidden_states, return_dict)
        self.fit_layout()
        vis = self.image_features(pixel_values, interpolate_pos_encoding, hidden, attn)
        return qformer_output(self.query_features(vis.last_hidden_state, hidden, attn), as_dict)


class Blip2ForConditionalGeneration(_Blip2Base):
    """BLIP-2 for captioning and visual question answering."""

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        # Generation defaults: the text config's, then generation_config.json's (from_pretrained).
        self.generation_config = resolve_config(config.text_config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None, *model_args, **kwargs):
        hub = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        found = None
        if pretrained_model_name_or_path is not None:
            found = resolve_file(pretrained_model_name_or_path, GENERATION_CONFIG_NAME, required=False, **hub)
        if found is not None:
            model.generation_config = resolve_config(model.config.text_config, found)
        return loaded

    def save_base_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        super().save_base_pretrained(directory, **kwargs)
        self.generation_config.save(Path(directory) / GENERATION_CONFIG_NAME)

    def generate(self, pixel_values: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                 *, interpolate_pos_encoding: bool = False, generation_config: GenerationConfig | None = None,
                 streamer=None, generator: torch.Generator | None = None, **generate_kwargs) -> Tensor:
        """Generates text from images and optional prompts (captioning without a prompt, VQA with one).

        Args:
            pixel_values: (batch, 3, height, width) images.
            input_ids: (batch, length) prompts, padded on either side; None for captioning.
                Every row generates what it generates alone: padding is moved to the side where
                it cannot change the result (before the text for decoder-only LMs, after it for T5).
            attention_mask: (batch, length), 0 on padding.
            generation_config: replaces the model's `generation_config` for this call.
            streamer: receives tokens as they are produced (e.g. `blip2.generation.TextIteratorStreamer`).
            generator: a torch.Generator for sampling, one stream for the whole batch; `seed=`
                instead gives every input its own stream, so it draws what it draws alone.
            generate_kwargs: any `GenerationConfig` field (`max_new_tokens`, `num_beams`, `do_sample`, ...).

        Returns:
            (batch * num_return_sequences, length) token ids: BOS (T5: the decoder start token)
            followed by the new tokens, as transformers 4.37 returns them.
        """
        base = self.generation_config if generation_config is None else generation_config
        config = base.updated(generate_kwargs)
        self.fit_layout(generating=True)
        return self.generate_tokens(pixel_values, input_ids, attention_mask, config, streamer=streamer,
                                    generator=generator, interpolate_pos_encoding=interpolate_pos_encoding)
