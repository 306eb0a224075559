"""Server load: continuous batching against the micro-batcher, side by side in one run.

For each batcher (`blip2 serve --batching micro`, then `--batching continuous`, same model, same
requests) N clients each send a request, wait for its answer, pause for an exponential time
(Poisson arrivals per client) and send the next, at N = 1, 4, 16 and 64. Every request asks for
its own max_tokens drawn from 4..40 (captions and questions alternate). Each N runs twice:
whole answers (throughput and latency) and streamed answers (server-sent events; time to first
token is the first text piece). Printed per run: tokens/s, the mean requests in flight (sum of
latencies / wall time), p50/p99 latency and p50/p99 time to first token, and where the CPU went
(per request: the server's model thread, its event loop, its other threads, and the clients);
then the ratios.

By default the model is a random-weight copy of the shipped demo model (its shape and tokenizer):
random weights almost never emit the end token, so every request runs to its own max_tokens and
the lengths really are mixed. `--lm opt-125m` swaps its language model for one of OPT-125m's
body (12 layers of 768, feed-forward 3072; the demo's 464-token vocabulary, so its tokenizer and
processor files still fit): there a decode step's cost grows with its rows, as on real models,
where the tiny demo model's steps cost about the same for 1 or 16 rows. `--lm opt-350m` is
OPT-350m's body (24 post-norm layers of 1024; embeddings 1024 wide, as BLIP-2 needs); `--lm
flan-t5-small` an encoder-decoder of Flan-T5-small's body (8 + 8 gated-GELU layers of 512), so the
T5 path of both batchers is measured too. `--model DIR` serves a
real checkpoint instead (the trained demo model mostly stops after 2-15 tokens whatever max_tokens says).

    python bench/bench_server_load.py [--clients 1 4 16 64] [--requests-per-client 4] [--json-out FILE]
    python bench/bench_server_load.py --lm opt-125m --clients 16 --answers whole
    python bench/bench_server_load.py --lm flan-t5-small --clients 16 --answers whole
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from load_server import example_images, free_port, stop_server, wait_until_up

QUESTIONS = ["what colour is the circle?", "how many shapes are there?", "is there a square?",
             "what shape is on the left?", "what colour is the background?"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint to serve (default: a random-weight copy of the demo model)")
    p.add_argument("--lm", choices=sorted(LM_SHAPES), default="demo",
                   help="the random copy's language model: the demo's, or OPT-125m's, OPT-350m's or Flan-T5-small's body (see above)")
    p.add_argument("--answers", choices=("whole", "streamed", "both"), default="both")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=4, help="requests per client (at least 16 per run)")
    p.add_argument("--think-ms", type=float, default=20.0, help="mean pause between a client's requests")
    p.add_argument("--min-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--max-batch", type=int, default=16, help="both batchers: most requests in one forward")
    p.add_argument("--modes", nargs="+", default=["micro", "continuous"])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="write every figure as JSON here too")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the model
# text_config for --lm: the demo's changed to OPT-125m's or OPT-350m's layer sizes (facebook/opt-*'s
# config.json), or a text config of another family (model_type) with Flan-T5-small's sizes
# (google/flan-t5-small's config.json); every one keeps the demo's vocabulary and token ids.
LM_SHAPES = {
    "demo": {},
    "opt-125m": dict(hidden_size=768, word_embed_proj_dim=768, num_hidden_layers=12, ffn_dim=3072,
                     num_attention_heads=12, max_position_embeddings=2048),
    # OPT-350m's own embeddings are 512 wide and projected; BLIP-2 needs them as wide as the layers
    "opt-350m": dict(hidden_size=1024, word_embed_proj_dim=1024, num_hidden_layers=24, ffn_dim=4096,
                     num_attention_heads=16, max_position_embeddings=2048, do_layer_norm_before=False),
    "flan-t5-small": dict(model_type="t5", d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                          num_heads=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def random_demo_copy(folder: Path, lm: str = "demo") -> Path:
    """The demo model's config and processor files with freshly initialised (random) weights,
    its language model reshaped as `LM_SHAPES[lm]` says."""
    import torch

    from blip2 import Blip2Config, Blip2ForConditionalGeneration
    from blip2.demo import MODEL_DIR

    torch.manual_seed(0)
    config = Blip2Config.from_pretrained(MODEL_DIR)
    shape, text = dict(LM_SHAPES[lm]), config.text_config
    if shape.get("model_type", text.model_type) != text.model_type:  # another family: its own text config
        ids = dict(vocab_size=text.vocab_size, pad_token_id=text.pad_token_id, eos_token_id=text.eos_token_id,
                   decoder_start_token_id=text.pad_token_id)  # T5 starts decoding from padding
        config = Blip2Config.from_dict({**config.to_dict(), "text_config": {**shape, **ids}})
    else:
        for name, value in shape.items():
            setattr(text, name, value)
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    for path in Path(MODEL_DIR).iterdir():
        # the demo's processor files; its generation config only where the language model is its family
        if path.name not in ("model.safetensors", "config.json") and not (folder / path.name).exists():
            shutil.copy(path, folder / path.name)
    return folder


# ---------------------------------------------------------------- the requests
def make_requests(count: int, images: list[str], rng: random.Random, args, stream: bool) -> list[tuple[str, dict]]:
    out = []
    for n in range(count):
        body = {"image": images[rng.randrange(len(images))], "stream": stream,
                "max_new_tokens": rng.randint(args.min_tokens, args.max_tokens)}
        if n % 2:
            out.append(("/v1/answer", {**body, "question": rng.choice(QUESTIONS)}))
        else:
            out.append(("/v1/caption", body))
    return out


async def one_request(http: httpx.AsyncClient, path: str, body: dict) -> dict:
    """Sends one request; returns its latency, time to first text and tokens (or its error)."""
    started = time.perf_counter()
    first = None
    if not body["stream"]:
        r = await http.post(path, json=body)
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {r.text[:200]}"}
        tokens = r.json()["usage"]["completion_tokens"]
    else:
        tokens = None
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return {"error": f"{r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": str(event["error"])[:200]}
                if first is None and event.get("delta"):
                    first = time.perf_counter() - started
                if event.get("done"):
                    tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - started
    return {"latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}


async def run_load(url: str, requests: list[tuple[str, dict]], clients: int, think_s: float, seed: int) -> dict:
    """`clients` closed-loop clients with exponential pauses, until the requests are used up."""
    todo = list(reversed(requests))
    done: list[dict] = []
    rng = random.Random(seed)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while todo:
                await asyncio.sleep(rng.expovariate(1 / think_s) if think_s > 0 else 0)
                if not todo:
                    return
                path, body = todo.pop()
                try:
                    done.append(await one_request(http, path, body))
                except httpx.HTTPError as err:
                    done.append({"error": f"{type(err).__name__}: {err}"})

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return summarize(done, time.perf_counter() - started, clients)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(done: list[dict], seconds: float, clients: int) -> dict:
    ok = [d for d in done if "error" not in d]
    errors = [d["error"] for d in done if "error" in d]
    lat, ttft = [d["latency"] for d in ok], [d["ttft"] for d in ok]
    tokens = sum(d["tokens"] for d in ok)
    return {"clients": clients, "requests": len(done), "errors": len(errors), "error_samples": errors[:3],
            "seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
            "mean_in_flight": round(sum(lat) / seconds, 2),
            "p50_latency_s": round(pct(lat, 0.5), 3), "p99_latency_s": round(pct(lat, 0.99), 3),
            "p50_ttft_s": round(pct(ttft, 0.5), 3), "p99_ttft_s": round(pct(ttft, 0.99), 3)}


# ---------------------------------------------------------------- the server
def start_server(model: str, mode: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "blip2.cli", "serve", "--model", model, "--port", str(port),
           "--batching", mode, "--max-batch", str(args.max_batch), "--max-queue", "1024", "--cache-size", "0",
           "--max-new-tokens", str(args.max_tokens), "--timeout", "600", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, url)
    return proc, url


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of process `pid` (Linux /proc; empty elsewhere)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return out


def cpu_split(pid: int, before: dict[int, float], after: dict[int, float], client_s: float, requests: int) -> dict:
    """Milliseconds of CPU per request: the server's main thread (the event loop: HTTP, JSON, answers),
    its busiest other thread (the model thread), its other threads, and this client process."""
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop = spent.pop(pid, 0.0)
    busiest = max(spent.values(), default=0.0)
    per = 1000 / max(1, requests)
    return {"server_loop_ms": round(loop * per, 2), "server_model_ms": round(busiest * per, 2),
            "server_other_ms": round((sum(spent.values()) - busiest) * per, 2), "client_ms": round(client_s * per, 2)}


def bench_mode(model: str, mode: str, images: list[str], args) -> list[dict]:
    proc, url = start_server(model, mode, args)
    runs = []
    try:
        warm = make_requests(4, images, random.Random(-1), args, stream=False)
        asyncio.run(run_load(url, warm, 2, 0.0, 0))  # first-call costs (weight packing) out of the way
        for clients in args.clients:
            count = max(16, clients * args.requests_per_client)
            for stream in {"whole": (False,), "streamed": (True,), "both": (False, True)}[args.answers]:
                # the same requests and pauses for both batchers
                requests = make_requests(count, images, random.Random(args.seed + clients), args, stream)
                threads, client = thread_cpu(proc.pid), time.process_time()
                result = asyncio.run(run_load(url, requests, clients, args.think_ms / 1000, args.seed + clients))
                cpu = cpu_split(proc.pid, threads, thread_cpu(proc.pid), time.process_time() - client, count)
                result.update(mode=mode, stream=stream, load_average=round(os.getloadavg()[0], 2), cpu=cpu)
                print_run(result)
                runs.append(result)
        batcher = httpx.get(f"{url}/metrics").json()["batcher"]
        print(f"  {mode}: mean batch size {batcher['mean_batch_size']} over {batcher['batches']} "
              f"{'steps' if mode == 'continuous' else 'batches'}", flush=True)
    finally:
        stop_server(proc)
    return runs


# ---------------------------------------------------------------- report
HEADER = (f"{'batching':10s} {'clients':>7s} {'stream':>6s} {'reqs':>5s} {'tok/s':>8s} {'in flight':>9s} "
          f"{'p50 lat':>8s} {'p99 lat':>8s} {'p50 ttft':>8s} {'p99 ttft':>8s} {'errors':>6s} {'load':>5s}")


def print_run(r: dict) -> None:
    print(f"{r['mode']:10s} {r['clients']:7d} {str(r['stream']):>6s} {r['requests']:5d} {r['tokens_per_s']:8.1f} "
          f"{r['mean_in_flight']:9.1f} {r['p50_latency_s']:8.3f} {r['p99_latency_s']:8.3f} {r['p50_ttft_s']:8.3f} "
          f"{r['p99_ttft_s']:8.3f} {r['errors']:6d} {r['load_average']:5.1f}", flush=True)
    for sample in r["error_samples"]:
        print(f"  error: {sample}")
    if r["cpu"]["server_model_ms"]:
        c = r["cpu"]
        print(f"  CPU ms per request: server model thread {c['server_model_ms']}, event loop {c['server_loop_ms']}, "
              f"other threads {c['server_other_ms']}; clients {c['client_ms']}", flush=True)


def print_ratios(runs: list[dict]) -> None:
    by = {(r["mode"], r["clients"], r["stream"]): r for r in runs}
    print("\ncontinuous / micro:")
    for (mode, clients, stream), c in by.items():
        m = by.get(("micro", clients, stream))
        if mode != "continuous" or m is None:
            continue
        print(f"  clients {clients:3d} {'streamed' if stream else 'whole   '}: tokens/s {c['tokens_per_s'] / m['tokens_per_s']:.2f}x, "
              f"p99 latency {c['p99_latency_s'] / m['p99_latency_s']:.2f}x, p99 TTFT {c['p99_ttft_s'] / m['p99_ttft_s']:.2f}x")


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="blip2-load-")
        model = str(random_demo_copy(Path(tmp.name), args.lm))
    images = [f"data:image/png;base64,{base64.b64encode(b).decode()}" for b in example_images(args.images, args.seed)]
    shape = "" if args.lm == "demo" else f", language model of {args.lm}'s body"
    print(f"model: {args.model or 'random-weight copy of the demo model' + shape}; max_tokens {args.min_tokens}..{args.max_tokens}; "
          f"think {args.think_ms:g} ms (exponential); --max-batch {args.max_batch}")
    print(HEADER, flush=True)
    runs = []
    try:
        for mode in args.modes:
            runs += bench_mode(model, mode, images, args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print_ratios(runs)
    print(f"load average at end: {os.getloadavg()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(runs, indent=2) + "\n")
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
