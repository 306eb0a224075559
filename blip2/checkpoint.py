"""Reading and writing checkpoints in the transformers format, strictly, through the key table.

Formats: model.safetensors, model.safetensors.index.json (sharded), pytorch_model.bin and
its index. Tensors are read lazily (safetensors mmap, torch.load(mmap=True)) and placed
into a model built on the meta device, so no memory is spent on weights that would be
overwritten, and the model costs little more than its own size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .io import atomic_path, atomic_write_text
from .keymap import KeyTable

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the keys, shapes and file."""


# ---------------------------------------------------------------- reading files
class LazyStateDict(Mapping):
    """Key -> tensor over one or more files; a tensor is read when asked for."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files  # key -> file holding it
        self._handles: dict[Path, object] = {}

    def __getitem__(self, key: str) -> Tensor:
        path = self.files[key]
        try:
            return self._handle(path)(key)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"could not read tensor {key!r} from {path}: {err}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def source(self, key: str) -> Path:
        return self.files[key]

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _open(path)
        return self._handles[path]


def _open(path: Path):
    """Returns a `key -> tensor` reader for one file."""
    if path.suffix == ".safetensors":
        return _safe_open(path).get_tensor
    state = _torch_load(path)
    return state.__getitem__


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from None


def _keys_of(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        return list(_safe_open(path).keys())
    return list(_torch_load(path).keys())


def find_weights(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, preferring safetensors."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index} is not a valid shard index: {err}") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
            return [directory / s for s in shards]
    for name in (SAFE_WEIGHTS, BIN_WEIGHTS):
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}"
    )


def read_state_dict(files: list[Path]) -> LazyStateDict:
    owners: dict[str, Path] = {}
    for path in files:
        for key in _keys_of(path):
            owners[key] = path
    return LazyStateDict(owners)


# ---------------------------------------------------------------- the key table
def hf_to_ours(hf: Mapping[str, Tensor], table: KeyTable, expected: Mapping[str, torch.Size],
               where: str = "checkpoint", dtype_for=None) -> dict[str, Tensor]:
    """Renames and fuses checkpoint tensors into our names; raises on any mismatch.

    `expected` maps our names to shapes; `dtype_for(name)` gives the dtype to load each into.
    """
    wanted = {k for rule in table.rules for k in rule.hf}
    missing = sorted(wanted - set(hf))
    unexpected = sorted(set(hf) - wanted - set(table.tied))
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if problems:
        raise CheckpointError(f"{where} does not match the model config: " + "; ".join(problems))
    out: dict[str, Tensor] = {}
    for rule in table.rules:
        parts = [hf[k] for k in rule.hf]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        shape = expected.get(rule.ours)
        if shape is None:
            raise CheckpointError(f"key table names {rule.ours!r}, which the model does not have")
        if tensor.shape != shape:
            sizes = ", ".join(f"{k} {tuple(hf[k].shape)}" for k in rule.hf)
            raise CheckpointError(
                f"{where}: shape mismatch for {sizes}; the model expects {tuple(shape)} "
                f"(as {rule.ours}) from its config"
            )
        if dtype_for is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype_for(rule.ours))
        out[rule.ours] = tensor
    return out


def ours_to_hf(state: Mapping[str, Tensor], table: KeyTable) -> dict[str, Tensor]:
    """Splits fused tensors back into the checkpoint's names (contiguous, ready to save)."""
    out: dict[str, Tensor] = {}
    for rule in table.rules:
        tensor = state[rule.ours]
        if len(rule.hf) == 1:
            out[rule.hf[0]] = tensor.contiguous()
            continue
        for key, part in zip(rule.hf, tensor.chunk(len(rule.hf), dim=0)):
            out[key] = part.contiguous()
    return out


def _short(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


# ---------------------------------------------------------------- whole models
def load_into(model_factory, directory: Path, table: KeyTable, dtype: torch.dtype | None,
              keep_fp32: tuple[str, ...] = ()) -> nn.Module:
    """Builds the model on the meta device and fills it from the checkpoint in `directory`."""
    with torch.device("meta"):
        model = model_factory()
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    files = find_weights(directory)
    hf = read_state_dict(files)
    where = str(files[0] if len(files) == 1 else directory)

    def dtype_for(name: str) -> torch.dtype | None:
        if dtype is None:
            return None
        if dtype == torch.float16 and any(part in name.split(".") for part in keep_fp32):
            return torch.float32  # these layers overflow in float16
        return dtype

    ours = hf_to_ours(hf, table, expected, where, dtype_for)
    _fill_tied(model, ours, where)
    model.load_state_dict(ours, strict=True, assign=True)
    for module in model.modules():
        if hasattr(module, "tie_weights"):
            module.tie_weights()
    if dtype is not None:
        _cast_rest(model, dtype)
    return model


def _fill_tied(model: nn.Module, ours: dict[str, Tensor], where: str) -> None:
    """Tied parameters have several names; each gets the tensor loaded for any of them."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        loaded = [n for n in names if n in ours]
        if not loaded:
            raise CheckpointError(f"{where}: nothing in the checkpoint fills {names[0]}")
        for name in names:
            ours.setdefault(name, ours[loaded[0]])


def _cast_rest(model: nn.Module, dtype: torch.dtype) -> None:
    """Buffers (none are saved) follow the requested dtype."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)


def save_state(state: dict[str, Tensor], directory: Path, safe_serialization: bool = True,
               max_shard_bytes: int | None = None) -> None:
    """Writes `state` (checkpoint names) as one file or shards plus an index, atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    base = SAFE_WEIGHTS if safe_serialization else BIN_WEIGHTS
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
        _write_file(shards[0], directory / base, safe_serialization)
        return
    stem, ext = base.rsplit(".", 1)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        _write_file(shard, directory / name, safe_serialization)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(directory / (SAFE_INDEX if safe_serialization else BIN_INDEX), json.dumps(index, indent=2) + "\n")


def _shard(state: dict[str, Tensor], max_bytes: int | None) -> list[dict[str, Tensor]]:
    if not max_bytes:
        return [state]
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    return shards


def _write_file(state: dict[str, Tensor], path: Path, safe: bool) -> None:
    with atomic_path(path) as tmp:
        if safe:
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, tmp)


def parse_size(size: int | str | None) -> int | None:
    """'5GB' / '200MB' / '50KB' / int bytes -> bytes."""
    if size is None or isinstance(size, int):
        return size
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "B": 1}
    text = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    raise ValueError(f"cannot read shard size {size!r}; use e.g. '5GB' or a byte count")


__all__ = [
    "CheckpointError", "find_weights", "read_state_dict", "hf_to_ours", "ours_to_hf",
    "load_into", "save_state", "parse_size",
]
