"""OPT: a decoder-only language model with learned positions counted from the attention mask."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .activations import activation, dropout
from .attention import KVCache, Positions, attend, check_heads, merge_heads, split_heads
from .checkpointing import run_layer
from .init import init_normal_lm_

# OPT's learned position table starts with two unused rows (a fairseq legacy).
POSITION_OFFSET = 2


class LMOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    hidden_states: tuple[Tensor, ...] | None  # the input of each layer, then the final output
    attentions: tuple[Tensor, ...] | None  # (B, H, T, S) per layer


def _norm(cfg, dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=cfg.layer_norm_elementwise_affine)


class OPTAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.enable_bias)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.enable_bias)

    def forward(self, x, at: Positions, layer: int, cache: KVCache | None, need_weights: bool):
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, T, d)
        if cache is not None:
            k, v = cache.write(layer, k, v, at.slots, at.mask.shape[-1])  # (B, H, S, d): what the mask covers
        dropout = self.dropout if self.training else 0.0
        out, weights = attend(q, k, v, at.mask, dropout_p=dropout, need_weights=need_weights)
        return self.out(merge_heads(out)), weights


class OPTLayer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.pre_norm = cfg.do_layer_norm_before  # OPT-350m alone normalises after each block
        self.dropout = cfg.dropout
        self.attn_norm = _norm(cfg, cfg.hidden_size)
        self.attn = OPTAttention(cfg)
        self.mlp_norm = _norm(cfg, cfg.hidden_size)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=cfg.enable_bias)
        self.act = activation(cfg.activation_function)

    def forward(self, x, at: Positions, layer: int, cache: KVCache | None, need_weights: bool):
        h = self.attn_norm(x) if self.pre_norm else x
        h, weights = self.attn(h, at, layer, cache, need_weights)
        x = x + dropout(h, self.dropout, self.training)
        if not self.pre_norm:
            x = self.attn_norm(x)
        h = self.mlp_norm(x) if self.pre_norm else x
        h = self.fc2(self.act(self.fc1(h)))
        x = x + dropout(h, self.dropout, self.training)
        if not self.pre_norm:
            x = self.mlp_norm(x)
        return x, weights


class OPTLanguageModel(nn.Module):
    checkpointing: dict | None = None  # torch checkpoint kwargs while gradient checkpointing is on

    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, cfg) -> None:
        super().__init__()
        check_heads(cfg, cfg.hidden_size, cfg.num_attention_heads)
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.word_embed_proj_dim, padding_idx=cfg.pad_token_id)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            self.project_in = nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False)
            self.project_out = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False)
        else:
            self.project_in = self.project_out = None
        self.layers = nn.ModuleList(OPTLayer(cfg) for _ in range(cfg.num_hidden_layers))
        has_final = cfg.do_layer_norm_before and not cfg._remove_final_layer_norm
        self.final_norm = _norm(cfg, cfg.hidden_size) if has_final else None
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights_(self) -> None:
        """OPT's rule (as the reference draws it): N(0, init_std), biases and the padding row 0."""
        init_normal_lm_(self, self.config.init_std)

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, word_embed_proj_dim)"""
        return self.embed_tokens(input_ids)

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        cfg = self.config
        weight = self.embed_tokens.weight
        return KVCache(
            cfg.num_hidden_layers, batch, cfg.num_attention_heads, max_len,
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
        """inputs_embeds (B, T, E); attention_mask (B, filled + T) of 1/0 over cache and new tokens.

        Without `positions` the new tokens follow what the cache holds (`cache.length`), and the
        cache counts them. With `positions` (a static step: see `graphed.py`) the mask and the
        slots come from there, `attention_mask` is not read and the caller keeps count.
        `last_logits=n` computes logits for the last n positions only (a prefill needs one).
        """
        T = inputs_embeds.shape[1]
        eager = positions is None
        if eager:
            positions = self._positions_after(cache, attention_mask, inputs_embeds)
        x = self.project_in(inputs_embeds) if self.project_in is not None else inputs_embeds
        x = x + self.embed_positions(positions.ids + POSITION_OFFSET)
        x = dropout(x, self.config.dropout, self.training)

        hidden = [] if need_hidden else None
        weights = [] if need_weights else None
        for n, layer in enumerate(self.layers):
            if need_hidden:
                hidden.append(x)
            if self.training and self.config.layerdrop > 0 and torch.rand(()) < self.config.layerdrop:
                continue
            x, w = run_layer(self, layer, x, positions, n, cache, need_weights)
            if need_weights:
                weights.append(w)
        if cache is not None and eager:
            cache.advance(T)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        if need_hidden:
            hidden.append(x)
        logits = self.lm_head(x if last_logits is None else x[:, -last_logits:])
        return LMOutput(logits, tuple(hidden) if need_hidden else None, tuple(weights) if need_weights else None)

    def _positions_after(self, cache: KVCache | None, attention_mask: Tensor | None,
                         inputs_embeds: Tensor) -> Positions:
        """Positions of the new tokens after what the cache holds, checked against the position table."""
        positions = Positions.after_cache(cache, attention_mask, inputs_embeds)
        limit = self.config.max_position_embeddings
        # Only long inputs can run past the table; checking the values syncs, so only then.
        if positions.mask.shape[-1] > limit and positions.ids.max().item() >= limit:
            raise ValueError(
                f"the sequence has {positions.ids.max().item() + 1} tokens (image queries "
                f"included) but the language model has only {limit} positions (max_position_embeddings)"
            )
        return positions
