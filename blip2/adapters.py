"""LoRA adapters with the transformers adapter API, in peft's file format and the reference's names.

An adapter's target modules and saved tensors name the REFERENCE's modules
(`language_model.model.decoder.layers.0.self_attn.q_proj`), so adapters move both ways
between this package and transformers + peft. The key table says where each of those
modules lives in ours: a reference linear layer is a range of output rows of one of ours
(q_proj is the first third of our fused `qkv`), and a LoRA on it becomes a `LoraPiece` on
those rows, which is exact. Our own module names (`attn.qkv`) are accepted as targets too
(that is what `peft.get_peft_model` on our model uses); such a LoRA is saved as one LoRA per
reference projection sharing A, which is the same update.

Files: `adapter_config.json` (peft's LoraConfig fields) and `adapter_model.safetensors` with
keys `base_model.model.<reference module>.lora_A.weight` / `.lora_B.weight`, as
`PeftModel.save_pretrained` writes them. peft itself is not needed here; `peft.LoraConfig`
objects are accepted wherever a config is.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .hub import resolve_file
from .io import atomic_write, atomic_write_text
from .modeling.inference import InferenceLayout
from .modeling.lora import LoraLinear, LoraPiece

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
BIN_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix; transformers' load_adapter strips it too

# Options this implementation honours; any other LoraConfig field must keep peft's default.
_DEFAULTS = {"bias": "none", "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
             "fan_in_fan_out": False, "layer_replication": None}


@dataclass
class LoraSettings:
    """The LoraConfig fields that shape the update; `raw` keeps the whole config for saving."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    init_lora_weights: bool | str = True
    inference_mode: bool = False
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config) -> "LoraSettings":
        """From a peft LoraConfig, a dict, or an adapter_config.json's contents."""
        raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        peft_type = str(raw.get("peft_type", "LORA")).rsplit(".", 1)[-1].upper()  # enum or its name
        if peft_type != "LORA":
            raise ValueError(f"only LoRA adapters are supported, got peft_type {raw.get('peft_type')!r}")
        for key, default in _DEFAULTS.items():
            if raw.get(key, default) not in (default, [], {}):
                raise ValueError(f"LoRA option {key}={raw[key]!r} is not supported here (only {default!r})")
        targets = raw.get("target_modules")
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        if raw.get("init_lora_weights", True) not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={raw['init_lora_weights']!r} is not supported (True, False, 'gaussian')")
        settings = cls(int(raw.get("r", 8)), raw.get("lora_alpha", 8), float(raw.get("lora_dropout") or 0.0), targets,
                       bool(raw.get("use_rslora", False)), dict(raw.get("rank_pattern") or {}),
                       dict(raw.get("alpha_pattern") or {}), raw.get("init_lora_weights", True),
                       bool(raw.get("inference_mode", False)), {})
        settings.raw = {k: _json_safe(v) for k, v in raw.items()}
        settings.raw["peft_type"] = "LORA"
        return settings

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """r and alpha for module `name`: the first pattern key matching its end, else the defaults."""
        return _pattern(self.rank_pattern, name, self.r), _pattern(self.alpha_pattern, name, self.lora_alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern(pattern: dict, name: str, default):
    for key, value in pattern.items():  # peft's rule: the key matches a dotted suffix of the name
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def _json_safe(value):
    if isinstance(value, (set, tuple)):
        return sorted(value)
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):  # enums (TaskType, PeftType)
        return value.value
    return value


def target_matches(targets, name: str) -> bool:
    """peft's rule: a string is a regular expression over the whole name; a list names a module
    or the end of its dotted name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# ---------------------------------------------------------------- where the reference's modules are in ours
def _is_linear(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def our_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Our linear layers by name (a LoRA-wrapped one under its own name, not its `.base`)."""
    found = {}
    for name, module in model.named_modules():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if _is_linear(module) and not (name.endswith(".base") and isinstance(model.get_submodule(parent), LoraLinear)):
            found[name] = module
    return found


