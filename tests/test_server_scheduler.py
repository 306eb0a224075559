"""Continuous batching (blip2/server/scheduler.py): requests join and leave the decode batch at step
boundaries, and each still gets what `generate` gives it alone (greedy tokens, seeded draws,
penalties), whatever step it arrived at and however long its neighbours run. Also: per-row
streaming, a bad request failing alone, the KV-row bound, the bounded queue, draining on stop,
and the requests that go to the micro-batcher (beam search). The row tests run over OPT and T5
(an encoder-decoder: per-row encoder states and relative positions)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest
import torch
from test_server_fixtures import make_engine, make_t5_engine, png_bytes, server_settings

from blip2.server.engine import GenerateJob, GenerationSettings
from blip2.server.limits import ApiError, ImageData, decode_image, image_digest
from blip2.server.scheduler import ContinuousScheduler, EncoderDecoderSlots, Row, SlotDecoder, slot_decoder


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_engine(tmp_path_factory.mktemp("sched"), server_settings(), retrieval=False)


@pytest.fixture(scope="module")
def t5_engine(tmp_path_factory):
    return make_t5_engine(tmp_path_factory.mktemp("sched-t5"), server_settings())


# the tests that take `which` run once over OPT (decoder-only) and once over T5 (encoder-decoder)
both_families = pytest.mark.parametrize("which", ["engine", "t5_engine"])


def image(seed: int) -> ImageData:
    data = png_bytes(seed)
    return ImageData(image_digest(data), image=decode_image(data, 10**6))


def alone(engine, job: GenerateJob) -> list[int]:
    """The new tokens the model's own generate gives this request by itself, from pixels."""
    pixels = engine.processor(images=[job.image.image], return_tensors="pt")["pixel_values"]
    ids = torch.tensor([engine.processor.tokenizer(job.prompt)["input_ids"]]) if job.prompt else None
    kwargs = job.settings.generate_kwargs()
    out = engine.model.generate(pixels, ids, **kwargs)
    tokens = out[0, 1:].tolist()
    eos = engine.generation_defaults.eos_ids
    end = next((n for n, t in enumerate(tokens) if t in eos), None)
    return tokens if end is None else tokens[: end + 1]


PROMPTS = ["", "Question: what colour is the circle ? Answer:", "a photo of", "Question: how many shapes ? Answer:"]


def job(picture: int, max_new: int, prompt: str = "", **options) -> GenerateJob:
    return GenerateJob(image(picture), prompt, GenerationSettings(max_new_tokens=max_new, **options))


def run_ticks(decoder: SlotDecoder, arrivals: dict[int, list[Row]]) -> list[Row]:
    """Ticks until every row ended; `arrivals[t]` arrive at tick t and wait for a free row, as in
    the scheduler. Returns the rows in the order they ended."""
    ended, waiting, t = [], [], 0
    while t <= max(arrivals) or decoder.rows or waiting:
        waiting += arrivals.get(t, [])
        free = decoder.slots - len(decoder.rows)
        joining, waiting = waiting[:free], waiting[free:]
        ended += decoder.tick(joining)
        t += 1
    return ended


@both_families
def test_rows_joining_at_different_steps_decode_exactly_as_alone(which, request):
    engine = request.getfixturevalue(which)
    jobs = [job(1, 12, PROMPTS[0]), job(2, 4, PROMPTS[1]), job(3, 20, PROMPTS[2]), job(4, 7, PROMPTS[3]),
            job(5, 9, PROMPTS[1]), job(6, 1, PROMPTS[2])]
    rows = [Row(j, None) for j in jobs]
    decoder = slot_decoder(engine, 3)  # 3 rows: later arrivals take the rows that finish
    assert isinstance(decoder, EncoderDecoderSlots) == (which == "t5_engine")
    sizes = []
    original = decoder._step

    def counting_step(ended):
        sizes.append(len(decoder.rows))
        original(ended)

    decoder._step = counting_step
    ended = run_ticks(decoder, {0: rows[:2], 2: rows[2:3], 5: rows[3:4], 9: rows[4:6]})
    assert sorted(map(id, ended)) == sorted(map(id, rows))
    for row in rows:
        assert not isinstance(row.outcome, BaseException), row.outcome
        expected = alone(engine, row.job)
        assert row.tokens == expected, (row.job.settings, row.job.prompt)
        assert row.outcome.completion_tokens == len(expected)
        assert row.outcome.text == engine.processor.decode(expected, skip_special_tokens=True).strip()
    assert max(sizes) == 3 and decoder.rows == []  # rows were shared, and all were freed
    assert rows[1].ended and rows[1] in ended[:2]  # the 4-token request left before the 12-token one


