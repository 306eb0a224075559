"""The bad-request matrix: every malformed, oversized or absurd request gets a 4xx with a clear JSON
message, and the server keeps serving good requests in between and after."""

from __future__ import annotations

import base64
import io
import json
import socket

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from test_server_fixtures import ServerThread, data_url, make_engine, png_bytes, server_settings  # noqa: E402

from blip2.server.app import create_app  # noqa: E402

GOOD = data_url(png_bytes(1))
PNG = png_bytes(2)


def _huge_png() -> bytes:
    """2000 x 2000 pixels (over the test limit of 1e6) in a few kilobytes."""
    buf = io.BytesIO()
    Image.new("1", (2000, 2000)).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chat(**extra):
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": GOOD}},
                                           {"type": "text", "text": "what is it?"}]}
    return {"messages": [message], **extra}


# (name, method, path, httpx keyword arguments, expected status, words the message must contain)
CASES = [
    ("malformed json", "POST", "/v1/caption", dict(content=b'{"image": ', headers={"content-type": "application/json"}), 400, "not valid JSON"),
    ("json not an object", "POST", "/v1/caption", dict(json=[1, 2]), 400, "must be an object"),
    ("json not utf-8", "POST", "/v1/caption", dict(content=b"\xff\xfe{}", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    ("text/plain body", "POST", "/v1/caption", dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "content type"),
    ("no content type", "POST", "/v1/caption", dict(content=b"hello"), 415, "content type"),
    ("missing image", "POST", "/v1/caption", dict(json={}), 400, "'image' is required"),
    ("image not a string", "POST", "/v1/caption", dict(json={"image": 12}), 400, "base64"),
    ("invalid base64", "POST", "/v1/caption", dict(json={"image": "not base64!!"}), 400, "not valid base64"),
    ("data url not base64", "POST", "/v1/caption", dict(json={"image": "data:image/png,abc"}), 400, "base64"),
    ("remote url", "POST", "/v1/caption", dict(json={"image": "http://example.com/x.png"}), 400, "does not fetch"),
    ("corrupt image", "POST", "/v1/caption", dict(json={"image": _b64(b"\x89PNG\r\n\x1a\n" + b"junk" * 50)}), 400, "could not be decoded"),
    ("truncated image", "POST", "/v1/caption", dict(json={"image": _b64(PNG[: len(PNG) // 2])}), 400, "could not be decoded"),
    ("not an image", "POST", "/v1/caption", dict(files={"image": ("a.txt", b"just some text", "text/plain")}), 400, "could not be decoded"),
    ("empty upload", "POST", "/v1/caption", dict(files={"image": ("a.png", b"", "image/png")}), 400, "empty"),
    ("too many pixels", "POST", "/v1/caption", dict(json={"image": _b64(_huge_png())}), 413, "pixels"),
    ("body too large", "POST", "/v1/caption", dict(json={"image": "A" * (3 * 2**20)}), 413, "larger than the limit"),
    ("upload too large", "POST", "/v1/caption", dict(files={"image": ("a.png", b"\0" * (3 * 2**20), "image/png")}), 413, "larger than the limit"),
    ("multipart without image", "POST", "/v1/caption", dict(data={"prompt": "a photo of"}, files={"other": ("a", b"x", "text/plain")}), 400, "'image' is required"),
    ("broken multipart", "POST", "/v1/caption", dict(content=b"--xyz\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=xyz"}), 400, "multipart"),
    ("max_new_tokens huge", "POST", "/v1/caption", dict(json={"image": GOOD, "max_new_tokens": 10**9}), 400, "between 1 and 64"),
    ("max_new_tokens zero", "POST", "/v1/caption", dict(json={"image": GOOD, "max_new_tokens": 0}), 400, "max_new_tokens"),
    ("max_new_tokens text", "POST", "/v1/caption", dict(json={"image": GOOD, "max_new_tokens": "many"}), 400, "integer"),
    ("max_new_tokens float", "POST", "/v1/caption", dict(json={"image": GOOD, "max_new_tokens": 2.5}), 400, "integer"),
    ("max_new_tokens bool", "POST", "/v1/caption", dict(json={"image": GOOD, "max_new_tokens": True}), 400, "integer"),
    ("num_beams absurd", "POST", "/v1/caption", dict(json={"image": GOOD, "num_beams": 1000}), 400, "num_beams"),
    ("negative temperature", "POST", "/v1/caption", dict(json={"image": GOOD, "temperature": -1}), 400, "temperature"),
    ("nan temperature", "POST", "/v1/caption", dict(content=b'{"image": "%s", "temperature": NaN}' % GOOD.encode(), headers={"content-type": "application/json"}), 400, "finite"),
    ("sampling at temperature 0", "POST", "/v1/caption", dict(json={"image": GOOD, "do_sample": True, "temperature": 0}), 400, "temperature"),
    ("top_p above 1", "POST", "/v1/caption", dict(json={"image": GOOD, "top_p": 2}), 400, "top_p"),
    ("stream not a bool", "POST", "/v1/caption", dict(json={"image": GOOD, "stream": "maybe"}), 400, "true or false"),
    ("prompt not a string", "POST", "/v1/caption", dict(json={"image": GOOD, "prompt": ["a"]}), 400, "must be a string"),
    ("prompt too long", "POST", "/v1/caption", dict(json={"image": GOOD, "prompt": "red " * 1000}), 400, "characters long"),
    ("prompt too many tokens", "POST", "/v1/caption", dict(json={"image": GOOD, "prompt": "red " * 300}), 400, "tokens long"),
    ("prompt with NUL", "POST", "/v1/caption", dict(json={"image": GOOD, "prompt": "a\x00b"}), 400, "NUL"),
    ("missing question", "POST", "/v1/answer", dict(json={"image": GOOD}), 400, "'question' is required"),
    ("blank question", "POST", "/v1/answer", dict(json={"image": GOOD, "question": "   "}), 400, "'question' is required"),
    ("template without slot", "POST", "/v1/answer", dict(json={"image": GOOD, "question": "what", "prompt_template": "Q: A:"}), 400, "prompt_template"),
    ("chat without messages", "POST", "/v1/chat/completions", dict(json={"model": "x"}), 400, "'messages' is required"),
    ("chat messages not a list", "POST", "/v1/chat/completions", dict(json={"messages": "hi"}), 400, "'messages' is required"),
    ("chat bad role", "POST", "/v1/chat/completions", dict(json={"messages": [{"role": "robot", "content": "hi"}]}), 400, "role"),
    ("chat without image", "POST", "/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": "hi"}]}), 400, "needs an image"),
    ("chat bad part", "POST", "/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 400, "content parts"),
    ("chat remote image", "POST", "/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}), 400, "does not fetch"),
    ("chat n=2", "POST", "/v1/chat/completions", dict(json=chat(n=2)), 400, "'n' must be 1"),
    ("chat max_tokens absurd", "POST", "/v1/chat/completions", dict(json=chat(max_tokens=-5)), 400, "max_tokens"),
    ("chat tools", "POST", "/v1/chat/completions", dict(json=chat(tools=[{"type": "function"}])), 400, "tools"),
    ("match without texts", "POST", "/v1/match", dict(json={"image": GOOD}), 400, "'text' is required"),
    ("match empty texts", "POST", "/v1/match", dict(json={"image": GOOD, "texts": []}), 400, "required"),
    ("match non-string texts", "POST", "/v1/match", dict(json={"image": GOOD, "texts": ["a", 3]}), 400, "non-empty string"),
    ("match too many texts", "POST", "/v1/match", dict(json={"image": GOOD, "texts": ["a"] * 100}), 400, "limit is 32"),
    ("match bad mode", "POST", "/v1/match", dict(json={"image": GOOD, "texts": ["a"], "mode": "magic"}), 400, "'mode'"),
    ("embeddings nothing", "POST", "/v1/embeddings", dict(json={"model": "x"}), 400, "'input'"),
    ("embeddings bad input", "POST", "/v1/embeddings", dict(json={"input": {"a": 1}}), 400, "'input'"),
    ("unknown path", "GET", "/v1/nothing", {}, 404, "no such endpoint"),
    ("wrong method", "GET", "/v1/caption", {}, 405, "not allowed"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = make_engine(tmp_path_factory.mktemp("errors"), server_settings())
    with ServerThread(create_app(engine)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def good_request_works(client) -> None:
    r = client.post("/v1/caption", json={"image": GOOD, "max_new_tokens": 3})
    assert r.status_code == 200 and r.json()["caption"], r.text


@pytest.mark.parametrize("name,method,path,kwargs,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_a_clear_4xx(client, name, method, path, kwargs, status, words):
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert words.lower() in error["message"].lower(), error
    assert error["code"] == status and error["type"]


def test_the_server_keeps_serving_after_the_whole_matrix(client):
    good_request_works(client)
    for _, method, path, kwargs, status, _ in CASES:
        assert client.request(method, path, **kwargs).status_code == status
    good_request_works(client)
    by_status = client.get("/metrics").json()["requests"]["by_status"]
    assert "500" not in by_status, by_status
    assert by_status.get("200", 0) >= 2


def test_a_client_that_sends_garbage_bytes_does_not_hurt_the_server(server, client):
    host, port = "127.0.0.1", server.port
    for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"POST /v1/caption HTTP/1.1\r\nContent-Length: 99\r\n\r\n{"):
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            s.recv(1024)  # whatever the answer (400, or a close), the server must stay up
    good_request_works(client)


def test_a_client_that_leaves_mid_stream_does_not_hurt_the_server(server, client):
    body = {"image": GOOD, "question": "what colour", "stream": True, "max_new_tokens": 60, "min_new_tokens": 60}
    with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", "/v1/answer", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # read one event, then hang up
    good_request_works(client)
    m = client.get("/metrics").json()
    assert m["requests"]["in_flight"] == 1  # only this /metrics request
    assert json.dumps(m)  # metrics stay serialisable


def test_a_chunked_body_without_length_is_cut_off_at_the_limit(client):
    def chunks():
        for _ in range(3):
            yield b"A" * 2**20  # 3 MiB in all, over the 2 MiB test limit, with no Content-Length

    r = client.post("/v1/caption", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]["message"]
    good_request_works(client)
