"""`blip2 serve`: the HTTP service on uvicorn, on loopback unless told otherwise."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import ipaddress
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading

from ..cli import device_option, float_option, int_option
from .limits import Settings
from .telemetry import MULTIPROC_ENV

DTYPES = ("auto", "checkpoint", "float32", "float16", "bfloat16")  # auto: bf16 where native; checkpoint: config.json's

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `serve` on the `blip2` command's subparsers."""
    d = Settings()
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (JSON API, OpenAI-style chat, a web page)",
        description="Serve a BLIP-2 model over HTTP: POST /v1/caption, /v1/answer, /v1/match, /v1/embeddings, "
                    "/v1/chat/completions; GET /v1/models, /healthz, /metrics, and a web page at /.",
    )
    p.add_argument("--model", default=None,
                   help="checkpoint directory or hub id (default: the shipped instruction-aware demo model)")
    p.add_argument("--retrieval-model", default=None,
                   help="a retrieval checkpoint (Blip2ForImageTextRetrieval) for /v1/match and /v1/embeddings "
                        "(default with the demo model: the demo's retrieval model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int_option(0, 65535), default=8000)
    p.add_argument("--device", default=None, type=device_option, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto (default): bfloat16 where the CPU (AVX512-BF16, AMX) or GPU computes it natively, "
                        "else float32; checkpoint: the dtype config.json records")
    p.add_argument("--api-key", default=os.environ.get("BLIP2_API_KEY"),
                   help="require this key as 'Authorization: Bearer KEY' (default: $BLIP2_API_KEY, else none)")
    g = p.add_argument_group("batching")
    g.add_argument("--batching", choices=("continuous", "micro"), default=d.batching,
                   help="continuous (default): requests join and leave the running decode batch at every step; "
                        "micro: requests arriving within --max-wait-ms run together to the end")
    g.add_argument("--max-batch", type=int_option(1), default=d.max_batch,
                   help="most requests in one forward pass (continuous: rows of the KV cache)")
    g.add_argument("--kv-cache-mb", type=float_option(above=0.0), default=None,
                   help="continuous: the most memory the KV cache may take (fewer rows than --max-batch when "
                        "small); requests wait for a free row")
    g.add_argument("--max-wait-ms", type=float_option(0.0), default=d.max_wait_ms,
                   help="micro: how long the first request of a batch waits for company")
    g.add_argument("--max-queue", type=int_option(1), default=d.max_queue, help="queued requests before answering 503")
    g.add_argument("--timeout", type=float_option(above=0.0), default=d.request_timeout_s,
                   help="seconds before a request gets 504")
    g.add_argument("--cache-size", type=int_option(0), default=d.cache_size, help="images whose features are kept (LRU)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-mb", type=float_option(above=0.0), default=d.max_body_bytes / 2**20)
    g.add_argument("--max-pixels", type=int_option(1), default=d.max_image_pixels)
    g.add_argument("--max-prompt-tokens", type=int_option(1), default=d.max_prompt_tokens)
    g.add_argument("--max-new-tokens", type=int_option(1), default=d.max_new_tokens,
                   help="the most a request may ask for")
    g.add_argument("--header-timeout", type=float_option(above=0.0), default=d.header_timeout_s,
                   help="seconds a connection has to send its request headers (idle connections are closed then)")
    g.add_argument("--body-timeout", type=float_option(above=0.0), default=d.body_timeout_s,
                   help="seconds a request has to send its body (408 after)")
    g.add_argument("--limit-concurrency", type=int_option(1), default=d.limit_concurrency,
                   help="most open connections and requests; more get 503 (default: no limit)")
    g.add_argument("--graceful-timeout", type=float_option(0.0), default=30.0,
                   help="seconds in-flight requests get to finish on shutdown")
    p.add_argument("--workers", type=int_option(1), default=1,
                   help="server processes on the one port, each with its own model and batcher (default 1)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run)
    return p


def settings_from_args(args) -> Settings:
    settings = Settings(
        batching=args.batching, kv_cache_mb=args.kv_cache_mb, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        request_timeout_s=args.timeout, cache_size=args.cache_size, max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_pixels, max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens, api_key=args.api_key or None, header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, limit_concurrency=args.limit_concurrency,
    )
    settings.default_max_new_tokens = min(settings.default_max_new_tokens, settings.max_new_tokens)
    settings.validate()
    return settings


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_models() -> tuple[str, str | None]:
    """The shipped demo model's directories: the instruction-aware model (answers, chat and captions;
    the BLIP-2 model where it is not installed), and retrieval when it is there."""
    try:
        from ..demo import ANSWER_DIR as MODEL_DIR, RETRIEVAL_DIR
    except ImportError:
        MODEL_DIR = RETRIEVAL_DIR = None
    if MODEL_DIR is None or not (MODEL_DIR / "config.json").is_file():
        raise SystemExit("no --model given and the demo model is not installed; pass --model DIR")
    retrieval = RETRIEVAL_DIR if RETRIEVAL_DIR is not None and (RETRIEVAL_DIR / "config.json").is_file() else None
    return str(MODEL_DIR), str(retrieval) if retrieval else None


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        print("blip2 serve needs the server extras: pip install 'blip2[serve]'", file=sys.stderr)
        return 2
    from .sockets import uvicorn_options

    settings = settings_from_args(args)
    if not is_loopback(args.host) and not settings.api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it "
              "(set --api-key or BLIP2_API_KEY)", file=sys.stderr)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, retrieval, name = args.model, args.retrieval_model, None
    if model is None:
        model, demo_retrieval = default_models()
        retrieval, name = retrieval or demo_retrieval, "blip2-demo"
    dtype = {"auto": "fast", "checkpoint": "auto"}.get(args.dtype, args.dtype)  # from_pretrained's names
    spec = {"model": model, "retrieval": retrieval, "name": name, "device": args.device, "dtype": dtype}
    options = dict(host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                   timeout_graceful_shutdown=args.graceful_timeout, **uvicorn_options(settings))
    if args.workers > 1:
        return _run_workers(args.workers, spec, settings, options)
    threads = torch_threads(1)
    if threads:
        import torch

        torch.set_num_threads(threads)
    config = uvicorn.Config(build_app(settings=settings, **spec), **options)
    _exit_cleanly_on_sigterm()
    uvicorn.Server(config).run()
    return 0


def torch_threads(workers: int) -> int | None:
    """Torch threads for each of `workers` server processes: its share of the cores less one, which
    the event loop reading requests needs. An intra-op thread that the loop preempts stalls every op
    of the model thread (bench_server_load, 2 cores, 16 clients: 1 thread instead of 2 gave the
    micro-batcher 1.5-1.9x and the continuous scheduler 1.3-1.4x the tokens/s). None:
    OMP_NUM_THREADS is set, and torch follows it."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers - 1)


def build_app(model: str, retrieval: str | None, name: str | None, device: str | None, dtype: str | None,
              settings: Settings):
    from .app import create_app
    from .engine import Engine

    engine = Engine.load(model, retrieval, settings, device=device, dtype=dtype, name=name)
    return create_app(engine, settings)


# ---------------------------------------------------------------- --workers N
WORKER_ENV = "BLIP2_SERVE_WORKER"  # the parent's options, for each worker process


def _run_workers(workers: int, spec: dict, settings: Settings, options: dict) -> int:
    """N worker processes on one socket (uvicorn's supervisor: it restarts a worker that dies and
    passes SIGTERM on, so each drains). Each loads its own model and batches its own requests;
    torch threads are split between them (`torch_threads`)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    threads = torch_threads(workers)
    os.environ[WORKER_ENV] = json.dumps({**spec, "threads": threads, "settings": dataclasses.asdict(settings)})
    # Workers are spawned, so the protocol goes by name; `worker_app` gives it the header deadline.
    options["http"] = "blip2.server.sockets:DeadlineH11Protocol"
    config = uvicorn.Config("blip2.server.cli:worker_app", factory=True, workers=workers, **options)
    metrics_dir = None
    if not os.environ.get(MULTIPROC_ENV) and importlib.util.find_spec("prometheus_client") is not None:
        # /metrics sums every worker's histograms and counters from files here (see telemetry.py)
        metrics_dir = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="blip2-metrics-")
    try:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            del os.environ[MULTIPROC_ENV]
    print("blip2 serve: workers stopped after finishing in-flight requests", file=sys.stderr)
    return 0


def worker_app():
    """The app of one `--workers` process (uvicorn calls this factory in each): its own model."""
    from . import sockets

    spec = json.loads(os.environ[WORKER_ENV])
    settings = Settings(**spec.pop("settings"))
    threads = spec.pop("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    sockets.DeadlineH11Protocol.header_timeout_s = settings.header_timeout_s
    logging.getLogger("blip2.server").info("worker %d: loading %s", os.getpid(), spec["model"])
    return build_app(settings=settings, **spec)


def _exit_cleanly_on_sigterm() -> None:
    """uvicorn drains on SIGTERM and then re-raises the signal to the handler it found installed;
    with this one, a drained shutdown ends as exit status 0 instead of death by signal."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stopped(signum, frame):
        print("blip2 serve: stopped after finishing in-flight requests", file=sys.stderr)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stopped)
