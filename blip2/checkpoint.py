"""Reading and writing checkpoints in the transformers format, strictly, through the key table.

Formats: model.safetensors, model.safetensors.index.json (sharded), pytorch_model.bin and
its index. Tensors are read lazily (safetensors by positional reads, torch.load(mmap=True)) and placed
into a model built on the meta device, so no memory is spent on weights that would be
overwritten, and the model costs little more than its own size.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .hub import read_json
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
    """Key -> tensor over one or more files; a tensor is read when asked for.

    `shape(key)`, `dtype(key)` and `read_into(key, out)` let a loader check shapes before
    reading and fill its own (already converted) tensors without a second copy of the weights.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files  # key -> file holding it
        self._handles: dict[Path, object] = {}

    def __getitem__(self, key: str) -> Tensor:
        return self._read(key, lambda reader: reader[key])

    def shape(self, key: str) -> torch.Size:
        return self._read(key, lambda reader: reader.shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return self._read(key, lambda reader: reader.dtype(key))

    def read_into(self, key: str, out: Tensor, first: int | None = None) -> None:
        """Copies tensor `key` into `out` (same number of elements, any dtype, contiguous), or with
        `first` only its elements [first, first + out.numel())."""
        self._read(key, lambda reader: reader.read_into(key, out, first))

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def source(self, key: str) -> Path:
        return self.files[key]

    def _read(self, key: str, what):
        path = self.files[key]
        try:
            return what(self._handle(path))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"could not read tensor {key!r} from {path}: {err}") from None

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _open(path)
        return self._handles[path]


def _open(path: Path):
    """A reader for one file: `reader[key]`, `reader.shape(key)`, `reader.read_into(key, out)`."""
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    return _TensorDictReader(_torch_load(path))


class _TensorDictReader:
    """The reader interface over an already loaded (memory-mapped) dict of tensors."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def __getitem__(self, key: str) -> Tensor:
        return self.state[key]

    def shape(self, key: str) -> torch.Size:
        return self.state[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.state[key].dtype

    def read_into(self, key: str, out: Tensor, first: int | None = None) -> None:
        source = self.state[key]
        if first is not None:
            source = source.reshape(-1)[first : first + out.numel()]
        out.copy_(source.view(out.shape))


_SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_BOUNCE_BYTES = 8 << 20  # read, then converted, at a time: small enough to stay in the CPU's cache


class SafetensorsReader:
    """Reads safetensors tensors into tensors the caller owns, converting the dtype on the way.

    Each tensor is read with plain unbuffered reads: straight into its destination when the
    dtypes match, otherwise 8 MB at a time into one reused buffer (small enough to stay in the
    CPU's cache) and converted from there by torch's multi-threaded copy. The file is never
    mapped: a mapped checkpoint counts in the process's resident memory until it is unmapped,
    so the memory a load touches is the model's own plus 8 MB. One pass over the file, no
    second copy of the model.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None  # unbuffered: reads go straight into the caller's memory
        self._bounce: Tensor | None = None
        with open(path, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = f.read(size) if 0 < size <= 100 << 20 else b""
        try:
            entries = json.loads(header)
        except ValueError:
            entries = None
        if not isinstance(entries, dict):
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?)")
        entries.pop("__metadata__", None)
        self.start = 8 + size
        self.entries = entries  # key -> {"dtype", "shape", "data_offsets": [begin, end]}
        self.file_size = path.stat().st_size

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self.entries[key]["dtype"]
        if name not in _SAFE_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has dtype {name}, which is not supported")
        return _SAFE_DTYPES[name]

    def __getitem__(self, key: str) -> Tensor:
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self.read_into(key, out)
        return out

    def read_into(self, key: str, out: Tensor, first: int | None = None) -> None:
        """Reads the whole tensor into `out`, or with `first` its elements [first, first + out.numel())."""
        dtype, (begin, end) = self.dtype(key), self.entries[key]["data_offsets"]
        total = self.shape(key).numel()
        fits = out.numel() == total if first is None else 0 <= first <= total - out.numel()
        first = first or 0
        if not fits or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"cannot read {total} elements into a tensor of shape {tuple(out.shape)}")
        if end - begin != total * dtype.itemsize or self.start + end > self.file_size:
            raise CheckpointError(f"{self.path}: tensor {key!r} is truncated or its offsets are corrupt")
        numel = out.numel()
        if numel == 0:
            return
        offset = self.start + begin + first * dtype.itemsize
        if out.dtype == dtype:
            self._pread(_bytes_of(out), offset, key)
            return
        if self._bounce is None:
            self._bounce = torch.empty(_BOUNCE_BYTES, dtype=torch.uint8)
        flat, size = out.view(-1), dtype.itemsize
        step = _BOUNCE_BYTES // size
        for i in range(0, numel, step):
            n = min(step, numel - i)
            self._pread(_bytes_of(self._bounce)[: n * size], offset + i * size, key)
            flat[i : i + n].copy_(self._bounce[: n * size].view(dtype))

    def _pread(self, into: memoryview, offset: int, key: str) -> None:
        """Fills `into` with the file's bytes from `offset` (a read may return less than asked)."""
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open until close()
        self._file.seek(offset)
        done = 0
        while done < len(into):
            got = self._file.readinto(into[done:])
            if not got:
                raise CheckpointError(f"{self.path}: tensor {key!r} is truncated (the file ended early)")
            done += got

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._bounce = None

    def __del__(self) -> None:
        self.close()


