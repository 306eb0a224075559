"""Linear layers with weights prepacked in oneDNN's blocked layout, for inference on CPU.

`F.linear` on CPU repacks the weight on every call (MKL for float32, oneDNN for bfloat16).
That is cheap beside a large matrix product, but decoding multiplies a few rows at a time,
and there the repacking costs as much as the product: prepacked weights run the batch-8
decode projections about twice as fast and stream a bfloat16 weight at batch 1 close to
the memory bandwidth. `pack_linears(model)` swaps every `nn.Linear` for a `PackedLinear`
holding the packed weight in place of the plain one (no extra memory); `state_dict()` still
gives the plain weight. Packed layers have no autograd: `unpack_linears` gives every layer
back as an `nn.Linear` holding the very same `Parameter` objects (an optimizer built before
packing keeps working). Models do both on their own (`blip2.modeling.inference`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def packing_available() -> bool:
    """oneDNN (mkldnn) with the prepacked linear ops: x86 and Arm CPU builds of PyTorch."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


# Smaller weights stay plain: the packed op costs ~15 us more per call, which only a product of
# about 256 x 1024 weights or more wins back (measured on this project's 2-core AVX-512 machine).
PACK_MIN_WEIGHTS = 1 << 18

# Activations oneDNN can apply inside the product, saving a pass over the (largest) output.
FUSABLE = {F.gelu: ("gelu", "none"), F.relu: ("relu", "")}


def _identity(x: Tensor) -> Tensor:
    return x


def _packable(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and not weight.is_mkldnn


def _pack(weight: Tensor, batch_hint: int) -> Tensor:
    # The batch hint picks oneDNN's block layout; any number of rows still works.
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even when packed inside inference_mode
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)


