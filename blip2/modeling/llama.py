"""Llama: a decoder-only language model with rotary positions, RMSNorm, a SwiGLU feed-forward
and grouped-query attention (Llama 1/2, Vicuna, and the like)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activation
from .attention import KVCache, Positions, attend, check_heads, merge_heads, split_heads
from .checkpointing import run_layer
from .init import init_normal_lm_
from .opt import LMOutput
from .t5 import RMSNorm


# ---------------------------------------------------------------- rotary positions
def rotary_tables(cfg, positions: Tensor, total_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin for each (row, position): (B, T) positions -> two (B, 1, T, head_dim).

    `total_len` is the key length of this forward (cache + new tokens): dynamic NTK scaling
    widens the base once a sequence outgrows max_position_embeddings, as the reference does.
    """
    dim = cfg.hidden_size // cfg.num_attention_heads
    scaling = cfg.rope_scaling or {}
    kind, factor = scaling.get("type"), scaling.get("factor", 1.0)
    base = cfg.rope_theta
    limit = cfg.max_position_embeddings
    if kind == "dynamic" and total_len > limit:
        base = base * ((factor * total_len / limit) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))  # (dim/2,)
    t = positions.float()
    if kind == "linear":
        t = t / factor  # positions squeezed into the trained range
    freqs = t[..., None] * inv_freq  # (B, T, dim/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (B, T, dim): the two halves rotate together
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates each (first-half, second-half) pair of x (B, H, T, d) by its position's angle."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + turned * sin


def grouped_attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float,
                   need_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Attention where each key/value head serves H / H_kv query heads.

    q (B, H, T, d), k and v (B, H_kv, S, d). A group's query heads are folded into the query
    axis, so the keys and values are never copied per head (the cache stays H_kv wide).
    """
    B, H, T, d = q.shape
    kv_heads = k.shape[1]
    groups = H // kv_heads
    if groups == 1:
        return attend(q, k, v, mask, dropout_p=dropout_p, need_weights=need_weights)
    q = q.reshape(B, kv_heads, groups * T, d)  # head h = kv * groups + g -> rows g*T .. g*T+T-1
    if mask is not None and mask.shape[-2] > 1:
        mask = mask.repeat(1, 1, groups, 1)  # (B, 1, groups * T, S): each group sees the same pattern
    out, weights = attend(q, k, v, mask, dropout_p=dropout_p, need_weights=need_weights)
    out = out.reshape(B, H, T, d)
    return out, None if weights is None else weights.reshape(B, H, T, -1)


# ---------------------------------------------------------------- layers
class LlamaAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.dropout = cfg.attention_dropout
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.split = [q_width, kv_width, kv_width]
        self.qkv = nn.Linear(cfg.hidden_size, q_width + 2 * kv_width, bias=cfg.attention_bias)
        self.out = nn.Linear(q_width, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, rope: tuple[Tensor, Tensor], at: Positions, layer: int, cache: KVCache | None,
                need_weights: bool):
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = rotate(split_heads(q, self.heads), *rope)  # (B, H, T, d)
        k = rotate(split_heads(k, self.kv_heads), *rope)  # (B, H_kv, T, d)
        v = split_heads(v, self.kv_heads)
        if cache is not None:
            k, v = cache.write(layer, k, v, at.slots, at.mask.shape[-1])  # (B, H_kv, S, d): keys stored rotated
        dropout = self.dropout if self.training else 0.0
        out, weights = grouped_attend(q, k, v, at.mask, dropout, need_weights)
        return self.out(merge_heads(out)), weights


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up are one fused projection."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class LlamaLayer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = LlamaAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope, at: Positions, layer: int, cache: KVCache | None, need_weights: bool):
        h, weights = self.attn(self.attn_norm(x), rope, at, layer, cache, need_weights)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, weights


# ---------------------------------------------------------------- the model
class LlamaLanguageModel(nn.Module):
    """Same interface as `OPTLanguageModel`: embed, new_cache, forward(inputs_embeds, mask, cache, ...)."""

    checkpointing: dict | None = None  # torch checkpoint kwargs while gradient checkpointing is on

    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, cfg) -> None:
        super().__init__()
        check_heads(cfg, cfg.hidden_size, cfg.num_attention_heads)
        if cfg.num_key_value_heads < 1 or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {cfg.num_key_value_heads}"
            )
        head_dim = getattr(cfg, "head_dim", None)  # newer releases may write it; 4.37 derives it
        if head_dim is not None and head_dim != cfg.hidden_size // cfg.num_attention_heads:
            raise ValueError(
                f"LlamaConfig: head_dim {head_dim} differs from hidden_size / num_attention_heads "
                f"({cfg.hidden_size // cfg.num_attention_heads}); only the derived head size is supported"
            )
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights_(self) -> None:
        """Llama's rule (as the reference draws it): N(0, initializer_range), biases and the padding row 0."""
        init_normal_lm_(self, self.config.initializer_range)

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, hidden_size)"""
        return self.embed_tokens(input_ids)

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        cfg = self.config
        weight = self.embed_tokens.weight
        return KVCache(
            cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len,
            cfg.hidden_size // cfg.num_attention_heads, dtype or weight.dtype, device or weight.device,
        )

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        need_hidden: bool = False,
        need_weights: bool = False,
        last_logits: int | None = None,
        positions: Positions | None = None,
    ) -> LMOutput:
        """inputs_embeds (B, T, D); attention_mask (B, filled + T) of 1/0 over cache and new tokens.

        Without `positions` the new tokens follow what the cache holds, positions counting
        unmasked tokens (left padding does not shift the text), and the cache counts them. With
        `positions` (a static step, or the reference forward's numbering) `attention_mask` is not
        read and the caller keeps count. `last_logits=n` computes logits for the last n positions.
        """
        T = inputs_embeds.shape[1]
        eager = positions is None
        if eager:
            positions = Positions.after_cache(cache, attention_mask, inputs_embeds)
        x = inputs_embeds
        # Padding's position never matters (the token is masked); the reference's generation gives it 1.
        ids = positions.ids.masked_fill(positions.ids < 0, 1)
        rope = rotary_tables(self.config, ids, positions.mask.shape[-1], x.dtype)

        hidden = [] if need_hidden else None
        weights = [] if need_weights else None
        for n, layer in enumerate(self.layers):
            if need_hidden:
                hidden.append(x)
            x, w = run_layer(self, layer, x, rope, positions, n, cache, need_weights)
            if need_weights:
                weights.append(w)
        if cache is not None and eager:
            cache.advance(T)
        x = self.final_norm(x)
        if need_hidden:
            hidden.append(x)
        logits = self.lm_head(x if last_logits is None else x[:, -last_logits:])
        return LMOutput(logits, tuple(hidden) if need_hidden else None, tuple(weights) if need_weights else None)
