"""The one attention used by every part of the model, and a preallocated KV cache.

Tensors are (B, H, T, D). Masks are additive floats broadcastable to (B, H, Tq, Tk):
0 where a key may be seen, the dtype's most negative value where it may not. Additive
masks (rather than booleans) keep rows with no visible key finite, as the reference does.
"""

from __future__ import annotations

from typing import NamedTuple

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
        scores = torch.matmul(_float32(q), _float32(k).transpose(-1, -2)) * scale  # (B, H, 1, Tk)
        if mask is not None:
            scores = scores + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), _float32(v))
        return (out if out.dtype == q.dtype else out.to(q.dtype)), None
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


def _float32(x: Tensor) -> Tensor:
    """`x.float()` without the call when it is float32 already (each call into torch gives up the
    GIL, which a server's other threads then take: a decoding step makes a few per layer)."""
    return x if x.dtype == torch.float32 else x.float()


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


class Positions(NamedTuple):
    """Where the new tokens of one forward sit, as tensors.

    Because nothing here is a Python int, one forward serves prefill, eager decoding and a
    static step replayed as a CUDA graph (which reads these from fixed buffers), and each row
    may sit at its own length (as continuous batching needs).
    """

    ids: Tensor  # (B, T) each new token's position: how many unmasked tokens precede it (padding: -1)
    slots: Tensor  # the cache slots the new keys and values go to: (T,) the same for every row, or (B, T)
    mask: Tensor  # additive (B, 1 or H, T, S): which of the first S cache slots each new token sees

    @classmethod
    def after(cls, keep: Tensor, q_len: int, dtype: torch.dtype) -> "Positions":
        """The eager case: the new tokens follow what is filled, in every row alike.

        keep: (B, filled + T) of 1/0 over the cache and the new tokens.
        """
        S = keep.shape[1]
        ids = torch.cumsum(keep, dim=1) * keep - 1  # (B, S): positions count only unmasked tokens
        slots = torch.arange(S - q_len, S, device=keep.device)  # (T,)
        return cls(ids[:, S - q_len:].long(), slots, causal_padding_mask(keep, q_len, dtype))

    @classmethod
    def after_cache(cls, cache: "KVCache | None", attention_mask: Tensor | None, inputs_embeds: Tensor) -> "Positions":
        """`after` for a forward of inputs_embeds (B, T, E) following what `cache` holds; the mask
        (B, filled + T) defaults to all ones and must have that shape."""
        B, T, _ = inputs_embeds.shape
        S = T + (cache.length if cache is not None else 0)
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({B}, {S})")
        return cls.after(attention_mask, T, inputs_embeds.dtype)


class KVCache:
    """Keys and values for every layer, preallocated to `max_len` and written in place.

    k[layer], v[layer]: (B, H, max_len, D). Forwards write at the slots `Positions` names;
    `length` is how many slots eager forwards (those given no positions) have filled.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len

    def write(self, layer: int, k: Tensor, v: Tensor, slots: Tensor, window: int) -> tuple[Tensor, Tensor]:
        """Stores (B, H, T, D) at `slots` ((T,) or (B, T), as in `Positions`); returns the keys and
        values of the first `window` slots (the width of the attention mask, which hides the rest)."""
        if window > self.max_len:
            raise ValueError(f"KV cache full: {window} positions needed, {self.max_len} allocated")
        if slots.dim() == 1:  # every row alike: one copy along the slot dimension
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
        else:  # each row its own slots: (B, 1) rows x (B, T) slots pick (B, T, H, D)
            rows = self._row_index(k.shape[0], k.device)
            self.k[layer][rows, :, slots] = k.transpose(1, 2)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)
        return self.k[layer][:, :, :window], self.v[layer][:, :, :window]

    def _row_index(self, batch: int, device) -> Tensor:
        """(B, 1): 0..B-1, made once per cache (or per `rows` view: a step's), not once per layer."""
        index = getattr(self, "_rows", None)
        if index is None or index.shape[0] != batch:
            index = self._rows = torch.arange(batch, device=device)[:, None]
        return index

    def nbytes(self) -> int:
        """What the buffers take (a cache made on the "meta" device sizes one without allocating)."""
        return sum(t.element_size() * t.numel() for t in self.k + self.v)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of batch rows [start, stop) whose writes land in this cache (continuous batching
        runs each forward over the rows in use, not over every row allocated)."""
        view = object.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.length, view.max_len = self.length, self.max_len
        return view

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Row `target` takes the first `length` slots of row `source` (a row moving in the batch)."""
        for cache in (self.k, self.v):
            for t in cache:
                t[target, :, :length] = t[source, :, :length]

    def fill_from(self, prefix: "KVCache") -> None:
        """Starts every row with the one row of `prefix` (a prompt head all rows share)."""
        n = prefix.length
        for mine, theirs in ((self.k, prefix.k), (self.v, prefix.v)):
            for t, p in zip(mine, theirs):
                t[:, :, :n] = p[:, :, :n]  # (1, H, n, D) broadcast over the batch
        self.length = n

    def reserve(self, n: int, limit: int) -> None:
        """Room for `n` more positions, growing the buffers (doubling, at most to `limit`) when short:
        for models without a position limit, so a large max_new_tokens costs only what is used."""
        need = self.length + n
        if need <= self.max_len:
            return
        size = min(max(need, 2 * self.max_len), max(limit, need))
        grow = size - self.max_len
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                cache[i] = torch.cat([t, t.new_zeros(*t.shape[:2], grow, t.shape[3])], dim=2)
        self.max_len = size

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
