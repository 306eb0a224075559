"""What the processors return: a dict of model inputs that becomes torch or NumPy batches on request."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class BatchFeature(dict):
    """A dict of model inputs with attribute access and a `.to()` that casts only floating tensors."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def data(self) -> dict:
        return dict(self)

    def to(self, *args, device=None, dtype=None, non_blocking: bool = False) -> "BatchFeature":
        """`.to(device)`, `.to(dtype)` or `.to(device, dtype)`: every tensor moves, only float ones change dtype."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        for key, value in self.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point() and dtype is not None:
                self[key] = value.to(device=device, dtype=dtype, non_blocking=non_blocking)
            elif device is not None:
                self[key] = value.to(device=device, non_blocking=non_blocking)
        return self

    def convert_to_tensors(self, tensor_type: str | None) -> "BatchFeature":
        """Turns list values into "pt" (torch) or "np" (NumPy) batches; None leaves them alone."""
        if tensor_type is None:
            return self
        for key, value in self.items():
            self[key] = as_tensor(value, tensor_type, key)
        return self


class BatchEncoding(BatchFeature):
    """The tokenizer's output: input_ids, attention_mask, as lists, torch tensors or NumPy arrays."""


def as_tensor(value: Any, tensor_type: str, name: str):
    """A torch tensor or NumPy array from a (nested) list or array; ragged lists give a clear error."""
    if tensor_type not in ("pt", "np"):
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {tensor_type!r}")
    if isinstance(value, torch.Tensor):
        return value if tensor_type == "pt" else value.numpy()
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        value = _stack(value, name)
    else:
        value = _rectangular(value, name)
    return torch.from_numpy(value) if tensor_type == "pt" else value


def _stack(arrays: list[np.ndarray], name: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{name}: cannot stack arrays of different shapes {sorted(shapes)}; "
                         "resize the images to one size (do_resize=True)")
    return np.stack(arrays)


def _rectangular(value: Any, name: str) -> np.ndarray:
    """An array from nested lists; NumPy either refuses ragged ones or makes an object array of them."""
    try:
        array = np.asarray(value)
    except ValueError:
        raise ValueError(f"{name}: the sequences have different lengths; pass padding=True (or "
                         f"padding='max_length' with truncation=True) to make a rectangular batch") from None
    if array.dtype == object:
        raise ValueError(f"{name}: the sequences have different lengths; pass padding=True to batch them")
    return array
