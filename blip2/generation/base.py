"""The interfaces the search functions run over: a model stepper and an optional streamer."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Stepper(Protocol):
    """One language model with its caches, advanced a token at a time.

    The model side owns everything expensive (image encoder, Q-Former, prompt prefill) and
    does it once per input row; search only sees logits and asks for rows to be kept or repeated.
    """

    def prefill(self) -> Tensor:
        """Runs the prompt; returns logits (B, V) for the first new token. Called once."""
        ...

    def step(self, tokens: Tensor) -> Tensor:
        """Appends tokens (B,) to every row; returns logits (B, V) for the next token."""
        ...

    def select(self, index: Tensor) -> None:
        """Keeps rows `index` (B',) of every cache, in that order: beam reordering, and expansion
        from B inputs to B * num_beams rows (an index may repeat)."""
        ...


class Streamer(Protocol):
    """Receives tokens as they are chosen (the reference's streamer protocol, so its streamers work too)."""

    def put(self, value: Tensor) -> None:
        """First call: the start ids (1, L0); then each new token (1,)."""
        ...

    def end(self) -> None:
        """Generation finished (or failed)."""
        ...
