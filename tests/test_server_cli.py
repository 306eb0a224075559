"""`blip2 serve` as a real process: it loads checkpoints from disk, binds loopback, serves, and on
SIGTERM lets the requests already in flight finish before it exits cleanly."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_server_fixtures import (  # noqa: E402
    data_url, free_port, make_captioning_checkpoint, make_retrieval_checkpoint, png_bytes,
)

from blip2.cli import build_parser  # noqa: E402
from blip2.server.cli import is_loopback, settings_from_args  # noqa: E402


def test_serve_arguments_and_defaults():
    args = build_parser().parse_args(["serve", "--model", "m", "--max-batch", "4", "--api-key", "k"])
    assert args.host == "127.0.0.1"  # loopback unless told otherwise
    settings = settings_from_args(args)
    assert settings.max_batch == 4 and settings.api_key == "k"
    assert settings.batching == "continuous" and settings.kv_cache_mb is None
    micro = settings_from_args(build_parser().parse_args(["serve", "--batching", "micro", "--kv-cache-mb", "64"]))
    assert micro.batching == "micro" and micro.kv_cache_mb == 64
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return make_captioning_checkpoint(root / "captioning"), make_retrieval_checkpoint(root / "retrieval")


def start(checkpoints, *extra: str) -> tuple[subprocess.Popen, str]:
    captioning, retrieval = checkpoints
    port = free_port()
    cmd = [sys.executable, "-m", "blip2.cli", "serve", "--model", str(captioning), "--retrieval-model", str(retrieval),
           "--port", str(port), "--log-level", "warning", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"blip2 serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"blip2 serve did not come up:\n{proc.stdout.read()}")


def test_serve_loads_checkpoints_and_drains_in_flight_requests_on_sigterm(checkpoints):
    proc, url = start(checkpoints, "--max-batch", "1", "--max-wait-ms", "0")
    try:
        models = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert models["captioning"] and models["retrieval"]
        image = data_url(png_bytes(7))
        assert httpx.post(f"{url}/v1/match", json={"image": image, "text": "a red circle"}).status_code == 200
        # Requests one per batch, each forced to run 40 steps: some are still queued at SIGTERM.
        body = {"image": image, "max_new_tokens": 40, "min_new_tokens": 40}
        n = 16  # enough queued work that some is certainly pending when the signal comes
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/caption", json=body, timeout=60) for _ in range(n)]
            deadline = time.monotonic() + 30
            # Signal only once every request has reached the server (answered, queued or running):
            # on a loaded machine a request still connecting would rightly be refused after SIGTERM.
            while time.monotonic() < deadline:
                b = httpx.get(f"{url}/metrics").json()["batcher"]
                arrived = b["queued"] + b["running"] + sum(f.done() for f in futures)
                if arrived >= n and b["queued"] + b["running"] >= 2:
                    break
                time.sleep(0.05)
            assert b["queued"] + b["running"] >= 2, b  # work was still pending when the signal came
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses]
        assert all(r.json()["usage"]["completion_tokens"] == 40 for r in responses)
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc), the multiprocessing helper excepted."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid and b"resource_tracker" not in cmdline:
                found.append(int(entry))
    return found


def _sample(text: str, name: str) -> float | None:
    """One sample's value from Prometheus text (labels as written)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _responses(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("blip2_responses_total{"))


def _durations(text: str) -> float:
    """Requests counted by the latency histogram (summed over workers as they finish)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("blip2_request_duration_seconds_count{"))


def _scrape_until(check, url: str, tries: int = 20, ready=lambda: True) -> None:
    """Scrapes /metrics, 1.2 s apart, until `check(text)` holds; fails with the last scrape if it never does."""
    text = ""
    for _ in range(tries):
        if ready():
            text = httpx.get(f"{url}/metrics?format=prometheus").text
            if check(text):
                return
        time.sleep(1.2)
    raise AssertionError("\n".join(line for line in text.splitlines() if not line.startswith("#"))[-3000:])


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts worker processes through /proc")
def test_serve_workers_share_one_port_each_with_its_model(checkpoints):
    proc, url = start(checkpoints, "--workers", "2", "--max-batch", "2")
    try:
        deadline = time.monotonic() + 60
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        body = {"image": data_url(png_bytes(9)), "max_new_tokens": 6}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"{url}/v1/caption", json=body, timeout=60), range(8)))
        assert [r.status_code for r in responses] == [200] * 8
        assert len({r.json()["caption"] for r in responses}) == 1  # the same model in every worker
        # /healthz until both workers have answered; Prometheus /metrics then counts every one of
        # those calls whichever worker it asks (multiprocess mode), not just its own share
        healthz = 'blip2_request_duration_seconds_count{route="/healthz",status="200"}'
        before = _sample(httpx.get(f"{url}/metrics?format=prometheus").text, healthz) or 0  # start() polled it
        seen, calls = set(), 0
        while seen != set(workers) and calls < 400:
            seen.add(httpx.get(f"{url}/healthz").json()["pid"])
            calls += 1
        assert seen == set(workers)
        counted = None
        for _ in range(50):
            text = httpx.get(f"{url}/metrics?format=prometheus").text
            counted = _sample(text, healthz) - before
            if counted == calls:
                break
            time.sleep(0.1)
        assert counted == calls and _sample(text, "blip2_generated_tokens_total") == 8 * 6
        # The live state is summed too: both workers' batch capacities, and every worker's responses
        # (each publishes about once a second, so the scrapes leave it time)
        _scrape_until(lambda t: _sample(t, "blip2_batch_capacity") == 2 * 2 and _responses(t) == _durations(t), url)
        # A worker that dies stops counting: uvicorn starts another, and the sum is of the two alive
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (workers[0] in _children(proc.pid) or len(_children(proc.pid)) < 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        workers, answered = _children(proc.pid), set()

        def both_answered() -> bool:  # the new worker is up once it has answered (calls land where the kernel puts them)
            answered.update(httpx.get(f"{url}/healthz", timeout=30).json()["pid"] for _ in range(20))
            return answered >= set(workers)

        _scrape_until(lambda t: _sample(t, "blip2_batch_capacity") == 2 * 2 and _sample(t, "blip2_queue_depth") == 0,
                      url, tries=40, ready=both_answered)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not any(_running(w) for w in workers)  # the workers drained and exited with it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
