"""Inference on CPU with weights prepacked in oneDNN's blocked layout.

`F.linear` on CPU repacks the weight on every call (MKL for float32, oneDNN for bfloat16).
That is cheap beside a large matrix product, but decoding multiplies a few rows at a time,
and there the repacking costs as much as the product: prepacked weights run the batch-8
decode projections about twice as fast and stream a bfloat16 weight at batch 1 close to
the memory bandwidth. `pack_linears(model)` swaps every `nn.Linear` for a `PackedLinear`
holding the packed weight instead of the plain one (no extra memory); `state_dict()` still
gives the plain weight, so saving works. Packed layers have no autograd: pack a model for
inference, after choosing its dtype and device, and `unpack_linears` before training it.
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


# Activations oneDNN can apply inside the product, saving a pass over the (largest) output.
FUSABLE = {F.gelu: ("gelu", "none"), F.relu: ("relu", "")}


def _identity(x: Tensor) -> Tensor:
    return x


class PackedLinear(nn.Module):
    """nn.Linear for inference on CPU with the weight in oneDNN's blocked layout.

    Holds `packed` (an opaque mkldnn tensor) rather than `weight`; `weight` reads it back.
    With `activation` (a key of FUSABLE) it returns activation(linear(x)).
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 8, activation=None) -> None:
        super().__init__()
        self.activation = activation
        self.post_op, self.algorithm = ("none", "") if activation is None else FUSABLE[activation]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"packing needs a float32 or bfloat16 weight on the CPU, got {weight.dtype} on {weight.device}")
        # The batch hint picks oneDNN's block layout; any number of rows still works.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> Tensor:
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.packed.dtype:
            raise TypeError(f"input is {x.dtype} but the packed weight is {self.packed.dtype}")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, self.post_op, [], self.algorithm)

    def unpacked(self) -> nn.Linear:
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        fused = "" if self.activation is None else f", then {self.post_op}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed{fused}"


def pack_linears(module: nn.Module, batch_hint: int = 8, skip: tuple[str, ...] = ()) -> int:
    """Replaces every float32 / bfloat16 CPU `nn.Linear` under `module` (names in `skip` and
    their children excepted) by a `PackedLinear`; returns how many were packed.

    In a feed-forward block (`fc1`, `act`, `fc2`) with a fusable `act`, the activation moves
    into fc1 (`act` becomes the identity until `unpack_linears`). Tied weights stay tied only
    in value: a tied output head gets its own packed copy.
    """
    if not packing_available():
        return 0
    count = 0
    for name, parent in _parents(module, skip):
        fuse = getattr(parent, "act", None) if type(getattr(parent, "fc1", None)) is nn.Linear else None
        fuse = fuse if fuse in FUSABLE else None
        for attr in [a for a, sub in parent.named_children() if type(sub) is nn.Linear]:
            linear = getattr(parent, attr)
            if linear.weight.device.type == "cpu" and linear.weight.dtype in (torch.float32, torch.bfloat16):
                # Replaced one at a time, so only one layer's weight exists twice at any moment.
                activation = fuse if attr == "fc1" else None
                setattr(parent, attr, PackedLinear(linear, batch_hint, activation))
                if activation is not None:
                    parent.act = _identity
                count += 1
            del linear
    return count


def _parents(module: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """The modules under `module` that have children, outside the names in `skip`."""
    return [(name, m) for name, m in module.named_modules()
            if next(m.children(), None) is not None and not any(name == s or name.startswith(s + ".") for s in skip)]


def unpack_linears(module: nn.Module) -> int:
    """Turns every `PackedLinear` under `module` back into an `nn.Linear`."""
    count = 0
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, PackedLinear):
                setattr(child, attr, sub.unpacked())
                if sub.activation is not None:
                    child.act = sub.activation
                count += 1
    return count


def optimize_for_inference(model: nn.Module, *, pack: bool = True, quantize: str | None = None,
                           compile: bool = False, batch_hint: int = 8) -> nn.Module:
    """Readies a model for inference on CPU, in place; returns it.

    Args:
        pack: prepack every linear layer's weight for oneDNN (see `pack_linears`).
        batch_hint: the rows a decoding step mostly has (batch x beams). It picks the packed
            layout; it matters for float32 only, where 1 suits single-sequence decoding best and
            8 (the default) anything from 5 rows up.
        quantize: "int8" makes the language model's linear layers int8 weight-only (`blip2.modeling.quant`).
        compile: runs the image encoder and the Q-Former through `torch.compile` instead of
            packing them (inductor cannot take packed weights). Each new batch size compiles
            first; on CPU it fuses the element-wise work but gains little over packing.
    """
    model.eval()
    if quantize is not None:
        from .quant import quantize_language_model

        if quantize != "int8":
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        quantize_language_model(model)
    compiled = [name for name in ("vision_model", "qformer") if compile and getattr(model, name, None) is not None]
    if pack:
        pack_linears(model, batch_hint, skip=tuple(compiled))
    for name in compiled:
        part = getattr(model, name)
        part.forward = torch.compile(part.forward)
    return model
