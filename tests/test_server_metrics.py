"""GET /metrics in Prometheus text (prometheus-client) beside the JSON summary; JSON access logs."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

from test_server_fixtures import ServerThread, data_url, make_engine, png_bytes, server_settings, sse_events  # noqa: E402

from blip2.server.app import create_app  # noqa: E402


def scrape(client, **kwargs) -> dict[str, dict]:
    """{sample name: {labels as a sorted tuple: value}} from the Prometheus text."""
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict] = {}
    for family in parser.text_string_to_metric_families(response.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_prometheus_metrics_follow_the_requests(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="blip2.access")
    engine = make_engine(tmp_path, server_settings(), retrieval=False)
    with ServerThread(create_app(engine)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        image = data_url(png_bytes(7))
        tokens = 0
        for _ in range(2):  # the second hits the image-feature cache
            body = client.post("/v1/caption", json={"image": image, "max_new_tokens": 5}).json()
            tokens += body["usage"]["completion_tokens"]
        with client.stream("POST", "/v1/caption", json={"image": image, "max_new_tokens": 3, "stream": True}) as r:
            events = sse_events(r)
        tokens += events[-1]["usage"]["completion_tokens"]
        assert client.post("/v1/caption", json={"image": "not base64 !"}).status_code == 400

        m = scrape(client, params={"format": "prometheus"})
        assert m["blip2_generated_tokens_total"][()] == tokens
        assert m["blip2_time_to_first_token_seconds_count"][()] == 3
        assert m["blip2_request_duration_seconds_count"][(("route", "/v1/caption"), ("status", "200"))] == 3
        assert m["blip2_responses_total"][(("status", "400"),)] == 1
        assert m["blip2_image_cache_hits_total"][()] >= 2 and m["blip2_image_cache_misses_total"][()] == 1
        assert m["blip2_queue_depth"][()] == 0
        batches = client.get("/metrics").json()["batcher"]["batches"]  # JSON stays the default
        assert m["blip2_batch_occupancy_count"][()] == batches
        assert m["blip2_batch_occupancy_bucket"][(("le", "+Inf"),)] == batches
        assert m["blip2_kv_slots"][()] == 8 and m["blip2_kv_slots_used"][()] == 0  # continuous: all rows free
        assert m["blip2_kv_cache_bytes"][()] == client.get("/metrics").json()["batcher"]["kv_cache_bytes"] > 0
        # Prometheus itself asks through the Accept header
        again = scrape(client, headers={"Accept": "text/plain;version=0.0.4"})
        assert again["blip2_responses_total"][(("status", "200"),)] >= 4

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "blip2.access"]
    caption = [line for line in lines if line["path"] == "/v1/caption"]
    assert [line["status"] for line in caption] == [200, 200, 200, 400]
    assert all(line["method"] == "POST" and line["ms"] >= 0 for line in caption)