@both_families
def test_per_row_options_sampling_penalties_and_min_tokens(which, request):
    engine = request.getfixturevalue(which)
    jobs = [job(1, 10, do_sample=True, seed=7, temperature=0.8, top_k=5),
            job(1, 10, PROMPTS[1], repetition_penalty=1.5),
            job(2, 8, min_new_tokens=8),
            job(3, 10, do_sample=True, seed=11, top_p=0.9),
            job(4, 6)]
    rows = [Row(j, None) for j in jobs]
    decoder = slot_decoder(engine, 4)
    run_ticks(decoder, {0: rows[:3], 1: rows[3:]})
    for row in rows:
        assert row.tokens == alone(engine, row.job), row.job.settings
    assert len(rows[2].tokens) == 8


@both_families
def test_a_bad_request_fails_alone_and_the_rest_decode(which, request):
    engine = request.getfixturevalue(which)
    too_long = " ".join(["red"] * (engine.settings.max_prompt_tokens + 5))
    rows = [Row(job(1, 6), None), Row(job(2, 6, too_long), None), Row(job(3, 6), None)]
    decoder = slot_decoder(engine, 4)
    run_ticks(decoder, {0: rows})
    assert isinstance(rows[1].outcome, ApiError) and rows[1].outcome.status == 400
    assert rows[0].tokens == alone(engine, rows[0].job) and rows[2].tokens == alone(engine, rows[2].job)


@both_families
def test_streams_follow_their_own_row(which, request):
    engine = request.getfixturevalue(which)
    pieces = {0: [], 1: []}
    jobs = [job(8, 12), job(9, 5, PROMPTS[1])]
    for n, j in enumerate(jobs):
        j.on_text = pieces[n].append
    rows = [Row(j, None) for j in jobs]
    run_ticks(slot_decoder(engine, 2), {0: rows[:1], 3: rows[1:]})
    for n, row in enumerate(rows):
        assert "".join(pieces[n]).strip() == row.outcome.text
    # a client that leaves mid-stream ends its row alone
    leaving = job(8, 12)
    leaving.on_text = lambda piece: leaving.cancelled.set()
    rows = [Row(leaving, None), Row(job(9, 5), None)]
    run_ticks(slot_decoder(engine, 2), {0: rows})
    assert isinstance(rows[0].outcome, Exception) and rows[1].tokens == alone(engine, rows[1].job)


# ---------------------------------------------------------------- the scheduler on an event loop
def scheduler(engine, **settings) -> ContinuousScheduler:
    return ContinuousScheduler(engine, engine.run, server_settings(**settings))


def test_a_trip_runs_several_steps_until_a_row_ends_or_a_request_could_join(engine):
    s = scheduler(engine, max_batch=3)
    a, b, c = Row(job(1, 30), None), Row(job(2, 4), None), Row(job(3, 4), None)
    s.pending.append(a)
    assert s._tick() == [] and len(a.tokens) == 1 + s.steps_per_trip  # nobody could join: 8 steps, one trip
    original = s.decoder.tick

    def c_arrives(joining):
        out = original(joining)
        if joining:
            s.pending.append(c)
        return out

    s.decoder.tick = c_arrives
    s.pending.append(b)
    s._tick()  # b joins; c arrives meanwhile and a row is free: the trip ends after one step
    assert len(a.tokens) == 10 and len(b.tokens) == 2
    s.decoder.tick = original
    assert s._tick() == [b]  # c joins; b ends at its 4th token two steps later, and the trip with it
    assert len(c.tokens) == 3 and len(a.tokens) == 12
    for row in (a, c):
        assert row.tokens == alone(engine, row.job)[: len(row.tokens)]


def test_a_queue_joins_a_group_at_a_time_and_a_lone_arrival_at_once(engine):
    s = scheduler(engine, max_batch=8, max_wait_ms=0)  # groups of 2
    s.decoder.rows = [object()] * 7  # one row free
    s.pending.extend(Row(job(n, 4), None) for n in range(3))
    assert s._take_joining() == []  # three waiting: wait for a second free row
    s.decoder.rows = [object()] * 6
    assert len(s._take_joining()) == 2 and len(s.pending) == 1
    s.decoder.rows = [object()] * 7
    assert len(s._take_joining()) == 1  # one waiting, one free: it joins at once


def test_a_trip_goes_on_while_a_queue_waits_for_a_group_of_free_rows(engine):
    s = scheduler(engine, max_batch=8, max_wait_ms=60_000)  # groups of 2
    running = [Row(job(n, 30, min_new_tokens=30), None) for n in range(7)]
    s.pending.extend(running)
    s._tick()  # no live rows: all seven join at once and run a full trip
    s.pending.extend(Row(job(10 + n, 4), None) for n in range(3))
    before = [len(r.tokens) for r in running]
    assert not s._may_join() and s._tick() == []  # one row free, three waiting: none may join yet
    assert [len(r.tokens) - n for r, n in zip(running, before)] == [s.steps_per_trip] * 7  # so no trip cut short
    assert len(s.pending) == 3


