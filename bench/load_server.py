"""Load test for `blip2 serve`: N concurrent clients on loopback against the same requests sent one at a time.

Starts the server (the shipped demo model unless --model or --url says otherwise), sends a
fixed list of caption and question requests first sequentially, then from N concurrent
clients, and prints throughput for both, the ratio, the error count (must be 0), the batch
sizes the server used, and the server's peak RSS.

    python bench/load_server.py [--model DIR] [--clients 16] [--requests 64] [--json]
    python bench/load_server.py --url http://127.0.0.1:8000   # an already running server

The feature cache is off by default (--cache-size 0) so both passes pay for every image:
the ratio then measures batching alone, not cache hits from the first pass.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

QUESTIONS = ["what colour is the circle?", "how many shapes are there?", "is there a square?",
             "what shape is on the left?", "what colour is the background?", "is there a red shape?"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running server (then nothing is started)")
    p.add_argument("--model", help="checkpoint to serve (default: the shipped demo model)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=64, help="requests per pass")
    p.add_argument("--images", type=int, default=16, help="distinct images among the requests")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--cache-size", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the server (OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the requests
def example_images(count: int, seed: int) -> list[bytes]:
    """PNG bytes: the demo's example pictures when installed, random-colour pictures otherwise."""
    from PIL import Image

    found = []
    try:
        from blip2.demo import EXAMPLES_DIR

        found = sorted(p for p in Path(EXAMPLES_DIR).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    except ImportError:
        pass
    rng = random.Random(seed)
    images = []
    for n in range(count):
        if found:
            picture = Image.open(found[n % len(found)]).convert("RGB")
            if n >= len(found):  # more requests than examples: flip or rotate so the bytes differ
                picture = picture.rotate(90 * (n // len(found)))
        else:
            picture = Image.new("RGB", (224, 224), tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        images.append(buf.getvalue())
    return images


def make_requests(args) -> list[tuple[str, dict]]:
    images = [f"data:image/png;base64,{base64.b64encode(b).decode()}" for b in example_images(args.images, args.seed)]
    rng = random.Random(args.seed)
    requests = []
    for n in range(args.requests):
        image = images[n % len(images)]
        if n % 2:
            requests.append(("/v1/answer", {"image": image, "question": rng.choice(QUESTIONS),
                                            "max_new_tokens": args.max_new_tokens}))
        else:
            requests.append(("/v1/caption", {"image": image, "max_new_tokens": args.max_new_tokens}))
    return requests


# ---------------------------------------------------------------- sending them
async def run_pass(url: str, requests: list[tuple[str, dict]], clients: int) -> dict:
    """All requests through `clients` concurrent connections; returns timings and errors."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    errors: list[str] = []
    latencies: list[float] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            while not queue.empty():
                path, body = queue.get_nowait()
                started = time.perf_counter()
                try:
                    r = await http.post(path, json=body)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as err:
                    errors.append(f"{type(err).__name__}: {err}")
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - started
    latencies.sort()
    return {"clients": clients, "requests": len(requests), "seconds": round(seconds, 3),
            "requests_per_s": round(len(requests) / seconds, 3), "errors": len(errors), "error_samples": errors[:3],
            "p50_latency_s": round(latencies[len(latencies) // 2], 3),
            "p95_latency_s": round(latencies[int(len(latencies) * 0.95) - 1], 3)}


# ---------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "blip2.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", str(max(64, args.clients * 2)), "--cache-size", str(args.cache_size),
           "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, url)
    return proc, url


def wait_until_up(proc: subprocess.Popen, url: str, timeout_s: float = 300) -> None:
    """Polls /healthz until the server answers; stops the benchmark if it exits or never comes up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not come up within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def vm_hwm_mb(pid: int) -> float | None:
    """Peak RSS from /proc (Linux), read while the process is alive."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    requests = make_requests(args)
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        warm = asyncio.run(run_pass(url, requests[: min(4, len(requests))], 1))  # first-call costs out of the way
        before = httpx.get(f"{url}/metrics").json()["batcher"]
        sequential = asyncio.run(run_pass(url, requests, 1))
        middle = httpx.get(f"{url}/metrics").json()["batcher"]
        concurrent = asyncio.run(run_pass(url, requests, args.clients))
        metrics = httpx.get(f"{url}/metrics").json()
        hwm = vm_hwm_mb(proc.pid) if proc else None
    finally:
        exit_status = stop_server(proc) if proc else None
    after = metrics["batcher"]
    report = {
        "server": url if args.url else f"blip2 serve --model {args.model or '(demo)'}",
        "sequential": sequential,
        "concurrent": concurrent,
        "throughput_ratio": round(concurrent["requests_per_s"] / sequential["requests_per_s"], 2),
        "errors": sequential["errors"] + concurrent["errors"] + warm["errors"],
        "batches": {"sequential": middle["batches"] - before["batches"], "concurrent": after["batches"] - middle["batches"]},
        "batch_sizes_total": after["batch_sizes"],
        "max_batch_size_seen": after["max_batch_size_seen"],
        "server_peak_rss_mb": hwm or metrics["peak_rss_mb"],
        "server_exit_status": exit_status,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["errors"] == 0 else 1


def print_report(r: dict) -> None:
    s, c = r["sequential"], r["concurrent"]
    print(f"server: {r['server']}")
    print(f"{'pass':12s} {'clients':>7s} {'requests':>8s} {'seconds':>8s} {'req/s':>8s} {'p50 s':>7s} {'p95 s':>7s} {'errors':>6s}")
    for name, p in (("sequential", s), ("concurrent", c)):
        print(f"{name:12s} {p['clients']:7d} {p['requests']:8d} {p['seconds']:8.2f} {p['requests_per_s']:8.2f} "
              f"{p['p50_latency_s']:7.3f} {p['p95_latency_s']:7.3f} {p['errors']:6d}")
    print(f"throughput ratio (concurrent / sequential): {r['throughput_ratio']:.2f}x")
    print(f"batches: {r['batches']['sequential']} sequential, {r['batches']['concurrent']} concurrent; "
          f"largest batch {r['max_batch_size_seen']}; sizes {r['batch_sizes_total']}")
    print(f"errors: {r['errors']}")
    print(f"server peak RSS: {r['server_peak_rss_mb']} MB")
    for p in (s, c):
        for sample in p["error_samples"]:
            print(f"  error: {sample}")


if __name__ == "__main__":
    sys.exit(main())
