"""The micro-batcher on its own: grouping by key, bounded wait and batch size, a bounded queue,
timeouts, and failures that stay inside the requests they belong to."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from blip2.server.batcher import Batcher
from blip2.server.limits import ApiError


class Recorder:
    """A batch function that records every batch it is given and answers each payload doubled."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[tuple] = []
        self.delay = delay
        self.gate = gate

    def __call__(self, key, payloads):
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        self.batches.append((key, list(payloads)))
        return [p * 2 if isinstance(p, int) else p for p in payloads]


def run(coro):
    return asyncio.run(coro)


async def started(batcher: Batcher) -> Batcher:
    await batcher.start()
    return batcher


def test_requests_arriving_together_share_a_batch_and_keys_never_mix():
    async def main():
        rec = Recorder()
        b = await started(Batcher(rec, max_batch=4, max_wait_s=0.05))
        results = await asyncio.gather(*(b.submit(("a",), n) for n in range(6)), *(b.submit(("b",), n) for n in range(2)))
        await b.stop()
        return rec, results, b.snapshot()

    rec, results, snap = run(main())
    assert results == [0, 2, 4, 6, 8, 10, 0, 2]
    assert sorted(len(p) for _, p in rec.batches) == [2, 2, 4]  # a: 4 + 2, b: 2
    assert all(len({k}) == 1 for k, _ in rec.batches)
    assert snap["batch_sizes"] == {"2": 2, "4": 1} and snap["max_batch_size_seen"] == 4
    assert snap["batch_sizes_by_task"]["a"] == {"2": 1, "4": 1}


def test_a_lone_request_waits_no_longer_than_max_wait():
    async def main():
        b = await started(Batcher(Recorder(), max_batch=8, max_wait_s=0.05))
        t = time.monotonic()
        await b.submit(("a",), 1)
        waited = time.monotonic() - t
        await b.stop()
        return waited

    assert run(main()) < 1.0  # 50 ms of waiting plus scheduling; never the full timeout


def test_the_batch_limit_per_key():
    async def main():
        rec = Recorder()
        b = await started(Batcher(rec, max_batch=8, max_wait_s=0.05, batch_limit=lambda key: 1 if key[0] == "s" else 8))
        await asyncio.gather(*(b.submit(("s",), n) for n in range(3)))
        await b.stop()
        return rec

    assert [len(p) for _, p in run(main()).batches] == [1, 1, 1]


def test_a_full_queue_is_refused_with_503_and_retry_after():
    async def main():
        gate = threading.Event()
        b = await started(Batcher(Recorder(gate=gate), max_batch=1, max_wait_s=0, max_queue=2))
        first = asyncio.create_task(b.submit(("a",), 1))
        while not b.running:
            await asyncio.sleep(0.005)
        queued = [asyncio.create_task(b.submit(("a",), n)) for n in (2, 3)]
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as refused:
            await b.submit(("a",), 4)
        gate.set()
        results = [await first] + [await q for q in queued]
        await b.stop()
        return refused.value, results, b.stats.rejected

    err, results, rejected = run(main())
    assert err.status == 503 and int(err.headers["Retry-After"]) >= 1
    assert results == [2, 4, 6] and rejected == 1


def test_a_timeout_gives_504_and_a_timed_out_queued_request_never_runs():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate=gate)
        b = await started(Batcher(rec, max_batch=1, max_wait_s=0, timeout_s=0.1))
        running = asyncio.create_task(b.submit(("a",), 1))
        while not b.running:
            await asyncio.sleep(0.005)
        with pytest.raises(ApiError) as slow:
            await b.submit(("a",), 2)  # queued behind the blocked batch, then abandoned
        gate.set()
        with pytest.raises(ApiError):
            await running  # the running one timed out too
        ok = await b.submit(("a",), 3, timeout_s=5)
        await b.stop()
        return slow.value, ok, rec.batches, b.stats.timeouts

    err, ok, batches, timeouts = run(main())
    assert err.status == 504 and ok == 6 and timeouts == 2
    assert [p for _, p in batches] == [[1], [3]]  # payload 2 was dropped from the queue, never computed


def test_failures_stay_with_their_requests_and_the_worker_goes_on():
    def flaky(key, payloads):
        if key == ("boom",):
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"bad {p}") if p < 0 else p for p in payloads]

    async def main():
        b = await started(Batcher(flaky, max_batch=4, max_wait_s=0.02))
        outcomes = await asyncio.gather(b.submit(("x",), 1), b.submit(("x",), -1), b.submit(("boom",), 5),
                                        return_exceptions=True)
        after = await b.submit(("x",), 7)
        await b.stop()
        return outcomes, after

    (good, bad, boom), after = run(main())
    assert good == 1 and isinstance(bad, ValueError) and str(bad) == "bad -1"
    assert isinstance(boom, RuntimeError) and after == 7


def test_stop_drains_what_is_queued_and_then_refuses():
    async def main():
        rec = Recorder(delay=0.01)
        b = await started(Batcher(rec, max_batch=1, max_wait_s=0))
        tasks = [asyncio.create_task(b.submit(("a",), n)) for n in range(4)]
        await asyncio.sleep(0)
        await b.stop()
        results = [await t for t in tasks]
        with pytest.raises(ApiError) as closed:
            await b.submit(("a",), 9)
        return results, closed.value

    results, closed = run(main())
    assert results == [0, 2, 4, 6]
    assert closed.status == 503 and "shutting down" in closed.message
