"""The one attention used by every part of the model, and a preallocated KV cache.

Tensors are (B, H, T, D). Masks are additive floats broadcastable to (B, H, Tq, Tk):
0 where a key may be seen, the dtype's most negative value where it may not. Additive
masks (rather than booleans) keep rows with no visible key finite, as the reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_heads(cfg, hidden_size: int, num_heads: int) -> None:
    """Raises when the width does not split into heads: checked when a model is built (the
    reference accepts such a config and fails in the model too)."""
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(
            f"{type(cfg).__name__}: hidden_size {hidden_size} is not divisible by "
            f"num_attention_heads {num_heads}"
        )


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    head_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention: (B, H, Tq, D) x (B, H, Tk, D) -> (B, H, Tq, D).

    Uses PyTorch's fused kernel unless the caller wants the weights or a head mask, or there
    is a single query. `scale=None` means 1/sqrt(D); T5 passes 1.0.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[2] == 1 and not need_weights and head_mask is None and dropout_p == 0.0:
        # One query (a decoding step): two small products in float32 beat the fused kernel,
        # which first copies the strided cache slices, by 2-4x on CPU, and are as accurate.
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, 1, Tk)
        if mask is not None:
            scores = scores + mask
        return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype), None
    if not need_weights and head_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return out, None
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    if head_mask is not None:
        probs = probs * head_mask
    return torch.matmul(probs, v), weights


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, H*D) -> (B, H, T, D)"""
    B, T, C = x.shape
    return x.view(B, T, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H*D)"""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def padding_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, Tk) of 1/0 -> additive (B, 1, 1, Tk)."""
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    mask.masked_fill_(keep == 0, torch.finfo(dtype).min)
    return mask[:, None, None, :]


def causal_padding_mask(keep: Tensor, q_len: int, dtype: torch.dtype) -> Tensor:
    """Causal mask for the last `q_len` of `Tk` positions, combined with padding.

    keep: (B, Tk) of 1/0 -> additive (B, 1, q_len, Tk); query i sits at key position Tk - q_len + i.
    """
    B, Tk = keep.shape
    q_pos = torch.arange(Tk - q_len, Tk, device=keep.device)[:, None]  # (q_len, 1)
    k_pos = torch.arange(Tk, device=keep.device)[None, :]  # (1, Tk)
    hidden = (k_pos > q_pos)[None, :, :] | (keep == 0)[:, None, :]  # (B, q_len, Tk)
    mask = torch.zeros(hidden.shape, dtype=dtype, device=keep.device)
    mask.masked_fill_(hidden, torch.finfo(dtype).min)
    return mask[:, None]


class KVCache:
    """Keys and values for every layer, preallocated to `max_len` and written in place.

    k[layer], v[layer]: (B, H, max_len, D). `length` is how many positions are filled.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Stores (B, H, T, D) at positions [length, length + T); returns all filled keys and values."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def fill_from(self, prefix: "KVCache") -> None:
        """Starts every row with the one row of `prefix` (a prompt head all rows share)."""
        n = prefix.length
        for mine, theirs in ((self.k, prefix.k), (self.v, prefix.v)):
            for t, p in zip(mine, theirs):
                t[:, :, :n] = p[:, :, :n]  # (1, H, n, D) broadcast over the batch
        self.length = n

    def advance(self, n: int) -> None:
        """Marks `n` more positions filled; called once per forward, after every layer wrote."""
        self.length += n

    def reorder(self, index: Tensor) -> None:
        """Keeps batch rows `index` (beam search); the batch size may change (expansion for beams)."""
        if index.shape[0] == self.k[0].shape[0]:
            # Same batch size (a beam step): gather only the filled positions, in place.
            for cache in (self.k, self.v):
                for t in cache:
                    t[:, :, : self.length] = t[:, :, : self.length].index_select(0, index)
            return
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
