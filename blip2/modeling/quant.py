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

from .packed import PackedLinear, _shared_parameters, linear_parents

KERNEL_MAX_ROWS = 4  # beyond this the int8 kernel is slower than converting the weight
_BLOCK_ELEMENTS = 1 << 22  # weight elements converted at a time (8 MB of bfloat16)
# Weight elements quantized (and int4 ones unpacked for a prompt) at a time. Their float32
# temporaries (8 MB each) stay in the heap's reused space: with 16 MB ones, glibc kept ~0.1 GB
# more of a quantized load's blocks than it gave back.
_QUANT_BLOCK_ELEMENTS = 1 << 21


def int8_kernel_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> (N, K) int8 and (N,) float32 scales, symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale  # whole numbers: the cast is exact


class WeightOnlyLinear(nn.Module):
    """What the int8 and int4 layers share: a float bias, and a quantized weight filled a block of
    rows at a time (`fill_rows`). Every row is quantized on its own, so blocks give the same values
    as the whole weight at once, and only a block's float temporaries ever exist: the loader hands
    over each block as it reads it (`blip2.checkpoint`), so the float weight is never whole.
    """

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self._allocate(linear.in_features, linear.out_features, linear.weight.device)
        weight = linear.weight
        for start in range(0, self.out_features, self.block_rows):
            self.fill_rows(start, weight[start : start + self.block_rows])
        self.set_bias(getattr(linear, "bias", None))

    @classmethod
    def unfilled(cls, in_features: int, out_features: int, device: torch.device | str = "cpu"):
        """The layer with its weight allocated but not yet filled: the loader fills it (`fill_rows`)
        and `set_bias` gives it the bias."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._allocate(in_features, out_features, torch.device(device))
        layer.bias = None
        return layer

    def set_bias(self, bias: Tensor | None) -> None:
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def block_rows(self) -> int:
        """Rows `fill_rows` takes at a time (the last block may be shorter)."""
        return max(1, _QUANT_BLOCK_ELEMENTS // max(self.in_features, 1))

    def _allocate(self, in_features: int, out_features: int, device: torch.device) -> None:
        raise NotImplementedError

    def fill_rows(self, start: int, rows: Tensor) -> None:
        """Quantizes weight rows [start, start + len(rows)) from their float values."""
        raise NotImplementedError


class Int8Linear(WeightOnlyLinear):
    """nn.Linear with an int8 weight and per-output-channel scales; inference only.

    Computes in bfloat16 (the int8 kernel's activation type) and returns the input's dtype.
    """

    def _allocate(self, in_features: int, out_features: int, device: torch.device) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))

    def fill_rows(self, start: int, rows: Tensor) -> None:
        q, scale = quantize_weight(rows)
        with torch.inference_mode(False), torch.no_grad():
            self.weight_int8[start : start + len(rows)] = q
            self.scale[start : start + len(rows)] = scale

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


class Int4Linear(WeightOnlyLinear):
    """nn.Linear with int4 weights, one scale and zero per group of `group_size` inputs; inference only.

    Output rows in whole blocks of 64 live in the layout of PyTorch's CPU int4 kernel
    (`torch._weight_int4pack_mm_for_cpu`, bfloat16 activations); the few rows past the last block
    (and layers whose width fits no group) are kept as their dequantized bfloat16 values, so every
    row computes the same quantized weight. Returns the input's dtype.
    """

    group_size = 128

    def _allocate(self, in_features: int, out_features: int, device: torch.device) -> None:
        N, K = self.out_features, self.in_features = out_features, in_features
        group = next((g for g in (self.group_size, 64, 32) if K % g == 0), None)
        self.group = group or K
        main = N - N % _INT4_BLOCK_N if group is not None and int4_kernel_available() else 0
        with torch.inference_mode(False):
            # (main, K / 2) uint8 in the kernel's layout; (K / group, main, 2) scales and zeros; the rest plain
            self.register_buffer("weight_int4", torch.empty(main, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scale_zeros", torch.empty(K // self.group, main, 2, dtype=torch.bfloat16, device=device))
            self.register_buffer("rest", torch.empty(N - main, K, dtype=torch.bfloat16, device=device))

    @property
    def block_rows(self) -> int:
        # Whole blocks of the kernel's layout, which converts 64 rows at a time.
        return max(_INT4_BLOCK_N, _QUANT_BLOCK_ELEMENTS // max(self.in_features, 1) // _INT4_BLOCK_N * _INT4_BLOCK_N)

    def fill_rows(self, start: int, rows: Tensor) -> None:
        """`start` is a multiple of 64, as `block_rows` is."""
        n, K, G = len(rows), self.in_features, self.group
        main = self.weight_int4.shape[0]
        q, scale, zero = quantize_weight_int4(rows, G)
        kernel = max(0, min(n, main - start))  # this block's rows in the kernel's layout
        with torch.inference_mode(False), torch.no_grad():
            if kernel:
                packed = torch._convert_weight_to_int4pack_for_cpu(q[:kernel].to(torch.int32), 8)
                self.weight_int4[start : start + kernel] = packed
                self.scale_zeros[:, start : start + kernel] = torch.stack([scale[:kernel], zero[:kernel]], dim=-1).transpose(0, 1)
            if kernel < n:
                s, z = scale[kernel:].to(torch.bfloat16).float(), zero[kernel:].to(torch.bfloat16).float()  # as the kernel reads them
                rest = (q[kernel:].view(n - kernel, K // G, G).float() - 8) * s[..., None] + z[..., None]
                first = start + kernel - main
                self.rest[first : first + n - kernel] = rest.view(n - kernel, K)

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
            step = self.block_rows  # float32 temporaries of 8 MB, which the heap reuses (see _QUANT_BLOCK_ELEMENTS)
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


def _language_model(model: nn.Module) -> nn.Module:
    return getattr(model, "language_model", model)


def quantize_language_model(model: nn.Module, kind: str = "int8") -> nn.Module:
    """Weight-only quantization (`kind`: a key of QUANTIZERS) of every linear layer of
    `model.language_model` (the output head included); the image encoder and Q-Former are left
    as they are. Returns the model. The embedding table stays in floating point: it is read a
    row at a time. Layers already quantized (while loading, `QuantizedLoad`) stay as they are.
    """
    lm = _language_model(model)
    done = any(isinstance(m, QUANTIZERS[kind]) for m in lm.modules())
    if quantize_linears(lm, layer_type=QUANTIZERS[kind]) == 0 and not done:
        raise ValueError("no linear layers to quantize in the language model")
    return model


class QuantizedLoad:
    """Quantizes the language model's linear layers while the loader reads them.

    Built on the model still on the meta device: each linear weight of the language model gets
    an unfilled quantized layer, which the loader fills a block of rows at a time as it reads
    the weight (`sinks`, by state-dict name), so the float weight never exists whole and a
    quantized load peaks near the quantized model's size, not above the float one's. After
    loading, `install` puts the layers in place of the linear ones, with their biases.
    A weight another module shares (a tied output head) loads as float for its other owner and
    is quantized after loading, as before. Same values as quantizing after a float load.
    """

    def __init__(self, model: nn.Module, kind: str, device: torch.device | str = "cpu") -> None:
        lm = _language_model(model)
        prefix = next(name for name, m in model.named_modules() if m is lm)
        shared = _shared_parameters(model)
        self.layers: dict[str, tuple[nn.Module, str, WeightOnlyLinear]] = {}  # weight name -> (parent, attribute, layer)
        for name, parent in linear_parents(lm):
            for attr, sub in parent.named_children():
                if type(sub) is nn.Linear and id(sub.weight) not in shared:
                    key = ".".join(part for part in (prefix, name, attr, "weight") if part)
                    self.layers[key] = (parent, attr, QUANTIZERS[kind].unfilled(sub.in_features, sub.out_features, device))

    @property
    def sinks(self) -> dict[str, WeightOnlyLinear]:
        """State-dict name of a linear weight -> the layer that quantizes its rows (`fill_rows`)."""
        return {key: layer for key, (_, _, layer) in self.layers.items()}

    def install(self) -> None:
        """The filled layers replace the linear ones (whose weights the loader left on meta)."""
        for parent, attr, layer in self.layers.values():
            layer.set_bias(getattr(parent, attr).bias)
            setattr(parent, attr, layer)
        self.layers = {}


QUANTIZERS: dict[str, type[nn.Module]] = {"int8": Int8Linear, "int4": Int4Linear}

__all__ = ["Int8Linear", "Int4Linear", "WeightOnlyLinear", "QuantizedLoad", "QUANTIZERS", "quantize_weight_int4", "int4_kernel_available", "quantize_weight", "quantize_linears", "quantize_language_model",
           "int8_kernel_available"]
