"""T5 / Flan-T5: an encoder-decoder with RMS norms and a learned relative position bias.

What sets T5 apart from the other transformers here:
- norms rescale by the root mean square only (no mean, no bias);
- attention scores are not divided by sqrt(d): the initialisation accounts for it;
- positions enter only as a per-head bias on the scores, looked up by the bucketed
  distance between query and key; the first layer of each stack owns the table and
  every layer of that stack adds the same bias;
- Flan-T5 (T5 v1.1) uses a gated GELU feed-forward, the original T5 a plain ReLU one;
- with tied embeddings the decoder output is scaled by d_model**-0.5 before the head.

float16: T5 v1.1's feed-forward outputs overflow float16. Like the reference we keep
`wo` in float32 (see `keep_in_fp32`) and cast its input up; the residual stream is then
carried in float32 from the first feed-forward on, while attention and the other
projections run in float16. Where the residual stream is float16 anyway (a model
converted wholesale with `.half()`), infinities are clamped back to finite values.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activation, dropout
from .attention import KVCache, Positions, attend, merge_heads, padding_mask, split_heads
from .checkpointing import run_layer
from .init import normal_rows_

# Labels with this value do not count towards the loss (the reference's convention).
IGNORE_INDEX = -100


class EncoderOutput(NamedTuple):
    last_hidden_state: Tensor  # (B, S, D)
    hidden_states: tuple[Tensor, ...] | None  # the input of each layer, then the final output
    attentions: tuple[Tensor, ...] | None  # (B, H, S, S) per layer


class DecoderOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    hidden_states: tuple[Tensor, ...] | None  # the input of each layer, then the final output
    attentions: tuple[Tensor, ...] | None  # self-attention, (B, H, T, filled + T) per layer
    cross_attentions: tuple[Tensor, ...] | None  # (B, H, T, S) per layer


class T5Output(NamedTuple):
    loss: Tensor | None
    logits: Tensor
    encoder: EncoderOutput
    decoder: DecoderOutput
    cache: "T5Cache | None"  # the decoder's keys and values, when asked for


# ---------------------------------------------------------------- small pieces
class RMSNorm(nn.Module):
    """Scales by the root mean square (computed in float32); no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        # Half-precision weights bring the result back to their dtype; the residual
        # stream itself may stay float32 (see the module docstring).
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def clamp_inf(x: Tensor) -> Tensor:
    """In float16, pulls infinities back to just below the largest finite value so the
    next norm sees numbers (the reference's rule; a no-op when nothing overflowed)."""
    if x.dtype != torch.float16:
        return x
    biggest = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), biggest - 1000, biggest)  # no host sync
    return x.clamp(-limit, limit)


