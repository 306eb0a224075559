"""Stop strings: a request's answer ends where one of its `stop` strings first appears in the
decoded text, and the stop string (with anything after it) is cut from what the client gets.

The check runs on the text, not on token ids, because one string can be spelled by many token
sequences. Both batchers use these helpers: the continuous scheduler ends a row at the token whose
text first holds a stop string; the micro-batcher cuts each row after its batch (a streamed
request, a batch of one, ends at that token too). A stream holds back a tail that might still
become a stop string, so the client never sees part of one.
"""

from __future__ import annotations

from typing import Callable, Sequence

MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 64


class StopReached(Exception):
    """A streamed generation's text reached a stop string: its generate call ends here."""


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [at for at in (text.find(s) for s in stops) if at >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` might begin a stop string (so may not be shown yet)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def stop_length(decode: Callable[[list[int]], str], tokens: list[int], stops: Sequence[str]) -> int | None:
    """The fewest leading tokens whose text holds a stop string, or None when the whole text holds none."""
    if not stops or first_stop(decode(tokens), stops) is None:
        return None
    return next(n for n in range(1, len(tokens) + 1) if first_stop(decode(tokens[:n]), stops) is not None)


class StopFilter:
    """Passes streamed text pieces on to `emit`, up to the first stop string; a tail that might begin
    one waits for the next piece (or the end)."""

    def __init__(self, stops: Sequence[str], emit: Callable[[str, bool], None]) -> None:
        self.stops, self.emit = tuple(stops), emit
        self.text = ""  # everything received
        self.shown = 0  # characters of it passed on
        self.stopped = False

    def __call__(self, piece: str, final: bool) -> None:
        if self.stopped:
            return
        self.text += piece
        cut = first_stop(self.text, self.stops)
        if cut is not None:
            self.stopped, end = True, cut
        else:
            end = len(self.text) - (0 if final else held_back(self.text, self.stops))
        piece = self.text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        if piece or final or self.stopped:
            self.emit(piece, final or self.stopped)
