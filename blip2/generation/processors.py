"""Score processors: small functions over (N, V) scores and the (N, L) token history.

`process` applies the penalties and length constraints, `warp` the sampling filters, each in
the order transformers 4.37 applies them, so the numbers agree with the reference bit for bit.
Functions may modify `scores` in place and return it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import GenerationConfig

NEG_INF = -float("inf")


def repetition_penalty(scores: Tensor, history: Tensor, penalty: float) -> Tensor:
    """Makes every token already in `history` less likely: negative scores are multiplied, positive divided."""
    seen = scores.gather(1, history)  # (N, L)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter_(1, history, seen)


def no_repeat_ngram(scores: Tensor, history: Tensor, n: int) -> Tensor:
    """Bans every token that would complete an n-gram already present in the row's history."""
    N, L = history.shape
    if L < n:
        return scores  # no complete n-gram yet
    windows = history.unfold(1, n, 1)  # (N, L - n + 1, n): every n-gram so far
    prefix = history[:, L - n + 1 :]  # (N, n - 1): the n-1 tokens the next one would extend
    hit = (windows[:, :, :-1] == prefix[:, None, :]).all(dim=-1)  # (N, L - n + 1)
    rows, starts = hit.nonzero(as_tuple=True)  # each earlier occurrence of the prefix
    banned = torch.zeros_like(scores, dtype=torch.bool)
    banned[rows, windows[rows, starts, -1]] = True  # the token that followed it
    return scores.masked_fill_(banned, NEG_INF)


def forbid_eos(scores: Tensor, eos_ids: list[int]) -> Tensor:
    scores[:, eos_ids] = NEG_INF
    return scores


def force(scores: Tensor, token_ids: list[int]) -> Tensor:
    """Leaves only `token_ids` possible (score 0), everything else -inf."""
    scores.fill_(NEG_INF)
    scores[:, token_ids] = 0.0
    return scores


def temperature(scores: Tensor, t: float) -> Tensor:
    return scores / t


def top_k(scores: Tensor, k: int, min_keep: int = 1) -> Tensor:
    """Keeps the k best scores of each row (ties with the k-th are kept too)."""
    k = min(max(k, min_keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1:]  # (N, 1)
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p(scores: Tensor, p: float, min_keep: int = 1) -> Tensor:
    """Keeps the smallest set of best tokens whose probability reaches p (nucleus sampling)."""
    ascending, order = torch.sort(scores, descending=False)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)  # (N, V): mass of this token and all worse ones
    drop = mass_below <= (1 - p)
    drop[..., -min_keep:] = False
    drop = drop.scatter(1, order, drop)  # back to vocabulary order
    return scores.masked_fill(drop, NEG_INF)


def process(scores: Tensor, history: Tensor, config: GenerationConfig, start_len: int) -> Tensor:
    """Penalties and length constraints, in the reference's order. history: (N, L) tokens so far."""
    if config.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, history, config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        scores = no_repeat_ngram(scores, history, config.no_repeat_ngram_size)
    eos = config.eos_ids
    if eos:
        length = history.shape[1]
        if config.min_length > 0 and length < config.min_length:
            scores = forbid_eos(scores, eos)
        if config.min_new_tokens and length - start_len < config.min_new_tokens:
            scores = forbid_eos(scores, eos)
    if config.forced_bos_token_id is not None and history.shape[1] == 1:
        scores = force(scores, [config.forced_bos_token_id])
    if config.forced_eos_token_id is not None and history.shape[1] == config.total_length(start_len) - 1:
        forced = config.forced_eos_token_id
        scores = force(scores, [forced] if isinstance(forced, int) else forced)
    return scores


def warp(scores: Tensor, config: GenerationConfig, min_keep: int = 1) -> Tensor:
    """Sampling filters, in the reference's order: temperature, top-k, top-p."""
    if config.temperature != 1.0:
        scores = temperature(scores, config.temperature)
    if config.top_k:
        scores = top_k(scores, config.top_k, min_keep)
    if config.top_p < 1.0:
        scores = top_p(scores, config.top_p, min_keep)
    return scores


def is_active(config: GenerationConfig) -> bool:
    """Whether `process` would touch the scores at all (lets the loops skip the history slice)."""
    return (
        config.repetition_penalty != 1.0
        or config.no_repeat_ngram_size > 0
        or (bool(config.eos_ids) and (config.min_length > 0 or bool(config.min_new_tokens)))
        or config.forced_bos_token_id is not None
        or config.forced_eos_token_id is not None
    )
