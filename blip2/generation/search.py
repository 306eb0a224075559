"""Search over a Stepper: greedy, sampling and beam search with transformers 4.37 semantics.

Every function takes `start_ids` (B, L0), the history generation starts from (the BOS token
for a decoder-only model, the decoder start token for T5), and returns that history followed
by the new tokens: (B * num_return_sequences, L). Rows that finished early are padded with
`pad_token_id` (the first eos id when unset), as the reference pads them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .base import Stepper, Streamer
from .config import GenerationConfig
from .processors import is_active, process, warp


def generate(
    stepper: Stepper,
    start_ids: Tensor,
    config: GenerationConfig,
    streamer: Streamer | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Runs the search `config` asks for: beam search when num_beams > 1, sampling when do_sample."""
    config.validate()
    _check_start_ids(start_ids)
    config.total_length(start_ids.shape[1])  # fail before any model work when nothing fits
    if streamer is not None and config.num_beams > 1:
        raise ValueError("streaming needs num_beams=1: beam search only knows its result at the end")
    if config.num_beams > 1:
        return beam_search(stepper, start_ids, config, generator)
    if config.do_sample:
        return sample(stepper, start_ids, config, streamer, generator)
    return greedy(stepper, start_ids, config, streamer)


# ---- one token per row: greedy and sampling ----

def greedy(stepper: Stepper, start_ids: Tensor, config: GenerationConfig, streamer: Streamer | None = None) -> Tensor:
    """Takes the best-scoring token at every step."""
    return _token_loop(stepper, start_ids, config, lambda scores: torch.argmax(scores, dim=-1), streamer, copies=1)


