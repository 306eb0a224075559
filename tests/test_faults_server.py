"""Server faults: a request's failure stays that request's, bad fields are 4xx, sockets cannot be held
forever, streams end cleanly, and the API key guards the API's description too."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_server_fixtures import ServerThread, data_url, make_engine, png_bytes, server_settings  # noqa: E402

from blip2.server.app import create_app  # noqa: E402
from blip2.server.batcher import Batcher  # noqa: E402
from blip2.server.engine import GenerateJob, GenerationSettings  # noqa: E402
from blip2.server.limits import ApiError, ImageData, decode_image  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_engine(tmp_path_factory.mktemp("faults"), server_settings(), retrieval=False)


class StrictTokenizer:
    """A tokenizer that, like a UTF-8-only backend, refuses text holding a lone surrogate."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, text, **kwargs):
        text.encode("utf-8")  # UnicodeEncodeError on "\ud800"
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_prompt_the_tokenizer_cannot_encode_fails_alone(engine, monkeypatch):
    monkeypatch.setattr(engine.processor, "tokenizer", StrictTokenizer(engine.processor.tokenizer))
    image = ImageData("x", image=decode_image(png_bytes(0), 10**6))
    gen = GenerationSettings(max_new_tokens=3)
    jobs = [GenerateJob(image, "a red", gen), GenerateJob(image, "a \ud800", gen), GenerateJob(image, "", gen)]
    results = engine.run(("generate", gen), jobs)
    assert isinstance(results[1], ApiError) and results[1].status == 400 and results[1].param == "prompt"
    assert results[0].completion_tokens == 3 and results[2].completion_tokens == 3


def test_a_batch_that_fails_as_a_whole_is_rerun_one_by_one():
    def run(key, payloads):
        if "bad" in payloads:
            raise RuntimeError("one payload broke the batch")
        return [p.upper() for p in payloads]

    async def main():
        b = Batcher(run, max_batch=4, max_wait_s=0.05)
        await b.start()
        out = await asyncio.gather(*(b.submit(("k",), p) for p in ("a", "bad", "c")), return_exceptions=True)
        await b.stop()
        return out

    a, bad, c = asyncio.run(main())
    assert (a, c) == ("A", "C") and isinstance(bad, RuntimeError)


@pytest.fixture(scope="module")
def server(engine):
    settings = server_settings(api_key="sesame", header_timeout_s=0.5, body_timeout_s=1.0, limit_concurrency=8)
    with ServerThread(create_app(engine, settings), settings) as running:
        yield running


def auth(headers=None):
    return {"Authorization": "Bearer sesame", **(headers or {})}


def test_lone_surrogates_in_any_text_field_are_400(server):
    image = data_url(png_bytes(1))
    with httpx.Client(base_url=server.url, timeout=30, headers=auth()) as c:
        # a JSON body with an escaped lone surrogate is valid JSON
        body = '{"image": "%s", "question": "what \\ud800?"}' % image
        r = c.post("/v1/answer", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "question"
        body = '{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi \\udfff"}, ' \
               '{"type": "image_url", "image_url": {"url": "%s"}}]}]}' % image
        r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


def test_docs_and_openapi_need_the_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("/docs", "/openapi.json"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers=auth()).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_streaming_with_beams_is_a_400(server):
    with httpx.Client(base_url=server.url, timeout=30, headers=auth()) as c:
        r = c.post("/v1/caption", json={"image": data_url(png_bytes(2)), "stream": True, "num_beams": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "num_beams"
        r = c.post("/v1/chat/completions", json={"stream": True, "num_beams": 2, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(2))}}]}]})
        assert r.status_code == 400


def test_idle_sockets_are_closed_and_do_not_lock_others_out(server):
    import socket
    import time

    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]  # more than the limit
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\n")  # headers started, never finished
    time.sleep(1.5)
    for sock in idle + [slow]:
        sock.settimeout(5)
        try:
            assert sock.recv(1024) == b""  # the server closed it
        except ConnectionResetError:
            pass
        sock.close()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200


def test_a_body_that_never_arrives_times_out(server):
    import socket

    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"image\"")
    sock.settimeout(10)
    reply = b""
    try:
        while chunk := sock.recv(4096):
            reply += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    assert reply.startswith(b"HTTP/1.1 408")


def test_a_client_leaving_mid_stream_leaves_no_pending_task(engine, caplog):
    """The stream's generator is closed while it waits for a piece: nothing may be left pending."""
    from blip2.server.app import GenerationStream

    gate = threading.Event()

    def slow_run(key, jobs):
        gate.wait(10)
        return engine.run(key, jobs)

    async def main():
        b = Batcher(slow_run, max_batch=1, max_wait_s=0.0)
        await b.start()
        image = ImageData("y", image=decode_image(png_bytes(3), 10**6))
        stream = GenerationStream(b, GenerateJob(image, "", GenerationSettings(max_new_tokens=4)))
        first = asyncio.create_task(stream.start())
        await asyncio.sleep(0.2)
        first.cancel()  # the client went away before the first piece
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        await asyncio.sleep(0.2)
        await b.stop()
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]

    with caplog.at_level("ERROR", logger="asyncio"):
        pending = asyncio.run(main())
        import gc

        gc.collect()
    assert pending == []
    assert "Task was destroyed" not in caplog.text


def test_settings_refuse_nan_and_serve_refuses_bad_options():
    from blip2.cli import build_parser

    with pytest.raises(ValueError, match="max_wait_ms"):
        server_settings(max_wait_ms=float("nan")).validate()
    with pytest.raises(ValueError, match="request_timeout_s"):
        server_settings(request_timeout_s=float("inf")).validate()
    parser = build_parser()
    for argv in (["--dtype", "float64"], ["--max-batch", "0"], ["--port", "-1"], ["--timeout", "nan"],
                 ["--max-body-mb", "-1"], ["--cache-size", "-5"], ["--device", "cuda:99"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["serve", *argv])
        assert exit_.value.code == 2, argv