def _bytes_of(tensor: Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype, bfloat16 included)."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _torch_load(path: Path) -> dict:
    return safe_torch_load(path, mmap=True)


def safe_torch_load(path: Path, what: str = "PyTorch checkpoint", **kwargs):
    """torch.load with weights_only=True; a damaged or foreign file is a CheckpointError naming it.

    torch's own message would suggest weights_only=False, which runs whatever code the file
    holds: never advice to pass on about a file that failed to load.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as err:  # noqa: BLE001 - zip, pickle and storage errors all mean "damaged"
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        if "weights_only" in text or "Weights only" in text:
            reason = "it holds Python objects other than tensors and plain data, which are not loaded"
        size = Path(path).stat().st_size if Path(path).exists() else 0
        raise CheckpointError(f"{path} ({size} bytes) is not a readable {what} (truncated or corrupt?): "
                              f"{reason}") from None


def _keys_of(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        return SafetensorsReader(path).keys()
    return list(_torch_load(path).keys())


def find_weights(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in the reference's order of preference:
    model.safetensors, its shard index, pytorch_model.bin, its shard index."""
    for name in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX):
        path = directory / name
        if not path.is_file():
            continue
        if name in (SAFE_WEIGHTS, BIN_WEIGHTS):
            return [path]
        try:
            weight_map = read_json(path)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path} is not a valid shard index: {err!r}") from None
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise CheckpointError(f"{path} names shard(s) that are missing: {', '.join(missing)}")
        return [directory / s for s in shards]
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
               where: str = "checkpoint", dtype_for=None, floating: Collection[str] = (),
               sinks: Mapping[str, object] | None = None) -> dict[str, Tensor]:
    """Renames and fuses checkpoint tensors into our names; raises on any mismatch.

    `expected` maps our names to shapes; `dtype_for(name)` gives the dtype to load each into;
    `floating` names the tensors that must be stored as floating point (weights, not counters).
    `sinks` maps some of our names to a consumer of row blocks (`fill_rows(start, rows)`, taking
    `block_rows` at a time: a layer quantizing the weight as it is read); those tensors are
    handed over block by block, never whole, and come back as meta tensors of their shape.
    """
    sinks = sinks or {}
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
    lazy = isinstance(hf, LazyStateDict)
    out: dict[str, Tensor] = {}
    # The streamed tensors come last: their short-lived blocks then sit above every tensor the
    # model keeps, where the allocator can give them back, instead of in holes between them.
    for rule in sorted(table.rules, key=lambda rule: rule.ours in sinks):
        shape = expected.get(rule.ours)
        if shape is None:
            raise CheckpointError(f"key table names {rule.ours!r}, which the model does not have")
        if rule.ours in floating:
            _check_floating(hf, rule, where)
        if rule.ours in sinks:
            out[rule.ours] = _stream_rows(hf if lazy else _TensorDictReader(hf), rule, shape, where, dtype_for,
                                          sinks[rule.ours])
            continue
        if lazy:
            out[rule.ours] = _read_fused(hf, rule, shape, where, dtype_for)
            continue
        parts = [hf[k] for k in rule.hf]
        _check_shape([p.shape for p in parts], rule, shape, where)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if dtype_for is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype_for(rule.ours))
        out[rule.ours] = tensor
    return out


def _check_floating(hf: Mapping[str, Tensor], rule, where: str) -> None:
    """Integer or bool tensors where the model has weights: a damaged or foreign file, never a cast."""
    for key in rule.hf:
        dtype = hf.dtype(key) if isinstance(hf, LazyStateDict) else hf[key].dtype
        if not dtype.is_floating_point:
            source = hf.source(key) if isinstance(hf, LazyStateDict) else where
            raise CheckpointError(f"{source}: tensor {key!r} is stored as {str(dtype).removeprefix('torch.')}, "
                                  f"but the model's {rule.ours} is a floating-point weight")