def reference_linears(model) -> dict[str, tuple[str, int, int]]:
    """Reference module name -> (our module, first row, end row), from the model's key table.

    A rule that concatenates n reference weights into one of ours gives each an equal share of
    the rows, in order; our linear layers the table does not rename (a tied output head) keep
    their names.
    """
    linears = our_linears(model)
    table = model.key_table()
    found, covered = {}, set()
    for rule in table.rules:
        if not rule.ours.endswith(".weight") or rule.ours[: -len(".weight")] not in linears:
            continue
        ours = rule.ours[: -len(".weight")]
        rows = linears[ours].out_features // len(rule.hf)
        for i, hf in enumerate(rule.hf):
            found[hf[: -len(".weight")]] = (ours, i * rows, (i + 1) * rows)
        covered.add(ours)
    for name, module in linears.items():
        if name not in covered and name not in found:
            found[name] = (name, 0, module.out_features)
    return found


def reference_modules(model) -> set[str]:
    """Every module of the reference that holds a checkpoint tensor (linear or not)."""
    table = model.key_table()
    keys = [h for rule in table.rules for h in rule.hf] + list(table.tied)
    return {k.rsplit(".", 1)[0] for k in keys if "." in k}


@dataclass(frozen=True)
class Target:
    name: str  # the module name the adapter file uses (the reference's, or ours)
    ours: str
    start: int
    end: int


def resolve_targets(model, settings: LoraSettings) -> list[Target]:
    """The modules `settings.target_modules` names: reference names first; our own names
    for layers no reference name reached."""
    targets = settings.target_modules
    if targets is None:
        raise ValueError("the LoRA config needs target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear')")
    ref = reference_linears(model)
    if targets == "all-linear":  # peft's shorthand: every linear layer but the output head
        head = _output_head_name(model)
        chosen = [Target(n, *ref[n]) for n in ref if n != head]
    else:
        chosen = [Target(n, *ref[n]) for n in ref if target_matches(targets, n)]
        reached = {t.ours for t in chosen}
        ours = our_linears(model)
        chosen += [Target(n, n, 0, m.out_features) for n, m in ours.items()
                   if n not in reached and n not in ref and target_matches(targets, n)]
    if not chosen:
        other = sorted(n for n in reference_modules(model) if n not in ref and target_matches(targets, n))
        if other:
            raise ValueError(f"target_modules {targets!r} name only layers LoRA cannot wrap here ({other[0]} is not "
                             "a linear layer); LoRA is supported on linear layers")
        raise ValueError(f"target_modules {targets!r} match no linear layer of {type(model).__name__} "
                         f"(reference names such as {_examples(ref)})")
    return chosen


def _output_head_name(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None)


def _examples(ref: dict) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in ref})
    return ", ".join(leaves[:12])


# ---------------------------------------------------------------- putting pieces in
def _wrap(model: nn.Module, name: str) -> LoraLinear:
    module = model.get_submodule(name)
    if isinstance(module, LoraLinear):
        return module
    parent_name, _, attr = name.rpartition(".")
    wrapped = LoraLinear(module)
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, wrapped)
    return wrapped


