"""LoRA (Hu et al., 2021) on linear layers whose outputs may be several fused projections.

Our attention fuses projections the reference keeps apart (OPT's q_proj, k_proj and v_proj
are one `qkv`). A LoRA on the reference's q_proj is a low-rank update of the first third of
our qkv's output rows, so each update here covers a range of output rows: `LoraPiece` adds
scaling * B @ A @ dropout(x) to rows [start, end). A LoRA on q and v is two pieces on one
layer, exactly, and trains as two (k is never touched).

`LoraLinear` wraps the base layer (nn.Linear, or a packed or int8 one: anything with
in_features and out_features) and holds the pieces of every named adapter; the adapters in
`active` are added to the output unless `enabled` is False.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoraPiece(nn.Module):
    """delta(x) = scaling * B @ A @ dropout(x) for output rows [start, end) of the base layer.

    A: (r, in_features), B: (end - start, r), named as the reference's `lora_A` / `lora_B` weights.
    """

    def __init__(self, in_features: int, start: int, end: int, r: int, scaling: float, dropout: float,
                 init: bool | str = True, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.start, self.end, self.r, self.scaling = start, end, r, scaling
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(end - start, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset(init)

    @torch.no_grad()
    def reset(self, init: bool | str) -> None:
        """peft's initialisations: True (A like nn.Linear, B zero: the adapter starts as a no-op),
        "gaussian" (A ~ N(0, 1/r), B zero), False (both like nn.Linear: a random non-zero update)."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def delta(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., end - start)"""
        h = self.dropout(x.to(self.lora_A.dtype))
        return F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling

    def weight_delta(self) -> Tensor:
        """The update as a dense (end - start, in) weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"rows={self.start}:{self.end}, r={self.r}, scaling={self.scaling:g}"


class LoraLinear(nn.Module):
    """A linear layer plus low-rank updates of named adapters (several may be active at once)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()  # adapter name -> ModuleList of LoraPiece
        self.active: list[str] = []
        self.enabled = True

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def add_piece(self, adapter: str, piece: LoraPiece) -> None:
        if not 0 <= piece.start < piece.end <= self.out_features:
            raise ValueError(f"rows {piece.start}:{piece.end} outside the layer's {self.out_features} outputs")
        if adapter not in self.adapters:
            self.adapters[adapter] = nn.ModuleList()
        self.adapters[adapter].append(piece)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        for name in self.active:
            for piece in self.adapters[name] if name in self.adapters else ():
                d = piece.delta(x).to(y.dtype)
                if piece.start == 0 and piece.end == self.out_features:
                    y = y + d
                else:  # only this projection's rows change
                    y = torch.cat([y[..., : piece.start], y[..., piece.start : piece.end] + d, y[..., piece.end :]], -1)
        return y

    @torch.no_grad()
    def merged(self, adapters: list[str]) -> nn.Module:
        """The base layer with `adapters` folded into its weight (for inference without the extra products)."""
        if type(self.base) is not nn.Linear:
            raise ValueError(f"cannot merge into a {type(self.base).__name__}: merge before packing or quantizing")
        weight = self.base.weight
        for name in adapters:
            for piece in self.adapters[name] if name in self.adapters else ():
                weight[piece.start : piece.end] += piece.weight_delta().to(weight.dtype)
        return self.base

    def extra_repr(self) -> str:
        return f"active={self.active}, enabled={self.enabled}"