def _check_shape(shapes: list[torch.Size], rule, shape: torch.Size, where: str) -> None:
    """The parts of a rule, concatenated along dim 0, must make `shape`."""
    if len(shapes) == 1:
        fused = shapes[0]
    elif all(len(s) > 0 and s[1:] == shapes[0][1:] for s in shapes):
        fused = torch.Size([sum(s[0] for s in shapes), *shapes[0][1:]])
    else:
        fused = None  # parts that cannot be concatenated
    if getattr(rule, "sizes", None) and [s[0] if len(s) else None for s in shapes] != list(rule.sizes):
        fused = None  # the right total split the wrong way
    if fused != shape:
        sizes = ", ".join(f"{k} {tuple(s)}" for k, s in zip(rule.hf, shapes))
        raise CheckpointError(
            f"{where}: shape mismatch for {sizes}; the model expects {tuple(shape)} "
            f"(as {rule.ours}) from its config"
        )


def _read_fused(hf: LazyStateDict, rule, shape: torch.Size, where: str, dtype_for) -> Tensor:
    """Reads a rule's parts from the files straight into one tensor of the wanted dtype.

    Each source tensor passes through the reader once, so converting float16 -> bfloat16 or
    float32 costs no second copy of the model; fused parts go to their rows, with no torch.cat.
    """
    _check_shape([hf.shape(k) for k in rule.hf], rule, shape, where)
    dtype = hf.dtype(rule.hf[0])
    if dtype_for is not None and dtype.is_floating_point:
        dtype = dtype_for(rule.ours) or dtype
    tensor = torch.empty(shape, dtype=dtype)
    if len(rule.hf) == 1:
        hf.read_into(rule.hf[0], tensor)
        return tensor
    row = 0
    for key in rule.hf:
        rows = hf.shape(key)[0]
        hf.read_into(key, tensor[row : row + rows])
        row += rows
    return tensor


def _stream_rows(hf, rule, shape: torch.Size, where: str, dtype_for, sink) -> Tensor:
    """Reads a rule's (fused) tensor a block of rows at a time, in the dtype it would load in,
    into `sink.fill_rows`; holds one block, never the whole tensor. Returns a meta placeholder."""
    _check_shape([hf.shape(k) for k in rule.hf], rule, shape, where)
    dtype = hf.dtype(rule.hf[0])
    if dtype_for is not None and dtype.is_floating_point:
        dtype = dtype_for(rule.ours) or dtype
    step = sink.block_rows
    buffer = torch.empty(min(step, shape[0]), *shape[1:], dtype=dtype)
    parts = [(key, hf.shape(key)[0]) for key in rule.hf]
    for start in range(0, shape[0], step):
        block = buffer[: min(step, shape[0] - start)]
        _read_rows(hf, parts, start, block)
        sink.fill_rows(start, block)
    return torch.empty(shape, dtype=dtype, device="meta")


def _read_rows(hf, parts: list[tuple[str, int]], start: int, out: Tensor) -> None:
    """Rows [start, start + len(out)) of the parts (key, rows) concatenated along dim 0, into `out`."""
    width = out[0].numel() if len(out) else 0
    first = 0  # the current part's first row in the concatenation
    done = 0  # rows of `out` filled
    for key, rows in parts:
        lo, hi = start + done, min(start + len(out), first + rows)
        if lo < hi:
            hf.read_into(key, out[done : done + hi - lo], (lo - first) * width)
            done += hi - lo
        first += rows


def ours_to_hf(state: Mapping[str, Tensor], table: KeyTable) -> dict[str, Tensor]:
    """Splits fused tensors back into the checkpoint's names (contiguous, ready to save)."""
    out: dict[str, Tensor] = {}
    for rule in table.rules:
        tensor = state[rule.ours]
        if len(rule.hf) == 1:
            out[rule.hf[0]] = tensor.contiguous()
            continue
        parts = tensor.split(list(rule.sizes), dim=0) if rule.sizes else tensor.chunk(len(rule.hf), dim=0)
        for key, part in zip(rule.hf, parts):
            out[key] = part.contiguous()
    return out


