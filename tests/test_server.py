"""`blip2 serve` over real HTTP: a uvicorn server on a loopback port, tiny random checkpoints.

Covers every endpoint, streaming (answer and OpenAI chat), concurrent requests sharing a
batch (seen in /metrics), the image-feature cache, the API key, a full queue (503 +
Retry-After) and per-request timeouts (504).
"""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_server_fixtures import (  # noqa: E402
    ServerThread, data_url, make_engine, png_bytes, server_settings, sse_events,
)

from blip2.server.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_engine(tmp_path_factory.mktemp("server"), server_settings())


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine)) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def metrics(client) -> dict:
    return client.get("/metrics").json()


# ---------------------------------------------------------------- the simple endpoints
def test_health_models_page_and_metrics(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["captioning"] and health["retrieval"]
    assert not health["auth_required"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-blip2"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="caption"' in page.text and "/v1/answer" in page.text
    m = metrics(client)
    assert {"batcher", "cache", "requests", "peak_rss_mb"} <= set(m)
    assert m["peak_rss_mb"] > 10


# ---------------------------------------------------------------- caption and answer
def test_caption_json_and_multipart_agree_and_the_second_hits_the_cache(client):
    image = png_bytes(100)
    first = client.post("/v1/caption", json={"image": data_url(image)})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["caption"] and body["cached"] is False
    assert body["usage"]["completion_tokens"] >= 1 and body["finish_reason"] in ("stop", "length")
    hits = metrics(client)["cache"]["hits"]
    second = client.post("/v1/caption", files={"image": ("x.png", image, "image/png")})
    assert second.status_code == 200, second.text
    assert second.json()["caption"] == body["caption"]
    assert second.json()["cached"] is True
    assert metrics(client)["cache"]["hits"] == hits + 1
    # raw base64 (no data: prefix) works too
    import base64

    third = client.post("/v1/caption", json={"image": base64.b64encode(image).decode()})
    assert third.json()["caption"] == body["caption"]


def test_caption_prompt_and_generation_options(client):
    image = data_url(png_bytes(101))
    r = client.post("/v1/caption", json={"image": image, "prompt": "a photo of", "max_new_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3
    beams = client.post("/v1/caption", json={"image": image, "num_beams": 3, "max_new_tokens": 4})
    assert beams.status_code == 200, beams.text
    sampled = client.post("/v1/caption", json={"image": image, "temperature": 0.8, "seed": 7, "max_new_tokens": 5})
    again = client.post("/v1/caption", json={"image": image, "temperature": 0.8, "seed": 7, "max_new_tokens": 5})
    assert sampled.status_code == 200 and sampled.json()["caption"] == again.json()["caption"]


def test_answer_streams_the_same_text_it_answers(client):
    image = data_url(png_bytes(102))
    plain = client.post("/v1/answer", json={"image": image, "question": "what colour is the circle?"})
    assert plain.status_code == 200, plain.text
    answer = plain.json()["answer"]
    with client.stream("POST", "/v1/answer", json={"image": image, "question": "what colour is the circle?",
                                                   "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    deltas = [e["delta"] for e in events if "delta" in e]
    assert len(deltas) >= 2, events  # it arrived in pieces, not at once
    assert events[-1]["done"] is True and events[-1]["answer"] == answer
    assert "".join(deltas).strip() == answer
    assert events[-1]["cached"] is True  # the plain request had cached the image's features


def test_answer_with_a_custom_template(client):
    r = client.post("/v1/answer", json={"image": data_url(png_bytes(103)), "question": "how many shapes",
                                        "prompt_template": "Q: {} A:"})
    assert r.status_code == 200 and r.json()["question"] == "how many shapes"


# ---------------------------------------------------------------- OpenAI chat completions
def chat_body(image: bytes, text: str | None = "what is in the picture?", **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    if text:
        content.append({"type": "text", "text": text})
    return {"model": "tiny-blip2", "messages": [{"role": "user", "content": content}], **extra}


def test_chat_completions(client):
    r = client.post("/v1/chat/completions", json=chat_body(png_bytes(104), max_tokens=6))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 6
    # the same question through /v1/answer gives the same text
    answer = client.post("/v1/answer", json={"image": data_url(png_bytes(104)), "question": "what is in the picture?",
                                             "max_new_tokens": 6}).json()["answer"]
    assert choice["message"]["content"] == answer


def test_chat_completions_stream(client):
    body = chat_body(png_bytes(105), max_tokens=8, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish and finish[-1] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    plain = client.post("/v1/chat/completions", json=chat_body(png_bytes(105), max_tokens=8)).json()
    assert text.strip() == plain["choices"][0]["message"]["content"]


def test_chat_with_an_image_only_captions(client):
    image = png_bytes(106)
    chat = client.post("/v1/chat/completions", json=chat_body(image, text=None, max_tokens=12)).json()
    caption = client.post("/v1/caption", json={"image": data_url(image), "max_new_tokens": 12}).json()["caption"]
    assert chat["choices"][0]["message"]["content"] == caption


# ---------------------------------------------------------------- retrieval
def test_match_itm_and_itc(client):
    image = data_url(png_bytes(107))
    both = client.post("/v1/match", json={"image": image, "texts": ["a red circle", "two blue squares"]})
    assert both.status_code == 200, both.text
    rows = both.json()["scores"]
    assert [r["text"] for r in rows] == ["a red circle", "two blue squares"]
    assert all(0.0 <= r["itm_probability"] <= 1.0 and -1.0 <= r["itc_score"] <= 1.0 for r in rows)
    itc = client.post("/v1/match", json={"image": image, "text": "a red circle", "mode": "itc"}).json()["scores"]
    assert set(itc[0]) == {"text", "itc_score"} and itc[0]["itc_score"] == pytest.approx(rows[0]["itc_score"], abs=1e-5)
    form = client.post("/v1/match", data={"texts": ["a red circle", "two blue squares"], "mode": "itm"},
                       files={"image": ("x.png", png_bytes(107), "image/png")})
    assert [r["itm_probability"] for r in form.json()["scores"]] == pytest.approx(
        [r["itm_probability"] for r in rows], abs=1e-5)


def test_embeddings(client):
    r = client.post("/v1/embeddings", json={"input": ["a red circle", "a blue star"], "image": data_url(png_bytes(108))})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["kind"] for d in data] == ["text", "text", "image"]
    assert len(data[0]["embedding"]) == 16 and len(data[2]["query_embeddings"]) == 4
    norm = sum(x * x for x in data[0]["embedding"]) ** 0.5
    assert norm == pytest.approx(1.0, abs=1e-4)
    single = client.post("/v1/embeddings", json={"input": "a red circle"}).json()["data"]
    assert single[0]["embedding"] == pytest.approx(data[0]["embedding"], abs=1e-5)


# ---------------------------------------------------------------- batching
@pytest.fixture(scope="module")
def micro_server(engine):
    """The micro-batcher (`--batching micro`); continuous batching is tested in test_server_scheduler.py."""
    with ServerThread(create_app(engine, server_settings(batching="micro"))) as running:
        yield running


@pytest.fixture
def micro_client(micro_server):
    with httpx.Client(base_url=micro_server.url, timeout=30) as c:
        yield c


def test_concurrent_requests_share_a_batch_and_match_sequential_results(micro_client, micro_server):
    client, server = micro_client, micro_server
    images = [png_bytes(200 + i) for i in range(6)]
    sequential = [client.post("/v1/caption", json={"image": data_url(im), "max_new_tokens": 10}).json()["caption"]
                  for im in images]
    before = metrics(client)["batcher"]
    questions = [("/v1/answer", {"image": data_url(im), "question": q, "max_new_tokens": 10})
                 for im, q in zip(images, ["what colour", "how many shapes are there", "is there a star",
                                           "what", "what shape is on the left of the picture", "where"])]
    captions = [("/v1/caption", {"image": data_url(im), "max_new_tokens": 10}) for im in images]
    barrier = threading.Barrier(len(questions) + len(captions))

    def send(job):
        path, body = job
        with httpx.Client(base_url=server.url, timeout=30) as c:
            barrier.wait()
            return c.post(path, json=body)

    with concurrent.futures.ThreadPoolExecutor(len(questions) + len(captions)) as pool:
        responses = list(pool.map(send, questions + captions))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    after = metrics(client)["batcher"]
    new_batches = after["batches"] - before["batches"]
    assert new_batches < len(responses), after  # some requests shared a forward pass
    assert after["max_batch_size_seen"] > 1
    assert [r.json()["caption"] for r in responses[len(questions):]] == sequential
    # answers batched with differently long prompts (left padding) equal answers asked alone
    alone = [client.post(path, json=body).json()["answer"] for path, body in questions]
    assert [r.json()["answer"] for r in responses[: len(questions)]] == alone


# ---------------------------------------------------------------- access, overload, timeouts
def test_api_key(engine):
    app = create_app(engine, server_settings(api_key="s3cret"))
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/healthz").json()["auth_required"] is True
        assert c.get("/").status_code == 200
        denied = c.get("/v1/models")
        assert denied.status_code == 401 and "API key" in denied.json()["error"]["message"]
        assert c.get("/metrics").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200


class BlockingEngine:
    """Wraps an engine so each batch waits for a gate: the test decides when the model finishes
    (the micro-batcher's batch function; test_server_scheduler.py blocks the continuous one)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, key, jobs):
        self.entered.release()
        self.gate.wait(30)
        return self.engine.run(key, jobs)


def test_a_full_queue_answers_503_with_retry_after(engine):
    blocking = BlockingEngine(engine)
    app = create_app(blocking, server_settings(max_queue=1, max_batch=1, max_wait_ms=0, batching="micro"))
    body = {"image": data_url(png_bytes(300)), "max_new_tokens": 2}
    with ServerThread(app) as s, concurrent.futures.ThreadPoolExecutor(2) as pool:
        post = lambda: httpx.post(f"{s.url}/v1/caption", json=body, timeout=30)  # noqa: E731
        running = pool.submit(post)
        assert blocking.entered.acquire(timeout=20)  # the first request is in the model
        queued = pool.submit(post)
        deadline = 200
        while not httpx.get(f"{s.url}/metrics").json()["batcher"]["queued"] and deadline:
            deadline -= 1
            threading.Event().wait(0.02)
        refused = httpx.post(f"{s.url}/v1/caption", json=body, timeout=30)
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert "busy" in refused.json()["error"]["message"]
        blocking.gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
        assert httpx.get(f"{s.url}/metrics").json()["batcher"]["rejected"] == 1


def test_a_slow_request_times_out_with_504_and_the_server_goes_on(engine):
    blocking = BlockingEngine(engine)
    app = create_app(blocking, server_settings(request_timeout_s=0.5, max_wait_ms=0, batching="micro"))
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post("/v1/caption", json={"image": data_url(png_bytes(301)), "max_new_tokens": 2})
        assert r.status_code == 504 and "longer than 0.5 s" in r.json()["error"]["message"]
        blocking.gate.set()
        ok = c.post("/v1/caption", json={"image": data_url(png_bytes(301)), "max_new_tokens": 2})
        assert ok.status_code == 200
        assert c.get("/metrics").json()["batcher"]["timeouts"] == 1