class PackedLinear(nn.Module):
    """nn.Linear for inference on CPU with the weight in oneDNN's blocked layout.

    Holds `packed` (an opaque mkldnn tensor) rather than `weight`; `weight` reads it back. The
    original weight `Parameter` is kept aside, emptied unless another module shares it (a tied
    output head), and refilled by `unpacked()`. With `activation` (a key of FUSABLE) it returns
    activation(linear(x)). After `.to()` onto another device or dtype the weight is held plain.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 8, activation=None, release: bool = True) -> None:
        super().__init__()
        self.activation = activation
        self.post_op, self.algorithm = ("none", "") if activation is None else FUSABLE[activation]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.batch_hint = batch_hint
        weight = linear.weight
        if not _packable(weight):
            raise ValueError(f"packing needs a float32 or bfloat16 weight on the CPU, got {weight.dtype} on {weight.device}")
        self.packed = _pack(weight, batch_hint)
        self._aside = [weight]  # a list: hidden from parameters() and state_dict()
        self.released = release
        if release:
            with torch.inference_mode(False):
                weight.data = weight.data.new_empty(0)  # frees the plain copy: the packed one replaces it
        self.bias = linear.bias  # the same Parameter (or None)

    @property
    def weight(self) -> Tensor:
        return self.packed.to_dense() if self.packed.is_mkldnn else self.packed

    def forward(self, x: Tensor) -> Tensor:
        if not self.packed.is_mkldnn:
            y = F.linear(x, self.packed, self.bias)
            return y if self.activation is None else self.activation(y)
        if x.dtype != self.packed.dtype:
            raise TypeError(f"input is {x.dtype} but the packed weight is {self.packed.dtype}")
        if not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, self.post_op, [],
                                                      self.algorithm)
        if x.requires_grad:
            raise RuntimeError("a packed linear layer has no autograd: unpack it first (unpack_linears, or "
                               "model.train() for a model that packs itself)")
        with torch.no_grad():  # the bias Parameter may require grad; the packed op has no backward
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, self.post_op, [],
                                                      self.algorithm)

    def unpacked(self) -> nn.Linear:
        """The nn.Linear again, holding the original weight Parameter (refilled if it was emptied)."""
        weight = self._aside[0]
        with torch.inference_mode(False), torch.no_grad():
            if self.released or weight.dtype != self.packed.dtype or weight.device != self.packed.device:
                weight.data = self.weight
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = weight
        linear.bias = self.bias
        return linear

    def _apply(self, fn, recurse: bool = True):
        # .to() / .half() / .cuda() on a part: convert the weight and repack it where it still can be.
        dense = fn(self.weight)
        self.packed = _pack(dense, self.batch_hint) if _packable(dense) else dense
        self.released = True  # the aside Parameter no longer matches: refill it on unpacking
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                                  f"the shape in current model is {(self.out_features, self.in_features)}")
            else:
                dense = weight.detach().to(self.packed.device, self.packed.dtype)
                self.packed = _pack(dense, self.batch_hint) if self.packed.is_mkldnn else dense.clone()
                self.released = True
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __getstate__(self):
        # Opaque mkldnn tensors cannot be copied or pickled: deepcopy and torch.save go through the plain weight.
        state = self.__dict__.copy()
        state["packed"] = self.weight
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if _packable(self.packed):
            self.packed = _pack(self.packed, self.batch_hint)

    def extra_repr(self) -> str:
        fused = "" if self.activation is None else f", then {self.post_op}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed{fused}"


def linear_parents(module: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """The modules under `module` that have children, outside the names in `skip` (and below them)."""
    return [(name, m) for name, m in module.named_modules()
            if next(m.children(), None) is not None and not any(name == s or name.startswith(s + ".") for s in skip)]


def _shared_parameters(module: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, p in module.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    return shared


def pack_linears(module: nn.Module, batch_hint: int = 8, skip: tuple[str, ...] = (), min_weights: int | None = None) -> int:
    """Replaces every float32 / bfloat16 CPU `nn.Linear` under `module` with at least `min_weights`
    weights (default PACK_MIN_WEIGHTS; names in `skip` and their children excepted) by a
    `PackedLinear`; returns how many were packed.

    In a feed-forward block (`fc1`, `act`, `fc2`) with a fusable `act`, the activation moves
    into fc1 (`act` becomes the identity until `unpack_linears`). A weight shared with another
    module (a tied output head) keeps its plain copy and gets a packed one besides.
    """
    if not packing_available():
        return 0
    shared = _shared_parameters(module)
    min_weights = max(1, PACK_MIN_WEIGHTS if min_weights is None else min_weights)
    count = 0
    for _, parent in linear_parents(module, skip):
        fuse = getattr(parent, "act", None) if type(getattr(parent, "fc1", None)) is nn.Linear else None
        fuse = fuse if fuse in FUSABLE else None
        for attr in [a for a, sub in parent.named_children() if type(sub) is nn.Linear]:
            linear = getattr(parent, attr)
            if _packable(linear.weight) and linear.weight.numel() >= min_weights:
                # Replaced one at a time, so only one layer's weight exists twice at any moment.
                activation = fuse if attr == "fc1" else None
                setattr(parent, attr, PackedLinear(linear, batch_hint, activation, release=id(linear.weight) not in shared))
                if activation is not None:
                    parent.act = _identity
                count += 1
            del linear
    return count


def unpack_linears(module: nn.Module) -> int:
    """Turns every `PackedLinear` under `module` back into an `nn.Linear` (same Parameters)."""
    # Only the parents are listed: a list of every module would keep each packed weight alive until the
    # end, so the model would exist twice (packed and plain) at the peak.
    parents = [m for m in module.modules() if any(isinstance(c, PackedLinear) for c in m.children())]
    count = 0
    for parent in parents:
        for attr in [a for a, sub in parent.named_children() if isinstance(sub, PackedLinear)]:
            sub = getattr(parent, attr)
            setattr(parent, attr, sub.unpacked())
            if sub.activation is not None:
                parent.act = sub.activation
            del sub  # its packed weight goes now, before the next layer's plain one is refilled
            count += 1
    return count


__all__ = ["PackedLinear", "pack_linears", "unpack_linears", "packing_available", "linear_parents"]