def _short(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


# ---------------------------------------------------------------- whole models
# In-place ops that change values only. On a meta tensor there are no values, so they can be skipped.
# Skipping them matters: torch has no C++ meta kernel for some (normal_, erfinv_), and the first one
# imports its Python decompositions, about 1 s of every fresh process that loads a model.
# `torch.nn.init`'s functions reach a torch function mode as themselves, before any tensor op.
_VALUE_ONLY_INPLACE = frozenset(
    [getattr(torch.Tensor, name) for name in (
        "normal_", "uniform_", "erfinv_", "fill_", "zero_", "clamp_", "mul_", "add_", "sub_", "div_",
        "exponential_", "bernoulli_", "random_", "log_normal_", "cauchy_", "geometric_",
    )]
    + [getattr(nn.init, name) for name in (
        "normal_", "uniform_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
        "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_",
    ) if hasattr(nn.init, name)]
)


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Initialisers on meta tensors do nothing. A torch function mode is per thread and ends with the
    `with` block, so other threads and later code see torch unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VALUE_ONLY_INPLACE:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes `tensor=` by name
            if isinstance(target, Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def build_on_meta(model_factory) -> nn.Module:
    """The model `model_factory()` builds, on the meta device: no memory, no values drawn."""
    with torch.device("meta"), _SkipMetaInit():
        return model_factory()


def load_into(model_factory, directory: Path | None, table: KeyTable, dtype: torch.dtype | None,
              keep_fp32: tuple[str, ...] = (), state: Mapping[str, Tensor] | None = None,
              sinks: Mapping[str, object] | None = None) -> nn.Module:
    """Builds the model on the meta device and fills it from the checkpoint in `directory`
    (or from `state`, tensors under the checkpoint's names, when given).

    `model_factory` may also return a model already built on the meta device. The tensors
    named in `sinks` go to them a block of rows at a time (see `hf_to_ours`) and stay on
    meta in the model: the caller replaces their modules (`blip2.modeling.quant.QuantizedLoad`).
    """
    model = build_on_meta(model_factory)
    own = model.state_dict(keep_vars=True)
    expected = {k: v.shape for k, v in own.items()}
    floating = {k for k, v in own.items() if v.is_floating_point()}
    if state is not None:
        hf, where = _check_state(state), "state_dict"
    else:
        files = find_weights(directory)
        hf = read_state_dict(files)
        where = str(files[0] if len(files) == 1 else directory)

    def dtype_for(name: str) -> torch.dtype | None:
        if dtype is None:
            return None
        if dtype == torch.float16 and any(part in name.split(".") for part in keep_fp32):
            return torch.float32  # these layers overflow in float16
        return dtype

    ours = hf_to_ours(hf, table, expected, where, dtype_for, floating, sinks)
    _fill_tied(model, ours, where)
    model.load_state_dict(ours, strict=True, assign=True)
    for module in model.modules():
        if hasattr(module, "tie_weights"):
            module.tie_weights()
    if dtype is not None:
        _cast_rest(model, dtype)
    return model


def _check_state(state) -> Mapping[str, Tensor]:
    if not isinstance(state, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"state_dict: {_short(sorted(bad))} are not tensors")
    return state


def stored_float_dtype(directory: Path | None, state: Mapping[str, Tensor] | None = None) -> torch.dtype | None:
    """The dtype of the first floating tensor of a checkpoint (what torch_dtype='auto' falls back to)."""
    hf = state if state is not None else read_state_dict(find_weights(directory))
    for key in hf:
        dtype = hf.dtype(key) if isinstance(hf, LazyStateDict) else hf[key].dtype
        if dtype.is_floating_point:
            return dtype
    return None


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
    """Writes `state` (checkpoint names) as one file or shards plus an index, each file atomically.

    Weight files of an earlier checkpoint in `directory` (either format, single or sharded)
    are removed once the new one is complete, so that loading cannot pick up a stale one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    base = SAFE_WEIGHTS if safe_serialization else BIN_WEIGHTS
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
        _write_file(shards[0], directory / base, safe_serialization)
        _remove_stale_weights(directory, keep={base})
        return
    stem, ext = base.rsplit(".", 1)
    weight_map, total, names = {}, 0, set()
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        _write_file(shard, directory / name, safe_serialization)
        names.add(name)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_name = SAFE_INDEX if safe_serialization else BIN_INDEX
    atomic_write_text(directory / index_name, json.dumps(index, indent=2) + "\n")
    _remove_stale_weights(directory, keep=names | {index_name})


_SHARD_NAME = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")


def _remove_stale_weights(directory: Path, keep: set[str]) -> None:
    for path in directory.iterdir():
        name = path.name
        known = name in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX) or _SHARD_NAME.fullmatch(name)
        if known and name not in keep and path.is_file():
            path.unlink()


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
