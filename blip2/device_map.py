"""Device maps through accelerate: `from_pretrained(device_map=..., max_memory=..., offload_folder=...)`.

The reference's meaning: "auto" / "balanced" / "balanced_low_0" / "sequential" let accelerate
place whole modules on the GPUs, then the CPU, then disk, within `max_memory`, never splitting
a module whose class is in `_no_split_modules`; a dict names modules and their devices; a
single device puts everything there. Modules on "cpu" or "disk" (beside a GPU) are loaded onto
the GPU for their forward by accelerate's hooks. `model.hf_device_map` reports the placement
by the reference's module names (`language_model.model.decoder.layers.3`), as the reference's
users read it. A dict may name our modules or the reference's; the latter are translated
through the key table, so `hf_device_map` can be passed back as a `device_map`.

accelerate is imported only here, only when a device map is asked for (`pip install -e ".[accelerate]"`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _accelerate():
    try:
        import accelerate
    except ImportError:
        raise ImportError('device_map needs accelerate: pip install -e ".[accelerate]"') from None
    return accelerate


def _device(value):
    """0 -> 0, "cuda:1" -> 1, "cpu" / "disk" / "meta" as they are (accelerate's spelling)."""
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, str) and value.startswith("cuda"):
        return int(value.split(":")[1]) if ":" in value else 0
    if isinstance(value, int) or value in ("cpu", "disk", "meta", "mps"):
        return value
    raise ValueError(f"device_map: {value!r} is not a device (an int GPU index, 'cuda:N', 'cpu' or 'disk')")


def our_module_name(model: nn.Module, name: str) -> str:
    """`name` if it is one of our modules or parameters, else the module of ours that holds exactly the
    tensors of the reference's module `name`; a clear error when it is neither."""
    if name == "" or name in dict(model.named_modules()) or name in dict(model.named_parameters()):
        return name
    table = model.key_table()
    ours = {r.ours for r in table.rules if any(h.startswith(name + ".") or h == name for h in r.hf)}
    ours = sorted(ours | {src for copy, src in table.tied.items() if copy.startswith(name + ".") or copy == name})
    if ours:
        parts = [o.split(".") for o in ours]
        common = os.path.commonprefix(parts)
        candidate = ".".join(common)
        modules = dict(model.named_modules())
        # The reference module maps onto ours only if ours holds nothing else.
        if candidate in modules or candidate in dict(model.named_parameters()):
            inside = [k for k, _ in model.named_parameters() if k == candidate or k.startswith(candidate + ".")]
            if set(inside) <= set(ours):
                return candidate
        raise ValueError(f"device_map: the reference's module {name!r} is part of ours {candidate!r} together with "
                         f"other tensors; name {candidate!r} (or a larger module) instead")
    raise ValueError(f"device_map names {name!r}, which is not a module of {type(model).__name__} "
                     f"(top-level modules: {[n for n, _ in model.named_children()]})")


def _device_of(name: str, placement: dict):
    """The device of our tensor `name`: that of the longest placement key holding it."""
    return placement[max((k for k in placement if k == "" or name == k or name.startswith(k + ".")), key=len)]


def reference_device_map(model: nn.Module, placement: dict) -> dict:
    """Our placement by the reference's names: each tensor of the reference's checkpoint gets
    the device of our tensor it comes from (a tied copy, that of its source), and every
    reference module whose tensors all share one device is reported as one entry."""
    table = model.key_table()
    devices = {h: _device_of(r.ours, placement) for r in table.rules for h in r.hf}
    devices.update({copy: _device_of(source, placement) for copy, source in table.tied.items()})

    def collapse(prefix: str, keys: list[str], out: dict) -> None:
        if len({str(devices[k]) for k in keys}) == 1:
            out[prefix] = devices[keys[0]]
            return
        depth = len(prefix.split(".")) if prefix else 0
        children: dict[str, list[str]] = {}
        for k in keys:
            children.setdefault(".".join(k.split(".")[: depth + 1]), []).append(k)
        for child in children:  # in checkpoint-table order, as the keys came
            collapse(child, children[child], out)

    out: dict = {}
    collapse("", list(devices), out)
    return out


def _translate(model: nn.Module, device_map: dict) -> dict:
    translated = {our_module_name(model, k): _device(v) for k, v in device_map.items()}
    params = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    uncovered = [p for p in params if not any(p == k or p.startswith(k + ".") or k == "" for k in translated)]
    if uncovered:
        raise ValueError(f"device_map leaves {len(uncovered)} tensors without a device, e.g. {uncovered[:3]}; "
                         "name their modules (or use '' for everything else)")
    return translated


def _no_split(model: nn.Module) -> list[str]:
    return list(getattr(model, "_no_split_modules", ()))


def infer_device_map(model: nn.Module, device_map, max_memory: dict | None = None,
                     dtype: torch.dtype | None = None) -> dict:
    """The placement `device_map` asks for (a strategy name, a dict, or one device), without moving anything."""
    if isinstance(device_map, dict):
        return _translate(model, device_map)
    if isinstance(device_map, str) and device_map in STRATEGIES:
        acc = _accelerate()
        from accelerate.utils import get_balanced_memory, get_max_memory

        no_split = _no_split(model)
        if max_memory is not None:
            max_memory = {_device(k): v for k, v in max_memory.items()}
        if device_map == "sequential":
            budget = get_max_memory(max_memory)
        else:  # accelerate's balancing cannot read a "disk" entry; placement always falls back to disk
            disk = {"disk": max_memory.pop("disk")} if max_memory and "disk" in max_memory else {}
            budget = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=device_map == "balanced_low_0")
            budget.update(disk)
        return dict(acc.infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype))
    if isinstance(device_map, (int, str, torch.device)):
        return {"": _device(device_map)}
    raise ValueError(f"device_map must be {list(STRATEGIES)}, a dict of module -> device, or a device; "
                     f"got {device_map!r}")


def dispatch(model: nn.Module, device_map, max_memory: dict | None = None, offload_folder=None,
             dtype: torch.dtype | None = None) -> nn.Module:
    """Places `model` (loaded on the CPU) as `device_map` says and records `model.hf_device_map`."""
    placement = infer_device_map(model, device_map, max_memory, dtype)
    if "disk" in placement.values() and offload_folder is None:
        where = [k for k, v in placement.items() if v == "disk"]
        budget = f"max_memory {max_memory} cannot hold the whole model: " if max_memory else ""
        raise ValueError(f"{budget}device_map puts {where[:3]}{'...' if len(where) > 3 else ''} on disk; pass "
                         "offload_folder=DIR for them, or give more memory")
    acc = _accelerate()
    if not set(placement.values()) <= {"cpu"}:  # on the CPU already: no hooks needed
        acc.dispatch_model(model, device_map=placement, offload_dir=offload_folder)
    model.hf_device_map = reference_device_map(model, placement)  # after accelerate, which sets its own
    return model