def relative_position_bucket(relative: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """Maps `key_pos - query_pos` to a bucket in [0, num_buckets).

    Half of the buckets hold exact small distances, the rest grow logarithmically up to
    `max_distance`, beyond which everything shares the last bucket. The encoder
    (bidirectional) gives keys after the query their own half of the buckets; the
    decoder only ever sees keys at or before the query.
    """
    if bidirectional:
        num_buckets //= 2
        bucket = (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        bucket = torch.zeros_like(relative)
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    # Clamping keeps log() finite for small distances, which take the exact branch anyway.
    far = distance.clamp(min=exact).float()
    log_bucket = exact + (
        torch.log(far / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention scores."""

    counts_as_embedding = True  # the reference holds this table in an nn.Embedding (num_parameters)

    def __init__(self, cfg, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.weight = nn.Parameter(torch.randn(self.num_buckets, cfg.num_heads) * cfg.d_model**-0.5)

    def forward(self, q_pos: Tensor, k_len: int) -> Tensor:
        """Queries at positions q_pos (B, T) (B = 1: every row alike), keys at [0, k_len) -> (B, H, T, k_len).

        A tensor rather than a start int, so rows of one batch may sit at their own positions
        (continuous batching: each row is at its own step)."""
        k_pos = torch.arange(k_len, device=q_pos.device)
        relative = k_pos[None, None, :] - q_pos[:, :, None]  # (B, T, k_len)
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return F.embedding(buckets, self.weight).permute(0, 3, 1, 2)  # (B, T, k_len, H) -> (B, H, T, k_len)

    def span(self, q_start: int, q_len: int, k_len: int) -> Tensor:
        """Every row's queries at [q_start, q_start + q_len) -> (1, H, q_len, k_len)."""
        return self(torch.arange(q_start, q_start + q_len, device=self.weight.device)[None], k_len)


class SelfAttention(nn.Module):
    """Fused q/k/v, no biases, unscaled scores. The first layer also holds the position table."""

    def __init__(self, cfg, rel_bias: RelativePositionBias | None) -> None:
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout_rate
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=False)
        self.rel_bias = rel_bias

    def forward(self, x: Tensor, mask: Tensor, layer: int, cache: KVCache | None, need_weights: bool,
                slots: Tensor | None = None):
        """`slots`: where the cache takes the new keys and values (see `Positions`)."""
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, T, d_kv)
        if cache is not None:
            k, v = cache.write(layer, k, v, slots, mask.shape[-1])  # (B, H, filled + T, d_kv)
        dropout = self.dropout if self.training else 0.0
        # T5 does not scale attention scores.
        out, weights = attend(q, k, v, mask, scale=1.0, dropout_p=dropout, need_weights=need_weights)
        return self.out(merge_heads(out)), weights


class CrossAttention(nn.Module):
    """Decoder queries over the encoder output; keys and values can be projected once."""

    def __init__(self, cfg) -> None:
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout_rate
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * inner, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=False)

    def project_kv(self, encoder_hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, D) -> keys and values, each (B, H, S, d_kv)."""
        k, v = self.kv(encoder_hidden).chunk(2, dim=-1)
        return split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor, need_weights: bool):
        q = split_heads(self.q(x), self.num_heads)  # (B, H, T, d_kv)
        dropout = self.dropout if self.training else 0.0
        out, weights = attend(q, k, v, mask, scale=1.0, dropout_p=dropout, need_weights=need_weights)
        return self.out(merge_heads(out)), weights


def input_of(wo: nn.Module, h: Tensor) -> Tensor:
    """h in the dtype of wo's weight: wo may be kept in float32 (the reference keeps T5's wo so).
    A wo without a floating-point weight (int8 / int4 weight-only) takes h as it is."""
    weight = getattr(wo, "weight", None)
    return h.to(weight.dtype) if isinstance(weight, Tensor) and weight.is_floating_point() else h


class FeedForward(nn.Module):
    """wo(act(wi x)): the original T5 (ReLU)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = activation(cfg.dense_act_fn)
        self.dropout = cfg.dropout_rate

    def forward(self, x: Tensor) -> Tensor:
        h = dropout(self.act(self.wi(x)), self.dropout, self.training)
        return self.wo(input_of(self.wo, h))


