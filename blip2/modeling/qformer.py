"""The Q-Former: learned queries through BERT-style post-LN layers that cross-attend to the image
every `cross_attention_frequency` layers."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activation, dropout
from .attention import attend, check_heads, merge_heads, split_heads
from .checkpointing import run_layer


class QFormerOutput(NamedTuple):
    last_hidden_state: Tensor  # (B, Q, D)
    hidden_states: tuple[Tensor, ...] | None  # layer-normed queries, then each layer's output
    attentions: tuple[Tensor, ...] | None  # self-attention weights per layer
    cross_attentions: tuple[Tensor, ...] | None  # per layer that has cross-attention
    present: tuple[tuple[Tensor, Tensor], ...] | None  # self-attention keys / values when asked


def self_attention_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) or (B, T, T) of 1/0 -> additive mask; the reference uses -10000 here, not -inf."""
    keep = keep[:, None, None, :] if keep.dim() == 2 else keep[:, None, :, :]
    return (1.0 - keep.to(dtype)) * -10000.0


def image_attention_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, N) of 1/0 -> additive (B, 1, 1, N) with the dtype's most negative value."""
    keep = keep[:, None, None, :] if keep.dim() == 2 else keep[:, None, :, :]
    return (1.0 - keep.to(dtype)) * torch.finfo(dtype).min


class SelfAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.dropout = cfg.attention_probs_dropout_prob
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, mask, head_mask=None, need_weights=False, past=None):
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, T, d)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        dropout = self.dropout if self.training else 0.0
        ctx, weights = attend(q, k, v, mask, dropout_p=dropout, need_weights=need_weights, head_mask=head_mask)
        return self.out(merge_heads(ctx)), weights, (k, v)


class CrossAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.dropout = cfg.attention_probs_dropout_prob
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(cfg.encoder_hidden_size, 2 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, image, mask, head_mask=None, need_weights=False):
        q = split_heads(self.q(x), self.num_heads)  # (B, H, Q, d)
        k, v = (split_heads(t, self.num_heads) for t in self.kv(image).chunk(2, dim=-1))  # (B, H, N, d)
        dropout = self.dropout if self.training else 0.0
        ctx, weights = attend(q, k, v, mask, dropout_p=dropout, need_weights=need_weights, head_mask=head_mask)
        return self.out(merge_heads(ctx)), weights