def sample(
    stepper: Stepper,
    start_ids: Tensor,
    config: GenerationConfig,
    streamer: Streamer | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draws each token from the softmax of the filtered scores; num_return_sequences draws per input."""

    draw = _sampler(config, generator, groups=start_ids.shape[0])

    def choose(scores: Tensor) -> Tensor:
        probs = torch.softmax(warp(scores, config), dim=-1)
        return draw(probs, 1).squeeze(1)

    return _token_loop(stepper, start_ids, config, choose, streamer, copies=config.num_return_sequences)


# The history buffer starts this many positions past the start tokens and doubles when full,
# so max_new_tokens=10**9 costs what is generated, not what is allowed.
FIRST_HISTORY_LEN = 64


def _history(start: Tensor, total: int, pad: int | None) -> Tensor:
    """(N, min(total, L0 + FIRST_HISTORY_LEN)) filled with pad, the start ids in front."""
    N, L0 = start.shape
    ids = start.new_full((N, min(total, L0 + FIRST_HISTORY_LEN)), pad if pad is not None else 0)
    ids[:, :L0] = start
    return ids


def _room(ids: Tensor, cur: int, total: int, pad: int | None) -> Tensor:
    """`ids` with room at position `cur`: doubled (at most to `total`) when full."""
    if cur < ids.shape[1]:
        return ids
    size = min(total, max(cur + 1, 2 * ids.shape[1]))
    return torch.cat([ids, ids.new_full((ids.shape[0], size - ids.shape[1]), pad if pad is not None else 0)], dim=1)


def _token_loop(
    stepper: Stepper,
    start_ids: Tensor,
    config: GenerationConfig,
    choose: Callable[[Tensor], Tensor],
    streamer: Streamer | None,
    copies: int,
) -> Tensor:
    if streamer is not None and start_ids.shape[0] * copies != 1:
        raise ValueError(f"streaming works on one sequence at a time, got {start_ids.shape[0] * copies} rows")
    logits, start = _prefill(stepper, start_ids, copies)  # (N, V), (N, L0)
    N, L0 = start.shape
    total = config.total_length(L0)
    eos = _eos_tensor(config, logits.device)
    pad = config.resolved_pad_token_id
    ids = _history(start, total, pad)  # the history, written in place (grown as needed)
    unfinished = torch.ones(N, dtype=torch.bool, device=ids.device)
    processing = is_active(config)
    cur = L0
    if streamer is not None:
        streamer.put(start.cpu())  # the reference's protocol: the start ids first
    while True:
        scores = process(logits, ids[:, :cur], config, L0) if processing else logits
        tokens = choose(scores).to(ids.device)  # (N,)
        if eos is not None:
            tokens = torch.where(unfinished, tokens, pad)
            unfinished &= ~torch.isin(tokens, eos)
        ids = _room(ids, cur, total, pad)
        ids[:, cur] = tokens
        cur += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        if cur >= total or (eos is not None and not bool(unfinished.any())):
            break
        logits = stepper.step(tokens)
    if streamer is not None:
        streamer.end()  # not on errors: `run_in_thread` hands those to the reader instead
    return ids[:, :cur]


# ---- beam search ----

class BeamHypotheses:
    """The best finished hypotheses of one input, scored by log-probability / length ** length_penalty."""

    def __init__(self, size: int, length_penalty: float, early_stopping: bool | str, max_length: int) -> None:
        self.size = size
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length
        self.beams: list[tuple[float, Tensor]] = []  # (score, tokens), in the order they were added
        self.worst = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, tokens: Tensor, logprob: float, generated_len: int) -> None:
        score = logprob / generated_len**self.length_penalty
        if len(self.beams) < self.size or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.size:
                # Drop the worst; among equal scores the earliest added goes first.
                ranked = sorted((s, n) for n, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_logprob: float, cur_len: int, start_len: int) -> bool:
        """Whether no open beam can still beat the worst kept hypothesis."""
        if len(self.beams) < self.size:
            return False
        if self.early_stopping is True:
            return True
        length = cur_len - start_len
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            # A positive penalty favours length: the best reachable score uses the longest length.
            if self.max_length <= start_len:
                raise ValueError("max_length is not larger than the start length")
            length = self.max_length - start_len
        return self.worst >= best_logprob / length**self.length_penalty

    def best(self, n: int) -> list[Tensor]:
        """The n best hypotheses, best first (ties: the later added first, as the reference)."""
        ranked = sorted(self.beams, key=lambda item: item[0])
        return [ranked.pop()[1] for _ in range(n)]


def beam_search(
    stepper: Stepper,
    start_ids: Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Keeps num_beams candidates per input; with do_sample the candidates are drawn, not ranked."""
    nb = config.num_beams
    B = start_ids.shape[0]
    logits, start = _prefill(stepper, start_ids, nb)  # (B*nb, V), (B*nb, L0)
    N, L0 = start.shape
    device = logits.device
    total = config.total_length(L0)
    eos_ids = config.eos_ids
    eos = _eos_tensor(config, device)
    pad = config.resolved_pad_token_id
    ids = _history(start, total, pad)
    beam_scores = torch.zeros(B, nb, dtype=torch.float, device=device)
    if not config.do_sample:
        # Only the first beam of each input is live at the start; ranking the copies would repeat it.
        # (Beam sampling draws from all copies alike, as the reference does.)
        beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)  # (B*nb,)
    hyps = [BeamHypotheses(nb, config.length_penalty, config.early_stopping, total) for _ in range(B)]
    done = [False] * B
    first_row = torch.arange(B, device=device)[:, None] * nb  # (B, 1)
    if config.do_sample:
        k = 2 * nb
        min_keep = len(eos_ids) + 1 if isinstance(config.eos_token_id, list) else 2
    else:
        k = max(2, 1 + len(eos_ids)) * nb  # enough candidates that nb of them do not end
    processing = is_active(config)
    draw = _sampler(config, generator, groups=B) if config.do_sample else None
    cur = L0
    while True:
        scores = torch.log_softmax(logits, dim=-1)  # (N, V)
        if processing:
            scores = process(scores, ids[:, :cur], config, L0)
        V = scores.shape[-1]
        if config.do_sample:
            flat = (warp(scores, config, min_keep) + beam_scores[:, None]).view(B, nb * V)
            picks = draw(torch.softmax(flat, dim=-1), k)
            top_scores, order = torch.sort(flat.gather(1, picks), descending=True, dim=1)
            picks = picks.gather(1, order)
        else:
            flat = (scores + beam_scores[:, None]).view(B, nb * V)
            top_scores, picks = torch.topk(flat, k, dim=1, largest=True, sorted=True)  # (B, k)
        rows = torch.div(picks, V, rounding_mode="floor") + first_row  # (B, k): the beam each extends
        tokens = picks % V
        beam_scores, next_tokens, next_rows = _advance(
            hyps, done, Candidates(top_scores, tokens, rows), history=ids[:, :cur], start_len=L0,
            eos=eos, pad=pad, num_beams=nb,
        )
        ids = _room(ids, cur, total, pad)
        ids[:, :cur] = ids[:, :cur].index_select(0, next_rows)
        ids[:, cur] = next_tokens
        cur += 1
        if all(done) or cur >= total:
            break
        stepper.select(next_rows)
        logits = stepper.step(next_tokens)
    return _finalize(hyps, done, ids[:, :cur], L0, beam_scores, config, pad, eos_ids, total)


class Candidates(NamedTuple):
    """Continuations of the beams, per input best first: (B, k) each, or (B * nb,) once chosen."""

    scores: Tensor  # the beam's score plus the token's
    tokens: Tensor
    rows: Tensor  # the row (beam) each continues