class GatedFeedForward(nn.Module):
    """wo(act(wi_0 x) * wi_1 x): T5 v1.1 and Flan-T5 (gated GELU). wi holds wi_0 and wi_1 stacked."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = activation(cfg.dense_act_fn)
        self.dropout = cfg.dropout_rate

    def forward(self, x: Tensor) -> Tensor:
        gate, linear = self.wi(x).chunk(2, dim=-1)  # (B, T, d_ff) each
        h = dropout(self.act(gate) * linear, self.dropout, self.training)
        return self.wo(input_of(self.wo, h))


def feed_forward(cfg) -> nn.Module:
    return GatedFeedForward(cfg) if cfg.is_gated_act else FeedForward(cfg)


# ---------------------------------------------------------------- the two stacks
class EncoderLayer(nn.Module):
    def __init__(self, cfg, rel_bias: RelativePositionBias | None) -> None:
        super().__init__()
        self.dropout = cfg.dropout_rate
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.attn = SelfAttention(cfg, rel_bias)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.mlp = feed_forward(cfg)

    def forward(self, x: Tensor, mask: Tensor, need_weights: bool):
        h, weights = self.attn(self.attn_norm(x), mask, 0, None, need_weights)
        x = clamp_inf(x + dropout(h, self.dropout, self.training))
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)
        return clamp_inf(x), weights


class DecoderLayer(nn.Module):
    def __init__(self, cfg, rel_bias: RelativePositionBias | None) -> None:
        super().__init__()
        self.dropout = cfg.dropout_rate
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.attn = SelfAttention(cfg, rel_bias)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.cross_attn = CrossAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.mlp = feed_forward(cfg)

    def forward(self, x: Tensor, at: Positions, cross_kv: tuple[Tensor, Tensor], cross_mask: Tensor,
                layer: int, cache: KVCache | None, need_weights: bool):
        h, self_weights = self.attn(self.attn_norm(x), at.mask, layer, cache, need_weights, at.slots)
        x = clamp_inf(x + dropout(h, self.dropout, self.training))
        h, cross_weights = self.cross_attn(self.cross_norm(x), *cross_kv, cross_mask, need_weights)
        x = clamp_inf(x + dropout(h, self.dropout, self.training))
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)
        return clamp_inf(x), self_weights, cross_weights


class T5Encoder(nn.Module):
    checkpointing: dict | None = None  # torch checkpoint kwargs while gradient checkpointing is on

    def __init__(self, cfg) -> None:
        super().__init__()
        self.dropout = cfg.dropout_rate
        first = RelativePositionBias(cfg, bidirectional=True)
        self.layers = nn.ModuleList(EncoderLayer(cfg, first if n == 0 else None) for n in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: Tensor, keep: Tensor, need_hidden: bool, need_weights: bool) -> EncoderOutput:
        """x (B, S, D) embeddings; keep (B, S) of 1/0."""
        S = x.shape[1]
        bias = self.layers[0].attn.rel_bias.span(0, S, S)  # (1, H, S, S)
        mask = bias + padding_mask(keep, bias.dtype)  # (B, H, S, S)
        x = dropout(x, self.dropout, self.training)
        hidden = [] if need_hidden else None
        weights = [] if need_weights else None
        for layer in self.layers:
            if need_hidden:
                hidden.append(x)
            x, w = run_layer(self, layer, x, mask, need_weights)
            if need_weights:
                weights.append(w)
        x = dropout(self.final_norm(x), self.dropout, self.training)
        if need_hidden:
            hidden.append(x)
        return EncoderOutput(x, _maybe_tuple(hidden), _maybe_tuple(weights))


class T5Cache:
    """Decoder state for generation.

    Self-attention keys and values go into a preallocated `KVCache`, one position per
    step. Cross-attention keys and values depend only on the encoder output, so they are
    projected once, when the cache is made, and reused at every step.
    """

    def __init__(self, self_kv: KVCache, cross_kv: list[tuple[Tensor, Tensor]], cross_mask: Tensor) -> None:
        self.self_kv = self_kv
        self.cross_kv = cross_kv  # per layer, (B, H, S, d_kv) each
        self.cross_mask = cross_mask  # additive, (B, 1, 1, S)
        self.source = torch.arange(cross_mask.shape[0], device=cross_mask.device)  # encoder row of each cache row

    @property
    def length(self) -> int:
        """How many decoder positions are filled."""
        return self.self_kv.length

    def reorder(self, index: Tensor) -> None:
        """Keeps batch rows `index` (beam search); the batch size may change (expansion for beams)."""
        self.self_kv.reorder(index)
        source = self.source[index]
        # Cross-attention rows depend only on their encoder row: when beams are merely
        # reordered among the beams of the same input, there is nothing to move.
        if not torch.equal(source, self.source):
            self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]
            self.cross_mask = self.cross_mask.index_select(0, index)
        self.source = source

    def rows(self, start: int, stop: int, width: int) -> "T5Cache":
        """A view of batch rows [start, stop) whose writes land in this cache, cross-attending over the
        first `width` encoder positions (continuous batching runs a step over the rows in use)."""
        view = object.__new__(T5Cache)
        view.self_kv = self.self_kv.rows(start, stop)
        view.cross_kv = [(k[start:stop, :, :width], v[start:stop, :, :width]) for k, v in self.cross_kv]
        view.cross_mask = self.cross_mask[start:stop, :, :, :width]
        view.source = self.source[start:stop]
        return view

    def put_rows(self, start: int, cross_kv: list[tuple[Tensor, Tensor]], cross_mask: Tensor) -> None:
        """Rows [start, start + k) take new encoder rows (`T5Decoder.cross_state` of k inputs):
        keys and values (k, H, S, d_kv) per layer, mask (k, 1, 1, S); their positions past S are hidden."""
        k, S = cross_mask.shape[0], cross_mask.shape[-1]
        rows = slice(start, start + k)
        for (mine_k, mine_v), (new_k, new_v) in zip(self.cross_kv, cross_kv):
            mine_k[rows, :, :S] = new_k
            mine_v[rows, :, :S] = new_v
        self.cross_mask[rows] = torch.finfo(self.cross_mask.dtype).min
        self.cross_mask[rows, :, :, :S] = cross_mask

    def nbytes(self) -> int:
        cross = sum(t.element_size() * t.numel() for kv in self.cross_kv for t in kv)
        return self.self_kv.nbytes() + cross + self.cross_mask.element_size() * self.cross_mask.numel()

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Row `target` takes row `source`: its first `length` decoder slots and its encoder rows."""
        self.self_kv.copy_row(source, target, length)
        for k, v in self.cross_kv:
            k[target] = k[source]
            v[target] = v[source]
        self.cross_mask[target] = self.cross_mask[source]

    def per_layer(self) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], ...]:
        """(self k, self v, cross k, cross v) per layer, filled positions only: the reference's past_key_values."""
        n = self.length
        return tuple(
            (k[:, :, :n], v[:, :, :n], ck, cv)
            for k, v, (ck, cv) in zip(self.self_kv.k, self.self_kv.v, self.cross_kv)
        )