def _home(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """LoRA weights take the base layer's float dtype and device (float32 beside an int8 one)."""
    tensors = list(module.parameters()) + list(module.buffers())
    dtype = next((t.dtype for t in tensors if t.is_floating_point() and t.dim() == 2), torch.float32)
    device = tensors[0].device if tensors else torch.device("cpu")
    return dtype, device


def add_pieces(model: nn.Module, adapter: str, targets: list[Target], settings: LoraSettings,
               ranks: dict[str, int] | None = None) -> list[LoraPiece]:
    """One LoraPiece per target (rank from `ranks` when given, else from the settings)."""
    if isinstance(model, InferenceLayout):
        model.plain_layout()  # wrap plain layers: a packed fc1 carries its block's activation inside
    pieces = []
    for t in targets:
        layer = _wrap(model, t.ours)
        r, alpha = settings.rank_alpha(t.name)
        r = (ranks or {}).get(t.name, r)
        dtype, device = _home(layer.base)
        piece = LoraPiece(layer.in_features, t.start, t.end, r, settings.scaling(r, alpha), settings.lora_dropout,
                          settings.init_lora_weights, dtype, device)
        piece.target = t.name  # the name it is saved under
        layer.add_piece(adapter, piece)
        pieces.append(piece)
    return pieces


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def pieces_of(model: nn.Module, adapter: str) -> list[tuple[str, LoraLinear, LoraPiece]]:
    return [(name, layer, piece) for name, layer in lora_layers(model).items()
            for piece in (layer.adapters[adapter] if adapter in layer.adapters else ())]


# ---------------------------------------------------------------- the reference's state dict of an adapter
def adapter_state_dict(model, adapter: str) -> dict[str, Tensor]:
    """{reference module}.lora_A.weight / .lora_B.weight for every piece of `adapter`.

    A piece on our own module name that spans several reference projections (a LoRA on the
    fused qkv) is written as one LoRA per projection: the same A, B's rows split.
    """
    ref = reference_linears(model)
    by_ours: dict[str, list[tuple[str, int, int]]] = {}
    for hf, (ours, start, end) in ref.items():
        by_ours.setdefault(ours, []).append((hf, start, end))
    state = {}
    for ours, layer, piece in pieces_of(model, adapter):
        parts = [(hf, s, e) for hf, s, e in by_ours.get(ours, []) if piece.start <= s and e <= piece.end]
        if not parts:
            parts = [(piece.target, piece.start, piece.end)]
        for hf, s, e in parts:
            state[f"{hf}.lora_A.weight"] = piece.lora_A.detach().clone()
            state[f"{hf}.lora_B.weight"] = piece.lora_B[s - piece.start : e - piece.start].detach().clone()
    return state


def saved_config(model, adapter: str, settings: LoraSettings, state: dict[str, Tensor]) -> dict:
    """The adapter_config.json to write: the given config when its targets were reference names,
    otherwise the exact list of reference modules written (the reference matches them as they are)."""
    config = {"peft_type": "LORA", "task_type": None, "inference_mode": True, "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None, "layers_to_transform": None,
              "layers_pattern": None, "use_dora": False, "use_rslora": False, "init_lora_weights": True,
              "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0, **settings.raw}
    config["base_model_name_or_path"] = getattr(model, "name_or_path", None)
    config["inference_mode"] = True
    modules = sorted({k.rsplit(".", 2)[0] for k in state})
    ref = reference_linears(model)
    by_name = {p.target for _, _, p in pieces_of(model, adapter)}
    if not by_name <= set(ref):
        ranks = {m: state[f"{m}.lora_A.weight"].shape[0] for m in modules}
        config["target_modules"] = modules
        config["rank_pattern"] = {re.escape(m): r for m, r in ranks.items() if r != settings.r}
        config["alpha_pattern"] = {re.escape(m): a for m in modules
                                   if (a := _pattern(settings.alpha_pattern, m, settings.lora_alpha)) != settings.lora_alpha}
    config.setdefault("r", settings.r)
    config.setdefault("lora_alpha", settings.lora_alpha)
    return config


# ---------------------------------------------------------------- files
def read_adapter(name_or_path, **hub) -> tuple[dict, dict[str, Tensor]]:
    """adapter_config.json and the weights of an adapter folder or hub id."""
    config_file = resolve_file(name_or_path, CONFIG_NAME, **hub)
    from .hub import read_json

    config = read_json(config_file)
    weights = resolve_file(name_or_path, SAFE_WEIGHTS, required=False, **hub)
    if weights is not None:
        from safetensors.torch import load_file

        return config, load_file(str(weights))
    weights = resolve_file(name_or_path, BIN_WEIGHTS, required=False, **hub)
    if weights is None:
        raise FileNotFoundError(f"{name_or_path} has {CONFIG_NAME} but neither {SAFE_WEIGHTS} nor {BIN_WEIGHTS}")
    from .checkpoint import safe_torch_load

    return config, safe_torch_load(weights, "adapter weights file")


def write_adapter(directory: str | os.PathLike, config: dict, state: dict[str, Tensor],
                  safe_serialization: bool = True) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefixed = {PEFT_PREFIX + k: v.contiguous() for k, v in state.items()}
    if safe_serialization:
        from safetensors.torch import save_file

        atomic_write(directory / SAFE_WEIGHTS, lambda tmp: save_file(prefixed, str(tmp), metadata={"format": "pt"}))
    else:
        atomic_write(directory / BIN_WEIGHTS, lambda tmp: torch.save(prefixed, tmp))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _split_keys(state: dict[str, Tensor], where: str) -> dict[str, dict[str, Tensor]]:
    """{module: {"A": ..., "B": ...}} from peft keys (prefix and adapter name already absent)."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if name.endswith(".base_layer.weight"):
            continue  # peft's copy of a base weight (an output head tied to embeddings): see _check_base_copies
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if match is None:
            raise ValueError(f"{where}: key {key!r} is not a LoRA weight (lora_A / lora_B); only plain LoRA "
                             "adapters are supported")
        modules.setdefault(match.group(1), {})[match.group(2)] = value
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{where}: {module} has lora_{'A' if 'A' in pair else 'B'} but not its partner")
    return modules


def place_state(model, state: dict[str, Tensor], where: str) -> list[Target]:
    """The targets an adapter state dict names, checked against the model: each module must be
    a reference linear layer of this model (or one of ours) and each tensor must fit it."""
    ref = reference_linears(model)
    ours = our_linears(model)
    _check_base_copies(model, state, ref, where)
    targets = []
    for module, pair in _split_keys(state, where).items():
        if module in ref:
            target = Target(module, *ref[module])
        elif module in ours:
            target = Target(module, module, 0, ours[module].out_features)
        else:
            raise ValueError(f"{where}: the adapter targets {module}, which {type(model).__name__} does not have "
                             f"(an adapter for another architecture or model size?)")
        layer = ours[target.ours]
        A, B = pair["A"], pair["B"]
        rows = target.end - target.start
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != layer.in_features or B.shape != (rows, A.shape[0]):
            raise ValueError(f"{where}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but the "
                             f"layer needs (r, {layer.in_features}) and ({rows}, r)")
        targets.append(target)
    return targets


def _check_base_copies(model, state: dict[str, Tensor], ref: dict, where: str) -> None:
    """peft saves a base weight beside its LoRA when the layer shares its weight with an
    embedding (in case the vocabulary was resized); it must be the model's own weight."""
    for key, value in state.items():
        if not key.endswith(".base_layer.weight"):
            continue
        module = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        module = module[: -len(".base_layer.weight")]
        ours = ref.get(module, (module,))[0]
        weight = model.get_submodule(ours).weight if ours in our_linears(model) else None
        if weight is None or weight.shape != value.shape or not torch.allclose(weight.float(), value.float()):
            raise ValueError(f"{where}: the adapter carries its own weights for {module} (a resized vocabulary?), "
                             "which differ from this model's; only LoRA weights can be loaded")


# ---------------------------------------------------------------- the transformers adapter API
class PeftAdapterMixin:
    """load_adapter / add_adapter / set_adapter / disable_adapters / enable_adapters /
    active_adapters / get_adapter_state_dict, as transformers' models have them, plus
    merge_and_unload and delete_adapter. `save_pretrained` of a model holding adapters writes
    the active adapter only (as transformers does)."""

    _hf_peft_config_loaded = False

    def _adapter_settings(self) -> dict[str, LoraSettings]:
        if "_adapters" not in self.__dict__:
            self.__dict__["_adapters"] = {}
            self.__dict__["_active_adapters"] = []
        return self.__dict__["_adapters"]

    def _require_adapters(self) -> None:
        if not self._adapter_settings():
            raise ValueError("No adapter loaded. Please load an adapter first.")

    def _check_new(self, adapter_name: str) -> None:
        if adapter_name in self._adapter_settings():
            raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
        if "." in adapter_name or not adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} must be non-empty and have no '.'")

    def _after_adding(self, adapter_name: str, settings: LoraSettings, pieces: list[LoraPiece], activate: bool) -> None:
        for p in self.parameters():  # only adapters train, as with peft
            p.requires_grad_(False)
        for piece in pieces:
            piece.requires_grad_(not settings.inference_mode)
        self._adapter_settings()[adapter_name] = settings
        self._sync_peft_config()
        active = self.__dict__["_active_adapters"]
        self._apply_active([adapter_name] if activate or not active else active)

    def _sync_peft_config(self) -> None:
        """`peft_config` (name -> config fields) exists only while adapters do, as in transformers;
        peft's own get_peft_model relies on its absence."""
        settings = self._adapter_settings()
        self._hf_peft_config_loaded = bool(settings)
        if settings:
            self.peft_config = {name: s.raw for name, s in settings.items()}
        elif "peft_config" in self.__dict__:
            del self.peft_config

    def _apply_active(self, names: list[str]) -> None:
        self.__dict__["_active_adapters"] = list(names)
        for layer in lora_layers(self).values():
            layer.active = list(names)

    def add_adapter(self, adapter_config, adapter_name: str | None = None) -> None:
        """Adds a new trainable LoRA (a peft LoraConfig or a dict of its fields) and makes it the
        active one; every other parameter stops requiring gradients."""
        adapter_name = adapter_name or "default"
        self._check_new(adapter_name)
        settings = LoraSettings.from_config(adapter_config)
        if settings.raw.get("layers_pattern") not in (None, [], ""):
            raise ValueError("LoRA option layers_pattern is not supported here")
        settings.inference_mode = False
        settings.raw["inference_mode"] = False
        pieces = add_pieces(self, adapter_name, resolve_targets(self, settings), settings)
        self._after_adding(adapter_name, settings, pieces, activate=True)

    def load_adapter(self, peft_model_id=None, adapter_name: str | None = None, revision: str | None = None,
                     token: str | None = None, peft_config=None, adapter_state_dict: dict | None = None,
                     adapter_kwargs: dict | None = None, is_trainable: bool = False, **kwargs) -> None:
        """Loads a LoRA saved by peft or transformers (for the reference's BLIP-2 or for ours):
        a folder or hub id, or `peft_config` + `adapter_state_dict`. The first adapter becomes
        active; later ones are loaded beside it (`set_adapter` switches)."""
        unknown = set(kwargs) - {"device_map", "max_memory", "offload_folder", "offload_index"}
        if unknown:
            raise TypeError(f"load_adapter got unexpected arguments: {sorted(unknown)}")
        adapter_name = adapter_name or "default"
        self._check_new(adapter_name)
        where = str(peft_model_id) if peft_model_id is not None else "adapter_state_dict"
        if peft_model_id is not None:
            hub = {"revision": revision, "token": token, **(adapter_kwargs or {})}
            config, state = read_adapter(peft_model_id, **{k: v for k, v in hub.items() if v is not None})
            peft_config = peft_config or config
        elif peft_config is None or adapter_state_dict is None:
            raise ValueError("pass peft_model_id, or both peft_config and adapter_state_dict")
        else:
            state = adapter_state_dict
        settings = LoraSettings.from_config(peft_config)
        settings.inference_mode = not is_trainable
        targets = place_state(self, state, where)
        modules = _split_keys(state, where)
        ranks = {t.name: modules[t.name]["A"].shape[0] for t in targets}
        pieces = add_pieces(self, adapter_name, targets, settings, ranks)
        with torch.no_grad():
            for t, piece in zip(targets, pieces):
                piece.lora_A.copy_(modules[t.name]["A"])
                piece.lora_B.copy_(modules[t.name]["B"])
        self._after_adding(adapter_name, settings, pieces, activate=False)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Makes `adapter_name` (or several) the active adapter(s)."""
        self._require_adapters()
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self._adapter_settings()]
        if missing:
            raise ValueError(f"Following adapter(s) could not be found: {', '.join(missing)}. current loaded "
                             f"adapters are: {list(self._adapter_settings())}")
        self._apply_active(names)

    def _enable(self, on: bool) -> None:
        self._require_adapters()
        for layer in lora_layers(self).values():
            layer.enabled = on

    def disable_adapters(self) -> None:
        """Runs the base model alone until `enable_adapters`."""
        self._enable(False)

    def enable_adapters(self) -> None:
        self._enable(True)

    def active_adapters(self) -> list[str]:
        self._require_adapters()
        return list(self.__dict__["_active_adapters"])

    def active_adapter(self) -> str:
        return self.active_adapters()[0]

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """The adapter's tensors under the reference's module names (no `base_model.model.` prefix)."""
        self._require_adapters()
        adapter_name = adapter_name or self.active_adapters()[0]
        if adapter_name not in self._adapter_settings():
            raise ValueError(f"no adapter named {adapter_name!r}; loaded: {list(self._adapter_settings())}")
        return adapter_state_dict(self, adapter_name)

    def save_adapter(self, directory: str | os.PathLike, adapter_name: str | None = None,
                     safe_serialization: bool = True) -> None:
        """Writes adapter_config.json and adapter_model.safetensors for the reference (transformers'
        `load_adapter`, peft's `PeftModel.from_pretrained`) and for ours."""
        adapter_name = adapter_name or self.active_adapters()[0]
        state = self.get_adapter_state_dict(adapter_name)
        config = saved_config(self, adapter_name, self._adapter_settings()[adapter_name], state)
        write_adapter(directory, config, state, safe_serialization)

    def _save_active_adapter(self, directory, safe_serialization: bool) -> None:
        active = self.active_adapters()
        if len(active) > 1:
            raise ValueError(f"{len(active)} adapters are active ({active}); saving several at once is not "
                             "supported: set_adapter one of them, or save_adapter(dir, name) each")
        self.save_adapter(directory, active[0], safe_serialization)

    def delete_adapter(self, adapter_name: str) -> None:
        self._require_adapters()
        if adapter_name not in self._adapter_settings():
            raise ValueError(f"no adapter named {adapter_name!r}; loaded: {list(self._adapter_settings())}")
        for layer in lora_layers(self).values():
            if adapter_name in layer.adapters:
                del layer.adapters[adapter_name]
        del self._adapter_settings()[adapter_name]
        self._sync_peft_config()
        self._apply_active([n for n in self.__dict__["_active_adapters"] if n != adapter_name])
        if not self._adapter_settings():
            self._unwrap(lambda layer: layer.base)

    def merge_and_unload(self) -> nn.Module:
        """Folds the active adapters into the weights and removes every adapter: a plain model
        again, as fast as before, with the adapted outputs. Returns the model."""
        self._require_adapters()
        if isinstance(self, InferenceLayout):
            self.plain_layout()  # merge into plain weights; the next inference packs the merged ones
        active = self.active_adapters() if any(l.enabled for l in lora_layers(self).values()) else []
        self._unwrap(lambda layer: layer.merged(active))
        self._adapter_settings().clear()
        self._sync_peft_config()
        self._apply_active([])
        return self

    def _unwrap(self, replacement) -> None:
        for name, layer in lora_layers(self).items():
            parent_name, _, attr = name.rpartition(".")
            setattr(self.get_submodule(parent_name) if parent_name else self, attr, replacement(layer))


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """model.state_dict() as if no adapter were there: LoRA weights left out, wrapped layers'
    tensors under their own names."""
    layers = lora_layers(model)
    state = {}
    for key, value in model.state_dict().items():
        owner = next((n for n in _prefixes(key) if n in layers), None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            if rest.startswith("adapters."):
                continue
            key = f"{owner}.{rest.removeprefix('base.')}"
        state[key] = value
    return state


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


__all__ = ["LoraSettings", "PeftAdapterMixin", "reference_linears", "adapter_state_dict", "base_state_dict", "read_adapter",
           "write_adapter"]