def _advance(hyps: list[BeamHypotheses], done: list[bool], candidates: Candidates, *, history: Tensor,
             start_len: int, eos: Tensor | None, pad: int | None, num_beams: int) -> Candidates:
    """Moves finished candidates into the hypotheses and picks the beams that go on.

    `history` (B * nb, L) is every row so far, L - start_len of it generated. Returns the beams
    that go on, flattened to (B * nb,). Updates `hyps` and `done` (one flag per input) in place.
    """
    top_scores, tokens, rows = candidates
    nb = num_beams
    B, k = tokens.shape
    ends = torch.isin(tokens, eos) if eos is not None else torch.zeros_like(tokens, dtype=torch.bool)
    # The nb best candidates that do not end, in rank order (a stable sort puts them first).
    keep = torch.sort(ends.to(torch.int8), dim=1, stable=True).indices[:, :nb]  # (B, nb)
    next_scores = top_scores.gather(1, keep)
    next_tokens = tokens.gather(1, keep)
    next_rows = rows.gather(1, keep)
    was_done = list(done)
    cur_len = history.shape[1] + 1  # the length the candidates' scores were computed for
    # Only candidates ranked among the first nb may end a hypothesis.
    ending = ends[:, :nb].tolist()
    if any(map(any, ending)) or any(len(h) >= nb for h in hyps):
        short = (~ends).sum(dim=1) < nb
        scores_cpu = top_scores.tolist()
        for b in range(B):
            if was_done[b]:
                continue
            if short[b]:
                raise ValueError(f"fewer than {nb} of the {k} candidates of input {b} continue: too many eos ids")
            for j in range(nb):
                if ending[b][j]:
                    hyps[b].add(history[rows[b, j]].clone(), scores_cpu[b][j], cur_len - start_len)
            done[b] = hyps[b].is_done(scores_cpu[b][0], cur_len, start_len)
    if any(was_done):
        # Finished inputs keep running on padding; their rows are never read again.
        finished = torch.tensor(was_done, device=tokens.device)[:, None]  # (B, 1)
        next_scores = next_scores.masked_fill(finished, 0.0)
        next_tokens = next_tokens.masked_fill(finished, pad)
        next_rows = next_rows.masked_fill(finished, 0)
    return Candidates(next_scores.reshape(-1), next_tokens.reshape(-1), next_rows.reshape(-1))


def _finalize(hyps, done, history, start_len, beam_scores, config, pad, eos_ids, total) -> Tensor:
    """Adds the open beams of unfinished inputs, then lays out the best hypotheses, padded."""
    nb = config.num_beams
    final_scores = beam_scores.tolist()
    for b, h in enumerate(hyps):
        if done[b]:
            continue
        for j in range(nb):
            h.add(history[b * nb + j], final_scores[b * nb + j], history.shape[1] - start_len)
    best = [tokens for h in hyps for tokens in h.best(config.num_return_sequences)]
    lengths = [len(t) for t in best]
    width = min(max(lengths) + 1, total)
    if min(lengths) != max(lengths) and pad is None:
        raise ValueError("pad_token_id must be set to return hypotheses of different lengths")
    out = history.new_full((len(best), width), pad if pad is not None else 0)
    for i, tokens in enumerate(best):
        out[i, : len(tokens)] = tokens
        if len(tokens) < width and eos_ids:
            out[i, len(tokens)] = eos_ids[0]  # finished hypotheses were stored without their eos
    return out


# ---- shared pieces ----

def _prefill(stepper: Stepper, start_ids: Tensor, copies: int) -> tuple[Tensor, Tensor]:
    """Runs the prompt once per input, then repeats every row `copies` times (beams, samples)."""
    logits = stepper.prefill()  # (B, V)
    B = start_ids.shape[0]
    if logits.dim() != 2 or logits.shape[0] != B:
        raise ValueError(f"the stepper's prefill gave logits of shape {tuple(logits.shape)}, expected ({B}, vocab)")
    if copies > 1:
        rows = torch.arange(B, device=logits.device).repeat_interleave(copies)  # (B*copies,)
        stepper.select(rows)
        logits = logits.index_select(0, rows)
        start_ids = start_ids.index_select(0, rows.to(start_ids.device))
    return logits, start_ids


def _eos_tensor(config: GenerationConfig, device) -> Tensor | None:
    eos = config.eos_ids
    return torch.tensor(eos, dtype=torch.long, device=device) if eos else None


def _sampler(config: GenerationConfig, generator: torch.Generator | None, groups: int):
    """`draw(probs, n)`: n draws per row of probs (R, V), R = groups * copies.

    With `config.seed` every input (a group of consecutive rows: its samples or beams) draws
    from its own generator seeded with it, so an input draws what it draws alone, in any
    batch. Otherwise one stream serves the whole batch: the given generator, or the global RNG
    (what the reference does, so `torch.manual_seed` reproduces its draws).
    """
    if config.seed is None or generator is not None:
        return lambda probs, n: torch.multinomial(probs, num_samples=n, generator=generator)
    streams: list[torch.Generator] = []

    def draw(probs: Tensor, n: int) -> Tensor:
        if not streams:
            streams.extend(torch.Generator(device=probs.device).manual_seed(config.seed) for _ in range(groups))
        parts = probs.chunk(groups)  # consecutive rows belong to one input
        return torch.cat([torch.multinomial(p, num_samples=n, generator=g) for p, g in zip(parts, streams)])

    return draw


def _check_start_ids(start_ids: Tensor) -> None:
    if not isinstance(start_ids, Tensor) or start_ids.dim() != 2 or start_ids.dtype != torch.long:
        raise ValueError("start_ids must be a (batch, length) tensor of token ids (torch.long)")
    if start_ids.shape[1] == 0:
        raise ValueError("start_ids must hold at least one token (BOS or the decoder start token)")