class T5Decoder(nn.Module):
    checkpointing: dict | None = None  # torch checkpoint kwargs while gradient checkpointing is on

    def __init__(self, cfg) -> None:
        super().__init__()
        self.dropout = cfg.dropout_rate
        first = RelativePositionBias(cfg, bidirectional=False)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, first if n == 0 else None) for n in range(cfg.num_decoder_layers)
        )
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype attention runs in (that of the weights, whatever the residual stream's)."""
        return self.final_norm.weight.dtype

    def cross_state(self, encoder_hidden: Tensor, encoder_keep: Tensor):
        """Cross-attention keys and values for every layer, and the additive encoder mask."""
        kv = [layer.cross_attn.project_kv(encoder_hidden) for layer in self.layers]
        return kv, padding_mask(encoder_keep, self.dtype)

    def forward(self, x: Tensor, keep: Tensor | None, cross_kv, cross_mask: Tensor, cache: KVCache | None,
                need_hidden: bool, need_weights: bool, positions: Positions | None = None):
        """x (B, T, D) embeddings of new tokens; keep (B, filled + T) of 1/0 over cache and new tokens.

        With `positions` (continuous batching: each row at its own step) the mask, the cache slots
        and each row's query positions come from there, `keep` is not read and the caller keeps count."""
        T = x.shape[1]
        rel_bias = self.layers[0].attn.rel_bias
        if positions is None:
            start = cache.length if cache is not None else 0
            # Relative positions count from the first decoder token, so a cached step at
            # position `start` sees the same bias as row `start` of a full forward.
            bias = rel_bias.span(start, T, start + T)  # (1, H, T, start + T)
            at = Positions.after(keep, T, bias.dtype)
        else:  # a decoder has no padding: a token's position is its slot
            at = positions
            bias = rel_bias(at.ids, at.mask.shape[-1])  # (B, H, T, S): each row's own
        at = at._replace(mask=bias + at.mask)  # (B, H, T, S)
        x = dropout(x, self.dropout, self.training)
        hidden = [] if need_hidden else None
        weights = [] if need_weights else None
        cross_weights = [] if need_weights else None
        for n, layer in enumerate(self.layers):
            if need_hidden:
                hidden.append(x)
            x, w, cw = run_layer(self, layer, x, at, cross_kv[n], cross_mask, n, cache, need_weights)
            if need_weights:
                weights.append(w)
                cross_weights.append(cw)
        if cache is not None and positions is None:
            cache.advance(T)
        x = dropout(self.final_norm(x), self.dropout, self.training)
        if need_hidden:
            hidden.append(x)
        return x, _maybe_tuple(hidden), _maybe_tuple(weights), _maybe_tuple(cross_weights)


def _maybe_tuple(items: list | None) -> tuple | None:
    return tuple(items) if items is not None else None


# ---------------------------------------------------------------- the model
class T5LanguageModel(nn.Module):
    """T5 encoder-decoder with a language-modelling head. Tensors in, tensors out."""

    # Modules kept in float32 when loading in float16 (their outputs overflow).
    keep_in_fp32 = ("wo",)
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, cfg) -> None:
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Encoder(cfg)
        self.decoder = T5Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    @torch.no_grad()
    def init_weights_(self) -> None:
        """Mesh TensorFlow's rule, as the reference draws T5: each projection's std is
        initializer_factor / sqrt(its fan-in), queries also / sqrt(d_kv) (scores are not scaled)."""
        cfg = self.config
        f, d, inner = cfg.initializer_factor, cfg.d_model, cfg.num_heads * cfg.d_kv
        nn.init.normal_(self.shared.weight, 0.0, f)
        if not cfg.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, f)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.constant_(m.weight, f)
            elif isinstance(m, SelfAttention):
                normal_rows_(m.qkv.weight, [(inner, f * (d * cfg.d_kv) ** -0.5), (2 * inner, f * d**-0.5)])
                nn.init.normal_(m.out.weight, 0.0, f * inner**-0.5)
            elif isinstance(m, CrossAttention):
                nn.init.normal_(m.q.weight, 0.0, f * (d * cfg.d_kv) ** -0.5)
                nn.init.normal_(m.kv.weight, 0.0, f * d**-0.5)
                nn.init.normal_(m.out.weight, 0.0, f * inner**-0.5)
            elif isinstance(m, RelativePositionBias):
                nn.init.normal_(m.weight, 0.0, f * d**-0.5)
            elif isinstance(m, (FeedForward, GatedFeedForward)):
                nn.init.normal_(m.wi.weight, 0.0, f * d**-0.5)
                nn.init.normal_(m.wo.weight, 0.0, f * cfg.d_ff**-0.5)

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, d_model); shared by encoder and decoder."""
        return self.shared(input_ids)

    def encode(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
               need_hidden: bool = False, need_weights: bool = False) -> EncoderOutput:
        """inputs_embeds (B, S, D); attention_mask (B, S) of 1/0."""
        B, S, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=inputs_embeds.device)
        _check_mask(attention_mask, (B, S), "attention_mask")
        return self.encoder(inputs_embeds, attention_mask, need_hidden, need_weights)

    def new_cache(self, encoder_hidden: Tensor, encoder_mask: Tensor | None, max_len: int) -> T5Cache:
        """A decoder cache for up to `max_len` decoder positions, bound to one encoder output."""
        cfg = self.config
        B, S, _ = encoder_hidden.shape
        if encoder_mask is None:
            encoder_mask = torch.ones(B, S, dtype=torch.long, device=encoder_hidden.device)
        _check_mask(encoder_mask, (B, S), "encoder_mask")
        kv = KVCache(cfg.num_decoder_layers, B, cfg.num_heads, max_len, cfg.d_kv,
                     self.decoder.dtype, encoder_hidden.device)
        cross_kv, cross_mask = self.decoder.cross_state(encoder_hidden, encoder_mask)
        return T5Cache(kv, cross_kv, cross_mask)

    def new_slot_cache(self, rows: int, max_len: int, source_len: int, device=None) -> T5Cache:
        """An empty decoder cache for continuous batching: `rows` requests of up to `max_len` decoder
        positions and `source_len` encoder positions each, every encoder position hidden until
        `T5Cache.put_rows` fills a row."""
        cfg = self.config
        dtype, device = self.decoder.dtype, device or self.shared.weight.device
        kv = KVCache(cfg.num_decoder_layers, rows, cfg.num_heads, max_len, cfg.d_kv, dtype, device)
        shape = (rows, cfg.num_heads, source_len, cfg.d_kv)
        cross = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                 for _ in range(cfg.num_decoder_layers)]
        mask = torch.full((rows, 1, 1, source_len), torch.finfo(dtype).min, dtype=dtype, device=device)
        return T5Cache(kv, cross, mask)

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_hidden: Tensor | None = None,
        encoder_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        cache: T5Cache | None = None,
        need_hidden: bool = False,
        need_weights: bool = False,
        positions: Positions | None = None,
    ) -> DecoderOutput:
        """Logits for `decoder_input_ids` (B, T).

        Without a cache, attends over `encoder_hidden` (B, S, D) under `encoder_mask` (B, S).
        With one, the encoder output it was made from is used and the new tokens sit at
        positions [cache.length, cache.length + T); `decoder_attention_mask` then covers
        (B, cache.length + T). With `positions` too (each row at its own step: see
        `T5Decoder.forward`), `decoder_attention_mask` is not read.
        """
        B, T = decoder_input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is not None and cache is None:
            raise ValueError("decode with positions needs the cache they index")
        if positions is None:
            if decoder_attention_mask is None:
                decoder_attention_mask = torch.ones(B, start + T, dtype=torch.long, device=decoder_input_ids.device)
            _check_mask(decoder_attention_mask, (B, start + T), "decoder_attention_mask")
        if cache is not None:
            cross_kv, cross_mask = cache.cross_kv, cache.cross_mask
            self_kv = cache.self_kv
        else:
            if encoder_hidden is None:
                raise ValueError("decode needs encoder_hidden (or a cache made from it)")
            if encoder_mask is None:
                encoder_mask = torch.ones(encoder_hidden.shape[:2], dtype=torch.long, device=encoder_hidden.device)
            cross_kv, cross_mask = self.decoder.cross_state(encoder_hidden, encoder_mask)
            self_kv = None
        x, hidden, weights, cross_weights = self.decoder(
            self.embed(decoder_input_ids), decoder_attention_mask, cross_kv, cross_mask, self_kv,
            need_hidden, need_weights, positions,
        )
        if self.config.tie_word_embeddings:
            # With the head tied to the embeddings, the reference rescales first (Mesh TensorFlow's rule).
            x = x * self.config.d_model**-0.5
        return DecoderOutput(self.lm_head(x), hidden, weights, cross_weights)

    def shift_right(self, labels: Tensor) -> Tensor:
        """Teacher forcing: the decoder reads the labels one step late, starting from
        `decoder_start_token_id`; ignored positions (-100) become padding."""
        cfg = self.config
        shifted = labels.new_full(labels.shape, cfg.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == IGNORE_INDEX, cfg.pad_token_id)

    def check_labels(self, labels: Tensor, batch: int) -> None:
        vocab = self.config.vocab_size
        if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.shape[0] != batch:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must have shape ({batch}, length), got {shape}")
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
        if bad.any():
            raise ValueError(
                f"labels contain token id {labels[bad][0].item()}, outside the vocabulary [0, {vocab}) and not -100"
            )

    @staticmethod
    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the labels that are not -100.

        Computed in float32 (the reference uses the logits' dtype; the two agree in float32)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        need_hidden: bool = False,
        need_weights: bool = False,
        keep_cache: bool = False,
    ) -> T5Output:
        """Encode, then decode `decoder_input_ids` (or the labels shifted right) in one pass.

        `keep_cache` decodes through a fresh cache and returns it (to continue decoding from,
        or to report keys and values as the reference does).
        """
        if labels is not None:
            self.check_labels(labels, inputs_embeds.shape[0])
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5 needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        encoded = self.encode(inputs_embeds, attention_mask, need_hidden, need_weights)
        hidden = encoded.last_hidden_state
        cache = self.new_cache(hidden, attention_mask, decoder_input_ids.shape[1]) if keep_cache else None
        decoded = self.decode(decoder_input_ids, hidden, attention_mask, decoder_attention_mask, cache,
                              need_hidden, need_weights)
        loss = self.loss(decoded.logits, labels) if labels is not None else None
        return T5Output(loss, decoded.logits, encoded, decoded, cache)


class T5Stepper:
    """The generation step interface (see `blip2.generation.Stepper`) over T5.

    The encoder runs once at prefill and the cross-attention keys and values are projected
    once from its output; every step then feeds one decoder token into the cache.
    """

    def __init__(self, lm: T5LanguageModel, inputs_embeds: Tensor, attention_mask: Tensor | None,
                 max_new_tokens: int, start_ids: Tensor | None = None, shared_prefix: int = 0) -> None:
        # shared_prefix (rows that begin alike) is not used: the encoder reads each row whole.
        B = inputs_embeds.shape[0]
        if start_ids is None:
            start_ids = torch.full((B, 1), lm.config.decoder_start_token_id, dtype=torch.long,
                                   device=inputs_embeds.device)
        self.lm = lm
        self.embeds = inputs_embeds  # (B, S, D)
        self.mask = attention_mask  # (B, S)
        self.start_ids = start_ids  # (B, L0): what the decoder starts from, and generation's history
        self.max_len = start_ids.shape[1] + max_new_tokens
        self.cache: T5Cache | None = None

    # T5's relative positions set no length limit, so max_new_tokens alone could ask for any cache
    # size (10**9 tokens = terabytes): start with this many positions and grow as generation goes.
    FIRST_CACHE_LEN = 64

    def prefill(self) -> Tensor:
        encoded = self.lm.encode(self.embeds, self.mask).last_hidden_state
        first = min(self.max_len, self.start_ids.shape[1] + self.FIRST_CACHE_LEN)
        self.cache = self.lm.new_cache(encoded, self.mask, first)
        self.embeds = self.mask = None  # the cache holds all the encoder's output that is needed
        return self.lm.decode(self.start_ids, cache=self.cache).logits[:, -1]  # (B, V)

    def step(self, tokens: Tensor) -> Tensor:
        self.cache.self_kv.reserve(1, self.max_len)
        return self.lm.decode(tokens[:, None], cache=self.cache).logits[:, -1]

    def select(self, index: Tensor) -> None:
        self.cache.reorder(index)


def _check_mask(mask: Tensor, shape: tuple[int, int], name: str) -> None:
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {shape}")
