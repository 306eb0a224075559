"""An asyncio micro-batcher: requests that arrive close together share one forward pass.

Requests carry a key (the task and every setting that must agree inside one batch). One
worker takes the oldest request, waits at most `max_wait_s` from its arrival for more with
the same key (up to `max_batch`), and runs them together in a single model thread. While a
batch runs, new requests queue up, so under load batches fill without any extra waiting.
The queue is bounded: a full queue is an immediate 503 with Retry-After, not a slow death.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from .limits import ApiError

log = logging.getLogger("blip2.server")

# run(key, payloads) -> one result per payload; an exception in the list fails only that request.
RunBatch = Callable[[Hashable, list], Sequence[Any]]


@dataclass
class _Item:
    key: Hashable
    payload: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Groups requests by key into batches and runs them one batch at a time in a model thread."""

    def __init__(self, run: RunBatch, max_batch: int = 8, max_wait_s: float = 0.01, max_queue: int = 64,
                 timeout_s: float = 60.0, batch_limit: Callable[[Hashable], int] | None = None) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.batch_limit = batch_limit or (lambda key: max_batch)
        # One thread: the model is not re-entrant, and torch already uses every core inside an op.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip2-model")
        self.pending: collections.deque[_Item] = collections.deque()
        self._arrival: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False
        self.running = 0  # requests inside the batch now running
        self.stats = BatchStats()

    # ---- lifecycle ----
    async def start(self) -> None:
        self._arrival = asyncio.Event()
        self._worker = asyncio.create_task(self._loop(), name="blip2-batcher")

    async def stop(self) -> None:
        """Finishes everything already queued, then stops the worker and the model thread."""
        self._closing = True
        if self._arrival is not None:
            self._arrival.set()
        if self._worker is not None:
            await self._worker
        self.executor.shutdown(wait=True)

    # ---- submitting ----
    def has_room(self) -> bool:
        return len(self.pending) < self.max_queue

    def check_room(self) -> None:
        """Raises the 503 a new request would get now (for callers that must answer before submitting)."""
        if self._closing or self._worker is None:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if not self.has_room():
            self.stats.rejected += 1
            raise ApiError(503, f"the server is busy: {len(self.pending)} requests are queued; retry later",
                           headers={"Retry-After": str(self.retry_after())})

    async def submit(self, key: Hashable, payload: Any, timeout_s: float | None = None) -> Any:
        """Queues one request and waits for its result, raising ApiError 503 (full) or 504 (too slow)."""
        self.check_room()
        loop = asyncio.get_running_loop()
        item = _Item(key, payload, loop.create_future())
        self.pending.append(item)
        self._arrival.set()
        return await wait_result(item.future, self.timeout_s if timeout_s is None else timeout_s, self.stats)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: queued batches times the mean batch time."""
        batches = math.ceil(len(self.pending) / max(1, self.max_batch))
        return max(1, math.ceil(batches * self.stats.mean_batch_seconds()))

    # ---- the worker ----
    async def _loop(self) -> None:
        while True:
            self._drop_abandoned()
            if not self.pending:
                if self._closing:
                    return
                self._arrival.clear()
                await self._arrival.wait()
                continue
            try:
                await self._run_one(await self._collect())
            except Exception:  # noqa: BLE001 - a bug here must not leave every later request hanging
                log.exception("the batcher failed to run a batch")

    async def _run_one(self, batch: list[_Item]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        self.stats.record_start(batch[0].key, len(batch))
        self.running = len(batch)
        started = time.monotonic()
        try:
            results = await self._results(loop, batch[0].key, [i.payload for i in batch])
            if len(batch) > 1 and isinstance(results[0], BaseException) and all(r is results[0] for r in results):
                # The batch function blamed the whole batch (one error for all): find the culprit by
                # running each request alone, so a request's failure stays that request's.
                log.warning("a batch of %d failed; running its requests one by one", len(batch))
                results = [(await self._results(loop, item.key, [item.payload]))[0] for item in batch]
        finally:
            self.running = 0
            self.stats.record_end(time.monotonic() - started)
        for item, result in zip(batch, results):
            if item.future.done():
                continue  # timed out or abandoned while running
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    async def _results(self, loop, key: Hashable, payloads: list) -> list:
        """One result (or exception) per payload; an exception of the batch function is every payload's."""
        try:
            results = await loop.run_in_executor(self.executor, self.run, key, payloads)
            if len(results) != len(payloads):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(payloads)} requests")
            return list(results)
        except Exception as err:  # noqa: BLE001 - a failed batch fails its requests, never the worker
            return [err] * len(payloads)

    async def _collect(self) -> list[_Item]:
        """The oldest request plus same-key ones that arrive within max_wait of it (up to the batch limit)."""
        first = self.pending[0]
        limit = max(1, self.batch_limit(first.key))
        deadline = first.arrived + self.max_wait_s
        while self._count(first.key) < limit and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                break
        taken, kept = [], collections.deque()
        for item in self.pending:
            if item.key == first.key and len(taken) < limit and not item.future.done():
                taken.append(item)
            elif not item.future.done():
                kept.append(item)
        self.pending = kept
        return taken

    def _count(self, key: Hashable) -> int:
        return sum(1 for item in self.pending if item.key == key and not item.future.done())

    def _drop_abandoned(self) -> None:
        if any(item.future.done() for item in self.pending):
            self.pending = collections.deque(item for item in self.pending if not item.future.done())

    def snapshot(self) -> dict[str, Any]:
        return {"queued": len(self.pending), "running": self.running, "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait_s * 1000, "max_queue": self.max_queue, **self.stats.as_dict()}


async def wait_result(future: asyncio.Future, timeout: float, stats: "BatchStats") -> Any:
    """The request's result, or ApiError 504 after `timeout` s; the future is cancelled when the
    caller stops waiting (a timeout, or the client went away), so the worker drops the request."""
    try:
        return await asyncio.wait_for(future, timeout)  # cancels the future on timeout
    except asyncio.TimeoutError:
        stats.timeouts += 1
        raise ApiError(504, f"the request took longer than {timeout:g} s and was abandoned") from None
    finally:
        if not future.done():
            future.cancel()


class BatchStats:
    """Counters for GET /metrics: how many batches of each size ran, per task."""

    def __init__(self) -> None:
        self.batches = 0
        self.rejected = 0
        self.timeouts = 0
        self.sizes: collections.Counter[int] = collections.Counter()
        self.sizes_by_task: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        self.requests_by_task: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[int] = collections.deque(maxlen=64)
        self.busy_seconds = 0.0

    def record_start(self, key: Hashable, size: int) -> None:
        task = key[0] if isinstance(key, tuple) and key else str(key)
        self.record_step(size)
        self.requests_by_task[str(task)] += size
        self.sizes_by_task[str(task)][size] += 1

    def record_step(self, size: int) -> None:
        """One forward over `size` requests (continuous batching: one decode step over the live rows)."""
        self.batches += 1
        self.sizes[size] += 1
        self.recent.append(size)

    def record_end(self, seconds: float) -> None:
        self.busy_seconds += seconds

    def mean_batch_seconds(self) -> float:
        return self.busy_seconds / self.batches if self.batches else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "batched_requests": sum(self.requests_by_task.values()),
            "requests_by_task": dict(sorted(self.requests_by_task.items())),
            "rejected": self.rejected,
            "timeouts": self.timeouts,
            "max_batch_size_seen": max(self.sizes, default=0),
            "mean_batch_size": round(sum(self.sizes.elements()) / self.batches, 3) if self.batches else 0.0,
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "batch_sizes_by_task": {t: {str(k): v for k, v in sorted(c.items())} for t, c in self.sizes_by_task.items()},
            "recent_batch_sizes": list(self.recent),
            "busy_seconds": round(self.busy_seconds, 3),
        }
