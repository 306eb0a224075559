"""The image encoder: an EVA-style ViT (pre-LN blocks, fused qkv with q and v bias only)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activation
from .attention import attend, check_heads, merge_heads
from .checkpointing import run_layer


class VisionOutput(NamedTuple):
    last_hidden_state: Tensor  # (B, 1 + patches, D), after the final layer norm
    pooled: Tensor  # (B, D): the class token, layer-normed once more (as the reference does)
    hidden_states: tuple[Tensor, ...] | None  # embeddings, then each block's output
    attentions: tuple[Tensor, ...] | None  # (B, H, T, T) per block


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, cfg.hidden_size))

    def positions(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings for a (grid_h, grid_w) patch grid, bicubically resized when it differs."""
        table = self.position_embedding  # (1, 1 + side*side, D)
        side = int((table.shape[1] - 1) ** 0.5)
        if grid_h == side and grid_w == side:
            return table
        D = table.shape[-1]
        patch = table[:, 1:].reshape(1, side, side, D).permute(0, 3, 1, 2)  # (1, D, side, side)
        patch = F.interpolate(patch, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, D)
        return torch.cat([table[:, :1], patch], dim=1)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (B, D, gh, gw)
        B, D, gh, gw = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        cls = self.class_embedding.expand(B, 1, D).to(dtype)
        x = torch.cat([cls, patches], dim=1)  # (B, 1 + gh*gw, D)
        table = self.positions(gh, gw) if interpolate_pos_encoding else self.position_embedding
        return x + table[:, : x.shape[1]].to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.dropout = cfg.attention_dropout
        # One bias of 3*D laid out as (q_bias, 0, v_bias); absent when qkv_bias=False.
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        dropout = self.dropout if self.training else 0.0
        out, weights = attend(q, k, v, dropout_p=dropout, need_weights=need_weights)
        return self.proj(merge_heads(out)), weights


class VisionMLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        h, weights = self.attn(self.norm1(x), need_weights)
        x = x + h
        x = x + self.mlp(self.norm2(x))
        return x, weights


class VisionEncoder(nn.Module):
    checkpointing: dict | None = None  # torch checkpoint kwargs while gradient checkpointing is on

    def __init__(self, cfg) -> None:
        super().__init__()
        check_heads(cfg, cfg.hidden_size, cfg.num_attention_heads)
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self,
        pixel_values: Tensor,
        interpolate_pos_encoding: bool = False,
        need_hidden: bool = False,
        need_weights: bool = False,
    ) -> VisionOutput:
        x = self.embeddings(pixel_values, interpolate_pos_encoding)
        hidden = [x] if need_hidden else None
        weights = [] if need_weights else None
        for block in self.layers:
            x, w = run_layer(self, block, x, need_weights)
            if need_hidden:
                hidden.append(x)
            if need_weights:
                weights.append(w)
        last = self.post_layernorm(x)
        pooled = self.post_layernorm(last[:, 0, :])
        return VisionOutput(
            last, pooled, tuple(hidden) if need_hidden else None, tuple(weights) if need_weights else None
        )
