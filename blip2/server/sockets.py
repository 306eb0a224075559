"""uvicorn's configuration for `blip2 serve`, with a deadline on every connection's request headers.

uvicorn closes a kept-alive connection that stays silent, but not one that never sends a
request, nor one that sends its headers a byte at a time: such sockets are held forever and a
few hundred of them exhaust the server's file descriptors. Here each connection must complete
its request headers within `header_timeout_s` of opening (or of its previous response); the
body has its own deadline in the app (`Settings.body_timeout_s`).
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import Settings


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose next request's headers are not in by the deadline."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()  # the next request on this kept-alive connection gets the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        if self.transport.is_closing():
            return
        waiting_since = self.cycle  # a new request replaces the cycle once its headers are complete
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed, waiting_since)

    def _disarm_header_deadline(self) -> None:
        handle = getattr(self, "_header_deadline", None)
        if handle is not None:
            handle.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self, waiting_since) -> None:
        self._header_deadline = None
        if self.cycle is waiting_since and not self.transport.is_closing():
            self.transport.close()  # idle, or headers trickling in: free the socket for others


def protocol_class(header_timeout_s: float) -> type[H11Protocol]:
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"header_timeout_s": header_timeout_s})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.Config keywords that bound what one client can hold: sockets, time, concurrency."""
    return {
        "http": protocol_class(settings.header_timeout_s),
        "timeout_keep_alive": max(1, round(settings.keep_alive_s)),
        "limit_concurrency": settings.limit_concurrency,
        "h11_max_incomplete_event_size": 64 * 1024,  # request line + headers
    }