class FeedForward(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class QFormerLayer(nn.Module):
    def __init__(self, cfg, has_cross_attention: bool) -> None:
        super().__init__()
        eps, self.dropout = cfg.layer_norm_eps, cfg.hidden_dropout_prob
        self.self_attn = SelfAttention(cfg)
        self.self_norm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.cross_attn = CrossAttention(cfg)
            self.cross_norm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.mlp = FeedForward(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        if getattr(cfg, "use_qformer_text_input", False):
            # Text tokens get their own feed-forward (BERT's); queries keep `mlp` (the *_query modules).
            self.text_mlp = FeedForward(cfg)
            self.text_mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=eps)

    def residual(self, norm: nn.LayerNorm, h: Tensor, x: Tensor) -> Tensor:
        """BERT's post-LN residual: LN(dropout(h) + x)."""
        return norm(dropout(h, self.dropout, self.training) + x)

    def forward(self, x, self_mask, image, image_mask, head_mask=None, need_weights=False, past=None):
        h, self_w, present = self.self_attn(x, self_mask, head_mask, need_weights, past)
        x = self.residual(self.self_norm, h, x)
        cross_w = None
        if self.has_cross_attention:
            if image is None:
                raise ValueError("this Q-Former layer cross-attends: encoder_hidden_states must be given")
            h, cross_w = self.cross_attn(x, image, image_mask, head_mask, need_weights)
            x = self.residual(self.cross_norm, h, x)
        x = self.residual(self.mlp_norm, self.mlp(x), x)
        return x, self_w, cross_w, present

    def forward_joint(self, x, num_queries: int, self_mask, image, image_mask, need_weights=False, past=None):
        """x = [queries; text] (B, Q + T, D): one self-attention over both (the mask says who sees
        whom), cross-attention for the queries only, and each part through its own feed-forward."""
        h, self_w, present = self.self_attn(x, self_mask, None, need_weights, past)
        x = self.residual(self.self_norm, h, x)
        q, t = x[:, :num_queries], x[:, num_queries:]  # (B, Q, D), (B, T, D)
        cross_w = None
        if num_queries and self.has_cross_attention:
            if image is None:
                raise ValueError("this Q-Former layer cross-attends: the image features must be given")
            h, cross_w = self.cross_attn(q, image, image_mask, None, need_weights)
            q = self.residual(self.cross_norm, h, q)
        q = self.residual(self.mlp_norm, self.mlp(q), q)
        if t.shape[1]:
            if not hasattr(self, "text_mlp"):
                raise ValueError("text input needs a Q-Former built with use_qformer_text_input=True")
            t = self.residual(self.text_mlp_norm, self.text_mlp(t), t)
        return torch.cat([q, t], dim=1), self_w, cross_w, present


class QFormer(nn.Module):
    checkpointing: dict | None = None  # torch checkpoint kwargs while gradient checkpointing is on

    def __init__(self, cfg) -> None:
        super().__init__()
        check_config(cfg)
        self.config = cfg
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, n % cfg.cross_attention_frequency == 0) for n in range(cfg.num_hidden_layers)
        )

    def forward(
        self,
        queries: Tensor,
        image: Tensor | None,
        attention_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        head_mask: Tensor | None = None,
        past: tuple | None = None,
        use_cache: bool = False,
        need_hidden: bool = False,
        need_weights: bool = False,
    ) -> QFormerOutput:
        """queries (B, Q, D), image (B, N, Dv) -> QFormerOutput; masks are 1/0 keep-masks."""
        x, self_mask, cross_mask = self._inputs(queries, attention_mask, image, image_mask, past)
        head_masks = per_layer_head_mask(head_mask, len(self.layers), x.dtype)

        def step(n, layer, x, layer_past):
            return layer(x, self_mask, image, cross_mask, head_masks[n], need_weights, layer_past)

        return self._run(x, step, past, queries_present=True, use_cache=use_cache, need_hidden=need_hidden,
                         need_weights=need_weights)

    def forward_joint(
        self,
        embeds: Tensor,
        num_queries: int,
        attention_mask: Tensor | None = None,
        image: Tensor | None = None,
        image_mask: Tensor | None = None,
        past: tuple | None = None,
        use_cache: bool = False,
        need_hidden: bool = False,
        need_weights: bool = False,
    ) -> QFormerOutput:
        """Queries and text together: embeds = [queries; text embeddings] (B, Q + T, D).

        num_queries = 0 is the text encoder (ITC), Q with text is image-text matching (ITM).
        attention_mask is a 1/0 keep-mask: (B, S) for bidirectional attention with padding, or
        (B, Q + T, S) for any other pattern (ITG's `multimodal_causal_mask`); S counts `past`
        positions (the queries' cached keys and values when ITG runs the text alone) first.
        """
        x, self_mask, cross_mask = self._inputs(embeds, attention_mask, image, image_mask, past)

        def step(n, layer, x, layer_past):
            return layer.forward_joint(x, num_queries, self_mask, image, cross_mask, need_weights, layer_past)

        return self._run(x, step, past, queries_present=num_queries > 0, use_cache=use_cache,
                         need_hidden=need_hidden, need_weights=need_weights)

    def _inputs(self, embeds: Tensor, attention_mask, image, image_mask, past) -> tuple[Tensor, Tensor, Tensor | None]:
        """The input norm and dropout, and both additive masks (self, cross; the latter None without an image)."""
        x = dropout(self.layernorm(embeds), self.config.hidden_dropout_prob, self.training)
        B, T, _ = x.shape
        past_len = past[0][0].shape[2] if past is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + T, device=x.device)
        cross_mask = None
        if image is not None:
            if image_mask is None:
                image_mask = torch.ones(image.shape[:2], device=x.device)
            cross_mask = image_attention_mask(image_mask, x.dtype)
        return x, self_attention_mask(attention_mask, x.dtype), cross_mask

    def _run(self, x: Tensor, step, past, *, queries_present: bool, use_cache: bool, need_hidden: bool,
             need_weights: bool) -> QFormerOutput:
        """Every layer in turn; step(n, layer, x, layer_past) -> (x, self_w, cross_w, present).
        Cross-attention weights exist only for layers that have it and only when queries are present."""
        hidden = [x] if need_hidden else None
        self_ws, cross_ws, presents = [], [], []
        for n, layer in enumerate(self.layers):
            x, sw, cw, present = run_layer(self, step, n, layer, x, past[n] if past is not None else None)
            if need_hidden:
                hidden.append(x)
            self_ws.append(sw)
            if layer.has_cross_attention and queries_present:
                cross_ws.append(cw)
            presents.append(present)
        return QFormerOutput(
            x,
            tuple(hidden) if need_hidden else None,
            tuple(self_ws) if need_weights else None,
            tuple(cross_ws) if need_weights else None,
            tuple(presents) if use_cache else None,
        )