def test_concurrent_requests_arriving_at_random_times_get_their_own_answers(engine):
    jobs = [job(20 + n, 4 + (n * 7) % 37, PROMPTS[n % 4]) for n in range(10)]

    async def main():
        s = scheduler(engine, max_batch=4)
        await s.start()

        async def late(n, j):
            await asyncio.sleep(0.01 * (n % 3))
            return await s.submit(("generate", j.settings), j)

        results = await asyncio.gather(*(late(n, j) for n, j in enumerate(jobs)))
        await s.stop()
        return results, s.snapshot()

    results, snap = asyncio.run(main())
    for result, j in zip(results, jobs):
        assert result.text == engine.processor.decode(alone(engine, j), skip_special_tokens=True).strip()
    assert 1 < snap["max_batch_size_seen"] <= 4 and snap["kv_slots"] == 4 and snap["kv_slots_used"] == 0
    assert snap["queued"] == 0 and snap["running"] == 0


@both_families
def test_kv_memory_bounds_the_rows_and_beam_search_goes_to_the_micro_batcher(which, request):
    engine = request.getfixturevalue(which)
    one_row = slot_decoder(engine, 1).cache_bytes()
    s = scheduler(engine, max_batch=8, kv_cache_mb=2.5 * one_row / 2**20)
    assert s.decoder.slots == 2
    jobs = [job(40 + n, 6) for n in range(5)]
    beam = job(45, 6, num_beams=2)

    async def main():
        await s.start()
        results = await asyncio.gather(*(s.submit(("generate", j.settings), j) for j in jobs),
                                       s.submit(("generate", beam.settings), beam))
        await s.stop()
        return results

    results = asyncio.run(main())
    assert [r.text for r in results[:-1]] == [engine.run(("generate", j.settings), [j])[0].text for j in jobs]
    assert results[-1].text == engine.run(("generate", beam.settings), [beam])[0].text
    snap = s.snapshot()
    assert snap["max_batch_size_seen"] == 2 and snap["micro_batches"] == 1
    assert s.decoder.cache.nbytes() == snap["kv_cache_bytes"] == 2 * one_row  # what was allocated is what was counted
    with pytest.raises(ValueError, match="kv_cache_mb"):
        scheduler(engine, kv_cache_mb=0.5 * one_row / 2**20)


def test_a_full_queue_is_503_and_stop_drains_everything_queued(engine):
    gate = threading.Event()

    async def main():
        s = scheduler(engine, max_queue=2, max_batch=1)
        await s.start()
        blocker = asyncio.get_running_loop().run_in_executor(s.executor, gate.wait, 30)  # hold the model thread
        waiting = [asyncio.ensure_future(s.submit(("generate", j.settings), j)) for j in jobs[:2]]
        await asyncio.sleep(0.05)
        assert s.queued() == 2
        with pytest.raises(ApiError) as refused:
            await s.submit(("generate", jobs[2].settings), jobs[2])
        gate.set()
        await blocker
        stopping = asyncio.ensure_future(s.stop())  # drains: both waiting requests are answered
        results = await asyncio.gather(*waiting)
        await stopping
        with pytest.raises(ApiError) as closed:
            s.check_room()
        return refused.value, closed.value, results

    jobs = [job(60 + n, 5) for n in range(3)]
    refused, closed, results = asyncio.run(main())
    assert refused.status == 503 and int(refused.headers["Retry-After"]) >= 1 and "busy" in refused.message
    assert closed.status == 503 and "shutting down" in closed.message
    assert [r.text for r in results] == [engine.run(("generate", j.settings), [j])[0].text for j in jobs[:2]]


@both_families
def test_over_http_streamed_and_whole_answers_interleave_and_match_alone(which, request):
    engine = request.getfixturevalue(which)
    httpx = pytest.importorskip("httpx")
    from test_server_fixtures import ServerThread, data_url, sse_events

    from blip2.server.app import create_app

    bodies = [{"image": data_url(png_bytes(80 + n)), "max_new_tokens": 4 + 9 * n, "stream": n % 2 == 1}
              for n in range(4)]
    expected = [engine.run(("generate", job(80 + n, b["max_new_tokens"]).settings),
                           [job(80 + n, b["max_new_tokens"])])[0].text for n, b in enumerate(bodies)]
    with ServerThread(create_app(engine, server_settings(max_batch=4))) as server:
        def send(body):
            with httpx.Client(base_url=server.url, timeout=30) as c:
                if not body["stream"]:
                    return c.post("/v1/caption", json=body).json()["caption"]
                with c.stream("POST", "/v1/caption", json=body) as r:
                    events = sse_events(r)
                assert "".join(e.get("delta", "") for e in events).strip() == events[-1]["caption"]
                return events[-1]["caption"]

        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            got = list(pool.map(send, bodies))
        snap = httpx.get(f"{server.url}/metrics").json()["batcher"]
    assert got == expected
    assert snap["batching"] == "continuous" and snap["requests_by_task"] == {"generate": 2, "stream": 2}
    assert snap["micro_batches"] == 0 and snap["steps"] > 0  # every request ran in the continuous batch


