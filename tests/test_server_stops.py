"""Stop strings (blip2/server/stops.py): a request's answer ends at the first token whose text holds
one of its `stop` strings, and the stop string is cut from the text, in both batchers, streamed
and whole; a stream never shows any part of a stop string; rows without one are untouched."""

from __future__ import annotations

import dataclasses

import pytest
from test_server_fixtures import make_engine, make_t5_engine, png_bytes, server_settings
from test_server_scheduler import PROMPTS, alone, job, run_ticks

from blip2.server.limits import ApiError, stops_param
from blip2.server.scheduler import Row, slot_decoder
from blip2.server.stops import StopFilter, first_stop, held_back


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_engine(tmp_path_factory.mktemp("stops"), server_settings(), retrieval=False)


@pytest.fixture(scope="module")
def t5_engine(tmp_path_factory):
    return make_t5_engine(tmp_path_factory.mktemp("stops-t5"), server_settings())


def expected(engine, j) -> tuple[list[int], str, bool]:
    """What a request with stop strings should get: its tokens alone, up to the first whose text
    holds a stop string, that text cut before the stop string, and whether one was found."""
    tokens = alone(engine, j)
    for n in range(1, len(tokens) + 1):
        text = engine.processor.decode(tokens[:n], skip_special_tokens=True)
        found = [text.find(s) for s in j.settings.stop if s in text]
        if found:
            return tokens[:n], text[: min(found)].strip(), True
    return tokens, engine.processor.decode(tokens, skip_special_tokens=True).strip(), False


def with_stop(j, *stop):
    j.settings = dataclasses.replace(j.settings, stop=stop)
    return j


def stop_jobs(engine):
    """Requests whose greedy text holds their stop string mid-answer: one word, two words over a
    token boundary, and one that never appears (the row runs to its limit)."""
    jobs = [job(1, 12, PROMPTS[1]), job(1, 12, PROMPTS[1]), job(3, 12, PROMPTS[3]), job(2, 6)]
    stops = []
    for j in jobs[:3]:
        words = engine.processor.decode(alone(engine, j), skip_special_tokens=True).split()
        k = next(k for k, w in enumerate(words) if w != words[0])  # the first word that differs from the first
        stops.append(words[k])
        assert len(words) > k + 1  # the stop string cuts the answer short
    stops[1] = f"{words[k - 1]} {stops[0]}"  # two words: over a token boundary
    return [with_stop(jobs[0], stops[0]), with_stop(jobs[1], stops[1], "zebra"), with_stop(jobs[2], stops[2]),
            with_stop(jobs[3], "zebra")]


# ---------------------------------------------------------------- the text helpers
def test_first_stop_and_what_a_stream_holds_back():
    assert first_stop("a red circle", ["circle", "red"]) == 2 and first_stop("a red", ["blue"]) is None
    assert held_back("a red ci", ["circle"]) == 2 and held_back("a red", ["circle"]) == 0
    assert held_back("a red", ["red car", "d"]) == 3  # the longest tail that could still grow into a stop


def test_the_filter_never_shows_part_of_a_stop_string():
    shown = []
    f = StopFilter(["circle on"], lambda piece, final: shown.append(piece))
    for piece in ["a red ", "cir", "cle ", "o", "n the left"]:
        f(piece, False)
    assert "".join(shown) == "a red " and f.stopped
    shown.clear()
    f = StopFilter(["circle on"], lambda piece, final: shown.append(piece))
    f("a red ", False)
    f("circle", False)
    assert "".join(shown) == "a red "  # "circle" might begin "circle on": held back
    f(" in", False)
    assert "".join(shown) == "a red circle in" and not f.stopped


def test_stop_parameter_is_checked():
    assert stops_param({}) == () and stops_param({"stop": "\n"}) == ("\n",)
    assert stops_param({"stop": ["a", "b", "a"]}) == ("a", "b")
    for bad in (["a"] * 5, [""], [3], 3, "x" * 65):
        with pytest.raises(ApiError) as err:
            stops_param({"stop": bad})
        assert err.value.status == 400 and err.value.param == "stop"


# ---------------------------------------------------------------- both batchers
@pytest.mark.parametrize("which", ["engine", "t5_engine"])
def test_continuous_rows_end_at_their_stop_string_and_neighbours_are_untouched(which, request):
    engine = request.getfixturevalue(which)
    jobs = stop_jobs(engine) + [job(5, 10)]
    pieces = [[] for _ in jobs]
    for j, p in zip(jobs[2:4], pieces[2:4]):  # two of them streamed
        j.on_text = p.append
    rows = [Row(j, None) for j in jobs]
    run_ticks(slot_decoder(engine, 3), {0: rows[:3], 2: rows[3:]})
    for row, p in zip(rows, pieces):
        tokens, text, stopped = expected(engine, row.job)
        assert row.tokens == tokens and row.outcome.text == text, row.job.settings.stop
        assert row.outcome.completion_tokens == len(tokens)
        assert (row.outcome.finish_reason == "stop") == (stopped or len(tokens) < row.job.settings.max_new_tokens)
        if row.job.on_text is not None:
            assert "".join(p).strip() == text and not any(s in "".join(p) for s in row.job.settings.stop)
    assert rows[-1].tokens == alone(engine, rows[-1].job)  # no stop strings: the whole answer


def test_micro_batcher_cuts_whole_rows_and_ends_a_stream_early(engine):
    jobs = stop_jobs(engine)
    results = engine.run(("generate", jobs[0].settings.shared()), jobs)  # one batch: stop strings differ
    for j, result in zip(jobs, results):
        tokens, text, _ = expected(engine, j)
        assert result.text == text and result.completion_tokens == len(tokens)
    streamed, pieces = stop_jobs(engine)[2], []
    streamed.on_text = pieces.append
    result = engine.run(("stream", streamed.settings), [streamed])[0]
    tokens, text, _ = expected(engine, streamed)
    assert result.text == text and result.completion_tokens == len(tokens) < 12 and result.finish_reason == "stop"
    assert "".join(pieces).strip() == text and "light" not in "".join(pieces)


def test_over_http_stop_works_in_caption_and_chat(engine):
    httpx = pytest.importorskip("httpx")
    from test_server_fixtures import ServerThread, data_url

    from blip2.server.app import create_app

    from blip2.server.app import chat_request

    first = stop_jobs(engine)[0]
    stop = first.settings.stop[0]
    tokens, text, _ = expected(engine, first)
    image = data_url(png_bytes(1))
    chat_body = {"max_tokens": 12, "stop": [stop], "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what shape is it ?"}, {"type": "image_url", "image_url": {"url": image}}]}]}
    chat_job = with_stop(job(1, 12, chat_request(chat_body, engine.settings)[1]), stop)
    with ServerThread(create_app(engine, server_settings(max_batch=4))) as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            got = c.post("/v1/caption", json={"image": image, "max_new_tokens": 12, "stop": stop,
                                              "prompt": first.prompt}).json()
            chat = c.post("/v1/chat/completions", json=chat_body).json()
            bad = c.post("/v1/caption", json={"image": image, "stop": ["a", "b", "c", "d", "e"]})
    assert got["caption"] == text and got["finish_reason"] == "stop" and got["usage"]["completion_tokens"] == len(tokens)
    assert chat["choices"][0]["message"]["content"] == expected(engine, chat_job)[1]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stop"