def check_config(cfg) -> None:
    """What this Q-Former can build (the reference's config accepts these values; its model
    fails or, for relative positions, does what no BLIP-2 checkpoint uses)."""
    check_heads(cfg, cfg.hidden_size, cfg.num_attention_heads)
    if cfg.cross_attention_frequency < 1:
        raise ValueError(f"Blip2QFormerConfig: cross_attention_frequency must be >= 1, got {cfg.cross_attention_frequency}")
    if cfg.position_embedding_type != "absolute":
        raise ValueError(
            "Blip2QFormerConfig: only position_embedding_type='absolute' is supported "
            f"(got {cfg.position_embedding_type!r}); no BLIP-2 checkpoint uses another"
        )


def per_layer_head_mask(head_mask: Tensor | None, num_layers: int, dtype) -> list[Tensor | None]:
    """(H,) or (L, H) of 1/0 -> per layer (1, H, 1, 1), as transformers' head masks broadcast."""
    if head_mask is None:
        return [None] * num_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None].expand(num_layers, -1)
    if head_mask.dim() != 2 or head_mask.shape[0] != num_layers:
        raise ValueError(f"head_mask must have shape (heads,) or ({num_layers}, heads), got {tuple(head_mask.shape)}")
    return [m.to(dtype)[None, :, None, None] for m in head_mask]


# ---------------------------------------------------------------- the text side (retrieval, stage 1)
class TextEmbeddings(nn.Module):
    """BERT-style word + absolute position embeddings for the Q-Former's text tokens.

    BERT's embedding LayerNorm and dropout are the Q-Former's own input `layernorm` and dropout,
    shared by queries and text, which is why checkpoints hold that norm once (`qformer.layernorm`).
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        self.max_positions = cfg.max_position_embeddings
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """(B, T) token ids -> (B, T, D); positions count from 0 (text is right-padded)."""
        T = input_ids.shape[1]
        if position_ids is None:
            if T > self.max_positions:
                raise ValueError(f"text of {T} tokens is longer than max_position_embeddings {self.max_positions}")
            position_ids = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        return self.word(input_ids) + self.position(position_ids)


def multimodal_causal_mask(num_queries: int, text_keep: Tensor) -> Tensor:
    """The ITG mask: queries see all queries (never the text); text sees all queries and the
    text up to itself, minus padding.

    text_keep (B, T) of 1/0 -> keep-mask (B, Q + T, Q + T) of 1/0 in text_keep's dtype.
    """
    B, T = text_keep.shape
    S = num_queries + T
    pos = torch.arange(S, device=text_keep.device)
    row, col = pos[:, None], pos[None, :]  # (S, 1), (1, S)
    allowed = torch.where(row < num_queries, col < num_queries, col <= row)  # (S, S)
    keep_cols = torch.cat([text_keep.new_ones(B, num_queries), text_keep], dim=1).bool()  # (B, S)
    return (allowed[None] & keep_cols[:, None, :]).to(text_keep.dtype)


class TextLMHead(nn.Module):
    """BERT's language-model head for image-grounded text generation (ITG): dense -> act ->
    LayerNorm, then the word embeddings (tied, passed in) plus a per-token bias."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        """(B, T, D), (V, D) -> logits (B, T, V)"""
        return F.linear(self.norm(self.act(self.dense(hidden))), word_embeddings, self.bias)