def test_a_request_that_times_out_leaves_the_batch_and_the_others_go_on(engine):
    slow, other = job(90, 60, min_new_tokens=60), job(91, 6)

    async def main():
        s = scheduler(engine, max_batch=2)
        await s.start()
        with pytest.raises(ApiError) as late:
            await s.submit(("generate", slow.settings), slow, timeout_s=0.001)
        result = await s.submit(("generate", other.settings), other)
        await s.stop()
        return late.value, result, s

    late, result, s = asyncio.run(main())
    assert late.status == 504 and s.snapshot()["timeouts"] == 1
    assert result.text == engine.run(("generate", other.settings), [other])[0].text
    assert s.decoder.rows == [] and not s.pending


def run_recording_inputs(engine, main, record):
    """asyncio.run(main()), every batch the engine prepares (`row_inputs`) shown to `record` first."""
    original = engine.row_inputs

    def recording(batch):
        record(batch)
        return original(batch)

    engine.row_inputs = recording
    try:
        return asyncio.run(main())
    finally:
        engine.row_inputs = original


def test_inputs_are_prepared_off_the_model_thread_and_a_bad_prompt_fails_before_taking_a_row(engine):
    threads, rows_seen = [], []
    too_long = job(31, 5, " ".join(["red"] * (engine.settings.max_prompt_tokens + 5)))
    jobs = [job(30 + n, 3 + 4 * n, PROMPTS[n % 4]) for n in range(6)]

    async def main():
        s = scheduler(engine, max_batch=2)
        step = s.decoder._step

        def watching(ended):
            rows_seen.append(list(s.decoder.rows))
            step(ended)

        s.decoder._step = watching
        await s.start()
        results = await asyncio.gather(*(s.submit(("generate", j.settings), j) for j in [jobs[0], too_long, *jobs[1:]]),
                                       return_exceptions=True)
        await s.stop()
        return results

    results = run_recording_inputs(engine, main, lambda batch: threads.append((threading.current_thread().name, batch)))
    # the first finds the model idle and is prepared by the model thread itself; the rest never are
    by_model = [batch for name, batch in threads if name.startswith("blip2-model")]
    assert by_model == [[jobs[0]]] and len(threads) > 1
    assert all(name.startswith(("blip2-model", "blip2-prepare")) for name, _ in threads)
    assert isinstance(results[1], ApiError) and results[1].status == 400
    assert all(row.job is not too_long for rows in rows_seen for row in rows)  # it never took a row
    for result, j in zip(results[:1] + results[2:], jobs):
        assert result.text == engine.processor.decode(alone(engine, j), skip_special_tokens=True).strip()


def test_arrivals_wait_to_be_prepared_together_while_a_cache_full_of_rows_is_ready(engine):
    gate, sizes = threading.Event(), []
    jobs = [job(100 + n, 4) for n in range(6)]

    async def until(condition):
        for _ in range(1000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the scheduler did not get there")

    async def main():
        s = scheduler(engine, max_batch=2)
        await s.start()
        blocker = asyncio.get_running_loop().run_in_executor(s.executor, gate.wait, 30)  # nothing joins
        first = [asyncio.ensure_future(s.submit(("generate", j.settings), j)) for j in jobs[:2]]
        await until(lambda: len(s.pending) == 2)  # as many prepared as the cache has rows
        later = [asyncio.ensure_future(s.submit(("generate", j.settings), j)) for j in jobs[2:]]
        await until(lambda: len(s.arriving) == 4)
        await asyncio.sleep(0.05)
        assert len(s.arriving) == 4 and len(s.pending) == 2  # not prepared while the ready ones wait
        gate.set()
        await blocker
        results = await asyncio.gather(*first, *later)
        await s.stop()
        return results

    results = run_recording_inputs(engine, main, lambda batch: sizes.append(len(batch)))
    assert sum(sizes) == 6 and sizes[-2:] == [2, 2]  # the four late ones: prepared two at a time (max_batch)
    assert [r.text for r in results] == [engine.run(("generate", j.settings), [j])[0].text for j in jobs]
