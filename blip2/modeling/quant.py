"""Int8 weight-only quantization of the language model's linear layers, for decoding on CPU.

Each weight row (output channel) is stored as int8 with one scale: w ~= q * scale, q in
[-127, 127], scale = max|w_row| / 127. Activations stay in floating point. Decoding one token
reads every weight once, so halving the bytes against bfloat16 nearly halves the time.

A few rows at a time (decoding) run torch's int8 matrix-vector kernel
(`torch._weight_int8pack_mm`, bfloat16 activations); more rows (the prompt) multiply by the
int8 values converted to bfloat16 a block at a time (integers up to 127 are exact in
bfloat16) and apply the scales to the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KERNEL_MAX_ROWS = 4  # beyond this the int8 kernel is slower than converting the weight
_BLOCK_ELEMENTS = 1 << 22  # weight elements converted at a time (8 MB of bfloat16)


def int8_kernel_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> (N, K) int8 and (N,) float32 scales, symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight and per-output-channel scales; inference only.

    Computes in bfloat16 (the int8 kernel's activation type) and returns the input's dtype.
    """

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        bias = getattr(linear, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized(self) -> Tensor:
        return self.weight_int8.to(torch.float32) * self.scale.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        # The kernel reads K in blocks of 16 with no tail: other widths give garbage or crash.
        if rows.shape[0] <= KERNEL_MAX_ROWS and self.in_features % 16 == 0 and int8_kernel_available() \
                and rows.device.type == "cpu":
            y = torch._weight_int8pack_mm(rows.contiguous(), self.weight_int8, self.scale)
        else:
            y = self._blockwise(rows)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def _blockwise(self, rows: Tensor) -> Tensor:
        """rows @ (q * scale)^T, converting a block of weight rows to bfloat16 at a time."""
        N, K = self.weight_int8.shape
        step = max(1, _BLOCK_ELEMENTS // K)
        buffer = torch.empty(min(step, N), K, dtype=torch.bfloat16, device=rows.device)
        out = torch.empty(rows.shape[0], N, dtype=torch.bfloat16, device=rows.device)
        for i in range(0, N, step):
            n = min(step, N - i)
            block = buffer[:n].copy_(self.weight_int8[i : i + n])
            torch.mul(F.linear(rows, block), self.scale[i : i + n], out=out[:, i : i + n])
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Replaces every linear layer under `module` (nn.Linear or a packed one; names in `skip`
    and their children excepted) by an `Int8Linear`; returns how many."""
    from .packed import PackedLinear, _parents

    count = 0
    for name, parent in _parents(module, skip):
        for attr in [a for a, sub in parent.named_children() if type(sub) is nn.Linear or isinstance(sub, PackedLinear)]:
            layer = getattr(parent, attr)
            if getattr(layer, "activation", None) is not None:
                parent.act = layer.activation  # fused into the packed layer: give it back
            setattr(parent, attr, Int8Linear(layer))  # one layer at a time: the float weight goes
            del layer
            count += 1
    return count


def quantize_language_model(model: nn.Module) -> nn.Module:
    """Int8 weight-only quantization of every linear layer of `model.language_model`
    (the output head included); the image encoder and Q-Former are left as they are.

    Returns the model. The embedding table stays in floating point: it is read a row at a time.
    """
    lm = getattr(model, "language_model", model)
    if quantize_linears(lm) == 0:
        raise ValueError("no linear layers to quantize in the language model")
    return model


__all__ = ["Int8Linear", "quantize_weight", "quantize_linears", "quantize_language_model", "int8_kernel_available"]
