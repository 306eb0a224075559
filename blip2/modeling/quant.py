"""Int8 and int4 weight-only quantization of the language model's linear layers, for decoding on CPU.

Each weight row (output channel) is stored as int8 with one scale: w ~= q * scale, q in
[-127, 127], scale = max|w_row| / 127. Activations stay in floating point. Decoding one token
reads every weight once, so halving the bytes against bfloat16 nearly halves the time.

A few rows at a time (decoding) run torch's int8 matrix-vector kernel
(`torch._weight_int8pack_mm`, bfloat16 activations); more rows (the prompt) multiply by the
int8 values converted to bfloat16 a block at a time (integers up to 127 are exact in
bfloat16) and apply the scales to the output.

Int4 (`Int4Linear`) keeps 4 bits per weight with a scale and zero per group of 128 inputs:
a quarter of bfloat16's bytes, at some cost in quality (bench/bench_decode.py counts the tokens
that change against bfloat16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .packed import PackedLinear, linear_parents

KERNEL_MAX_ROWS = 4  # beyond this the int8 kernel is slower than converting the weight
_BLOCK_ELEMENTS = 1 << 22  # weight elements converted at a time (8 MB of bfloat16)


def int8_kernel_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> (N, K) int8 and (N,) float32 scales, symmetric per output channel.

    A block of rows at a time: the float32 temporaries of a whole output head (0.5 GB each for
    OPT-2.7b's) would otherwise set the peak memory of a quantized load.
    """
    N, K = weight.shape
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    scale = torch.empty(N, dtype=torch.float32, device=weight.device)
    step = max(1, _BLOCK_ELEMENTS // max(K, 1))
    for i in range(0, N, step):
        w = weight[i : i + step].detach().float()
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        scale[i : i + step] = s
        q[i : i + step] = torch.round(w / s[:, None]).clamp_(-127, 127)  # whole numbers: the cast is exact
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


# ---------------------------------------------------------------- int4
INT4_KERNEL_MAX_ROWS = 16  # beyond this converting a block of weights to bfloat16 is faster
_INT4_BLOCK_N = 64  # the int4 kernel's layout packs output rows in blocks of 64


def int4_kernel_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def quantize_weight_int4(weight: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """(N, K) float -> (N, K) values in [0, 15] and (N, K / group) scales and zeros, asymmetric per
    group of `group` inputs: w ~= (q - 8) * scale + zero."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(N, K)
    return q, scale, low + 8 * scale


class Int4Linear(nn.Module):
    """nn.Linear with int4 weights, one scale and zero per group of `group_size` inputs; inference only.

    Output rows in whole blocks of 64 live in the layout of PyTorch's CPU int4 kernel
    (`torch._weight_int4pack_mm_for_cpu`, bfloat16 activations); the few rows past the last block
    (and layers whose width fits no group) are kept as their dequantized bfloat16 values, so every
    row computes the same quantized weight. Returns the input's dtype.
    """

    def __init__(self, linear: nn.Module, group_size: int = 128) -> None:
        super().__init__()
        N, K = self.out_features, self.in_features = linear.out_features, linear.in_features
        group = next((g for g in (group_size, 64, 32) if K % g == 0), None)
        self.group = group or K
        q, scale, zero = quantize_weight_int4(linear.weight, self.group)
        kernel = group is not None and int4_kernel_available()
        main = N - N % _INT4_BLOCK_N if kernel else 0
        with torch.inference_mode(False), torch.no_grad():
            packed = torch._convert_weight_to_int4pack_for_cpu(q[:main].to(torch.int32), 8) if main else q[:0]
            self.register_buffer("weight_int4", packed)  # (main, K / 2) uint8 in the kernel's layout
            pairs = torch.stack([scale[:main], zero[:main]], dim=-1).transpose(0, 1)  # (K / group, main, 2)
            self.register_buffer("scale_zeros", pairs.contiguous().to(torch.bfloat16))
            scale, zero = scale.to(torch.bfloat16).float(), zero.to(torch.bfloat16).float()  # as the kernel reads them
            rest = (q[main:].view(N - main, K // self.group, self.group).float() - 8) * scale[main:, :, None] + zero[main:, :, None]
            self.register_buffer("rest", rest.view(N - main, K).to(torch.bfloat16))  # (N - main, K)
        bias = getattr(linear, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized(self) -> Tensor:
        main = self.weight_int4.shape[0]
        return torch.cat([self._unpack(0, main).float(), self.rest.float()])

    def _unpack(self, start: int, n: int) -> Tensor:
        """Output rows [start, start + n) of the kernel-layout part as (n, K) bfloat16; multiples of 64."""
        K, G = self.in_features, self.group
        blocks = self.weight_int4[start : start + n].view(n // _INT4_BLOCK_N, K, _INT4_BLOCK_N // 2)
        q = torch.cat([blocks & 15, blocks >> 4], dim=-1).transpose(1, 2).reshape(n, K // G, G)  # (n, K / G, G); byte j of a block row holds rows j and j + 32
        scale, zero = self.scale_zeros[:, start : start + n].float().unbind(-1)  # (K / G, n) each
        return ((q.float() - 8) * scale.t()[..., None] + zero.t()[..., None]).view(n, K).to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        main = self.weight_int4.shape[0]
        parts = []
        if main and rows.shape[0] <= INT4_KERNEL_MAX_ROWS and rows.device.type == "cpu":
            parts.append(torch._weight_int4pack_mm_for_cpu(rows.contiguous(), self.weight_int4, self.group, self.scale_zeros))
        elif main:
            step = max(_INT4_BLOCK_N, _BLOCK_ELEMENTS // self.in_features // _INT4_BLOCK_N * _INT4_BLOCK_N)
            parts += [F.linear(rows, self._unpack(i, min(step, main - i))) for i in range(0, main, step)]
        if self.rest.shape[0]:
            parts.append(F.linear(rows, self.rest))
        y = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4, group={self.group}")


def quantize_linears(module: nn.Module, skip: tuple[str, ...] = (), layer_type: type[nn.Module] | None = None) -> int:
    """Replaces every linear layer under `module` (nn.Linear or a packed one; names in `skip`
    and their children excepted) by a `layer_type` (default `Int8Linear`); returns how many."""
    layer_type = layer_type or Int8Linear
    count = 0
    for _, parent in linear_parents(module, skip):
        for attr in [a for a, sub in parent.named_children() if type(sub) is nn.Linear or isinstance(sub, PackedLinear)]:
            layer = getattr(parent, attr)
            if getattr(layer, "activation", None) is not None:
                parent.act = layer.activation  # fused into the packed layer: give it back
            setattr(parent, attr, layer_type(layer))  # one layer at a time: the float weight goes
            del layer
            count += 1
    return count


def quantize_language_model(model: nn.Module, kind: str = "int8") -> nn.Module:
    """Weight-only quantization (`kind`: a key of QUANTIZERS) of every linear layer of
    `model.language_model` (the output head included); the image encoder and Q-Former are left
    as they are. Returns the model. The embedding table stays in floating point: it is read a
    row at a time.
    """
    lm = getattr(model, "language_model", model)
    if quantize_linears(lm, layer_type=QUANTIZERS[kind]) == 0:
        raise ValueError("no linear layers to quantize in the language model")
    return model


QUANTIZERS: dict[str, type[nn.Module]] = {"int8": Int8Linear, "int4": Int4Linear}

__all__ = ["Int8Linear", "Int4Linear", "QUANTIZERS", "quantize_weight_int4", "int4_kernel_available", "quantize_weight", "quantize_linears", "quantize_language_model",
           "int8_kernel_available"]
