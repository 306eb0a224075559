"""Streaming: text pieces as tokens are produced, to an iterator (other thread) or a callback.

Both streamers speak the reference's streamer protocol (`put(tokens)`, `end()`), so they
plug into `generate(..., streamer=...)`. Text is decoded from all tokens so far and released
at word boundaries: a token may change how the previous ones decode (merged spaces,
multi-byte characters split over tokens), so the tail after the last space is held back.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

Decode = Callable[..., str]

_DONE = object()  # end-of-stream marker in the queue


class _PieceMaker:
    """Turns a stream of token ids into text pieces whose concatenation is the decoded text."""

    def __init__(self, decode: Decode | Any, skip_prompt: bool = True, **decode_kwargs: Any) -> None:
        self.decode = decode.decode if hasattr(decode, "decode") else decode  # a tokenizer works too
        if not callable(self.decode):
            raise TypeError("decode must be a function from token ids to text, or a tokenizer")
        self.decode_kwargs = decode_kwargs
        self.skip_prompt = skip_prompt
        self.seen_prompt = False
        self.ids: list[int] = []
        self.sent = 0  # characters of decode(self.ids) already released

    def put(self, value: Tensor) -> None:
        if isinstance(value, Tensor):
            if value.dim() > 1 and value.shape[0] > 1:
                raise ValueError("streamers take one sequence at a time (batch size 1)")
            tokens = value.reshape(-1).tolist()
        else:
            tokens = [int(t) for t in value]
        if not self.seen_prompt:
            self.seen_prompt = True
            if self.skip_prompt:
                return
        self.ids.extend(tokens)
        text = self.decode(self.ids, **self.decode_kwargs)
        if text.endswith("\n"):
            # A line is complete: release it and start afresh, keeping the decode short.
            piece = text[self.sent :]
            self.ids, self.sent = [], 0
        elif text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the rest of it
        else:
            cut = max(text.rfind(" "), self.sent - 1) + 1
            piece = text[self.sent : cut]
            self.sent = cut if cut > self.sent else self.sent
        if piece:
            self.emit(piece, False)

    def end(self) -> None:
        text = self.decode(self.ids, **self.decode_kwargs) if self.ids else ""
        piece = text[self.sent :]
        self.ids, self.sent = [], 0
        self.seen_prompt = False  # ready for another generate call
        self.emit(piece, True)

    def emit(self, piece: str, final: bool) -> None:
        raise NotImplementedError


class TextIteratorStreamer(_PieceMaker):
    """Yields text pieces; run `generate` in another thread and iterate here.

    >>> streamer = TextIteratorStreamer(tokenizer, skip_special_tokens=True)
    >>> thread = threading.Thread(target=model.generate, kwargs=dict(..., streamer=streamer))
    >>> thread.start(); text = "".join(streamer)

    `timeout` (seconds) bounds each wait for the next piece (queue.Empty when it passes).
    An exception passed to `fail` (or raised inside `run_in_thread`) is re-raised by the iterator.
    """

    def __init__(self, decode: Decode | Any, skip_prompt: bool = True, timeout: float | None = None,
                 **decode_kwargs: Any) -> None:
        super().__init__(decode, skip_prompt, **decode_kwargs)
        self.timeout = timeout
        self.queue: queue.Queue = queue.Queue()

    def emit(self, piece: str, final: bool) -> None:
        if piece:
            self.queue.put(piece)
        if final:
            self.queue.put(_DONE)

    def fail(self, error: BaseException) -> None:
        """Hands an error from the generating thread to the reader."""
        self.queue.put(error)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        item = self.queue.get(timeout=self.timeout)
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


class CallbackStreamer(_PieceMaker):
    """Calls `on_text(piece, final)` for each text piece; `final` is True once, at the end."""

    def __init__(self, decode: Decode | Any, on_text: Callable[[str, bool], None], skip_prompt: bool = True,
                 **decode_kwargs: Any) -> None:
        super().__init__(decode, skip_prompt, **decode_kwargs)
        self.on_text = on_text

    def emit(self, piece: str, final: bool) -> None:
        if piece or final:
            self.on_text(piece, final)


def run_in_thread(fn: Callable[..., Any], streamer: TextIteratorStreamer, *args: Any,
                  **kwargs: Any) -> threading.Thread:
    """Starts `fn(*args, streamer=streamer, **kwargs)` in a daemon thread; its errors reach the iterator."""

    def target() -> None:
        try:
            with torch.inference_mode():
                fn(*args, streamer=streamer, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the reading thread, not swallowed
            streamer.fail(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread
