"""Issue 9 on one GPU: batch-1 greedy decoding tokens/s of the full-size blip2-opt-2.7b (random
float16 weights), ours (eager; static cache; static cache + CUDA graph) against transformers.

    PYTHONPATH=. python3 bench/bench_gpu.py           # the GPU machine: about 1-2 min, +<=4 min compiling
    PYTHONPATH=. python3 bench/bench_gpu.py --tiny    # a tiny model on any device: checks the script

No checkpoint file: the reference is built on the device in float16 and drawn at random
(normal(0, 0.02), layer norms 1 / 0, fixed seed), and ours gets the very same tensors through
our key table, so both run identical weights. One image, a short question, `--tokens` new tokens
with min_new_tokens = max_new_tokens (every run does the same work).

Decode rate = (tokens - 1) / (time of a `tokens` run - time of a 1-token run), each the fastest of
`--repeats` runs with the GPU synchronised: the image encoder and the prompt cancel out. Where a
streamer works, the rate from first to last token of one run is given too. The reference's static
cache compiles (torch.compile) on first use, which takes minutes: it runs last, in a child process
with a time limit (--budget), timed by streamer only. Results print as they come; the table and
JSON (to --json, or $OUT/bench_gpu.json when $OUT is set) at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402
from make_full_checkpoint import IMAGE_TOKEN, OPT_2_7B  # noqa: E402

PROMPT = [45641, 35, 99, 16, 11, 5, 2170, 116, 31652, 35]  # "Question: what is in the picture? Answer:"
TINY = dict(
    vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=224, patch_size=14, qkv_bias=True),
    qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        encoder_hidden_size=64),
    text_config={**OPT_2_7B, "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 128, "num_attention_heads": 4,
                 "word_embed_proj_dim": 64},
)
T0 = time.perf_counter()


def say(*args) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s]", *args, flush=True)


def versions() -> dict:
    import transformers

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------- the two models, same weights
def build_reference(tiny: bool, device, dtype, seed: int = 0):
    """transformers' Blip2ForConditionalGeneration built on `device` in `dtype`, drawn at random."""
    import transformers

    if tiny:
        config = transformers.Blip2Config(**TINY, num_query_tokens=32, image_token_index=IMAGE_TOKEN)
    else:  # the documented defaults are blip2-opt-2.7b's ViT-g/14 and Q-Former
        config = transformers.Blip2Config(text_config=OPT_2_7B, num_query_tokens=32, image_token_index=IMAGE_TOKEN)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.Blip2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.LayerNorm):
                    p.fill_(1.0 if name == "weight" else 0.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def ours_from_reference(ref):
    """Our Blip2ForConditionalGeneration over the reference's own tensors (renamed, q/k/v fused)."""
    from blip2 import Blip2ForConditionalGeneration
    from blip2 import checkpoint as ckpt
    from blip2.config import Blip2Config

    config = Blip2Config.from_dict(ref.config.to_dict())
    model = ckpt.build_on_meta(lambda: Blip2ForConditionalGeneration(config))
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    state = ckpt.hf_to_ours(ref.state_dict(), model.key_table(), expected, "the reference")
    ckpt._fill_tied(model, state, "the reference")
    model.load_state_dict(state, strict=True, assign=True)
    model.language_model.tie_weights()
    return model.eval()


def lm_weight_bytes(lm: torch.nn.Module) -> int:
    """Bytes one decoding step reads: the language model's weights but the embedding lookups
    (a tied output head counts once, as the matrix it multiplies by)."""
    seen = {}
    for module in lm.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            seen[id(t)] = t.numel() * t.element_size()  # a tied tensor is one object
    return sum(seen.values())


def copy_bandwidth_gbs(device, nbytes: int) -> float:
    """Device-to-device copy: (bytes read + bytes written) / time, the best of 10."""
    src = torch.ones(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(12):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


# ---------------------------------------------------------------- timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Stamps:
    """A streamer noting when each new token reaches the host (the first put is the prompt)."""

    def __init__(self, device) -> None:
        self.device, self.times, self.first = device, [], True

    def put(self, value) -> None:
        if self.first:
            self.first = False
            return
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def measure(run, n: int, repeats: int, device, diff: bool = True, stream: bool = True) -> dict:
    """run(n, streamer) -> ids; returns rates and the new tokens of the last run."""

    def timed(k):
        sync(device)
        t = time.perf_counter()
        out = run(k, None)
        sync(device)
        return time.perf_counter() - t, out

    t_warm = timed(n)[0]  # warm-up: allocator, cuBLAS, graph capture, compilation
    result = {"warmup_s": t_warm}
    full = [timed(n) for _ in range(repeats)]
    result["total_s"] = min(t for t, _ in full)
    result["tokens"] = full[-1][1][0, -n:].tolist()
    if diff:
        timed(1)
        first = min(timed(1)[0] for _ in range(repeats))
        result["first_token_s"] = first
        result["diff_rate"] = (n - 1) / (result["total_s"] - first)
    if stream:
        rates = []
        for _ in range(repeats):
            stamps = Stamps(device)
            run(n, stamps)
            rates.append((len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0]))
        result["stream_rate"] = max(rates)
    result["tokens_per_s"] = result.get("diff_rate") or result["stream_rate"]
    return result


def runners(ref, ours, pixels, ref_ids, ids) -> dict:
    """name -> run(n, streamer) for each configuration, and which timings it allows."""
    from blip2.modeling.graphed import graphed_generate

    def fixed(n):
        return dict(max_new_tokens=n, min_new_tokens=n)

    def ref_run(**extra):
        return lambda n, s: ref.generate(pixel_values=pixels, input_ids=ref_ids, streamer=s, **fixed(n), **extra)

    def graphed(**extra):
        def run(n, s):
            assert s is None
            return graphed_generate(ours, pixels, ids, **fixed(n), **extra)
        return run

    # the static cache as it runs without torch.compile (4.37 has none: that row fails, harmlessly)
    table = {"ref": (ref_run(), {}),
             "ref static eager": (ref_run(cache_implementation="static", disable_compile=True), {})}
    if ours is not None:
        table["ours eager"] = (lambda n, s: ours.generate(pixels, ids, streamer=s, **fixed(n)), {})
        table["ours static"] = (graphed(cuda_graph=False), {"stream": False})
        if torch.cuda.is_available():
            table["ours graphed"] = (graphed(), {"stream": False})
    return table


def inputs(device, dtype):
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 224, 224, device=device).to(dtype)
    ids = torch.tensor([common.prompt_ids(PROMPT, image_tokens=True)], device=device)
    ref_ids = torch.tensor([common.prompt_ids(PROMPT, image_tokens=common.ref_major() >= 5)], device=device)
    return pixels, ids, ref_ids


# ---------------------------------------------------------------- correctness where tokens vary
def graph_check(device) -> dict:
    """graphed_generate against generate on a tiny model drawn wide (std 0.3), whose tokens vary from
    step to step (random full-size weights tend to repeat one token): batch 2 with left padding,
    eos ending rows at different steps, min_new_tokens; float32 and float16; each graphed call twice
    (capture, then replay of the cached graph). Returns case -> whether all calls matched."""
    from blip2 import Blip2Config, Blip2ForConditionalGeneration
    from blip2.modeling.graphed import graphed_generate

    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                            encoder_hidden_size=32, cross_attention_frequency=1),
        text_config=dict(model_type="opt", vocab_size=40, hidden_size=32, num_hidden_layers=2, ffn_dim=37,
                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                         pad_token_id=1, bos_token_id=2, eos_token_id=3),
        num_query_tokens=3)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape) * 0.3
            p.copy_(1.0 + noise if name.endswith("weight") and p.dim() == 1 else noise)
    pixels = torch.randn(2, 3, 16, 16)
    ids = torch.tensor([[2, 17, 9, 30], [1, 1, 2, 25]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    results = {}
    for dtype in (torch.float32, torch.float16):
        model.to(device, dtype).eval()
        args = (pixels.to(device, dtype), ids.to(device), mask.to(device))
        early = model.generate(*args, max_new_tokens=16, eos_token_id=None)[:, 1:].tolist()
        # eos: per row, a token it first chooses after 3 steps (and no row chooses sooner): every row
        # ends after some replays, at different steps, and the finished one is padded meanwhile
        eos = []
        for row in early:
            eos += [next((t for i, t in enumerate(row[3:12], 3) if t not in row[:i]
                          and all(t not in r[:3] for r in early)), 3)]
        cases = {"no eos": dict(eos_token_id=None), "eos ends rows": dict(eos_token_id=eos, pad_token_id=0),
                 "min_new_tokens": dict(eos_token_id=eos[0], min_new_tokens=12)}
        for case, kwargs in cases.items():
            expected = model.generate(*args, max_new_tokens=24, **kwargs)
            got = [graphed_generate(model, *args, max_new_tokens=24, **kwargs) for _ in range(2)]
            ok = all(g.tolist() == expected.tolist() for g in got)
            results[f"{str(dtype).removeprefix('torch.')} {case}"] = {
                "match": ok, "shape": list(expected.shape),
                "distinct": len(set(expected[:, 1:].flatten().tolist()))}
    return results


# ---------------------------------------------------------------- the compiled reference, in a child
def compiled_worker(args) -> None:
    """Child process: the reference with its static cache as generate sets it up (auto-compiled on GPU)."""
    device, dtype = setup(args)
    ref = build_reference(args.tiny, device, dtype, args.seed)
    pixels, _, ref_ids = inputs(device, dtype)
    run = lambda n, s: ref.generate(pixel_values=pixels, input_ids=ref_ids, streamer=s,  # noqa: E731
                                    max_new_tokens=n, min_new_tokens=n, cache_implementation="static")
    with torch.no_grad():
        result = measure(run, args.tokens, args.repeats, device, diff=False)
    print(json.dumps(result))


def run_compiled(args, seconds: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--tokens", str(args.tokens), "--repeats", str(args.repeats),
           "--seed", str(args.seed)] + (["--tiny"] if args.tiny else []) + (["--cpu"] if args.cpu else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    # Its own process group, so that a timeout also ends the compiler's worker processes.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"no result within {seconds:.0f} s (compiling?); stopped") from None
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{stderr[-2500:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------- report
def differing(a: list[int] | None, b: list[int] | None) -> str:
    if not a or not b:
        return "-"
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return f"{len(diff)}/{len(a)}" + (f" (from #{diff[0]})" if diff else "")


def report(rows: dict, info: dict) -> str:
    ref = rows.get("ref", {}).get("tokens_per_s")
    eager_tokens = rows.get("ours eager", {}).get("tokens")
    lines = [f"device: {info['device']}; torch {info['torch']} (CUDA {info['cuda']}); transformers "
             f"{info['transformers']}; python {info['python']}",
             f"LM weights read per token: {info['lm_weight_gb']:.2f} GB; device copy bandwidth "
             f"(read + write): {info['copy_gbs']:.0f} GB/s; {info['tokens']} new tokens, batch 1, {info['dtype']}",
             "",
             "| config | tokens/s | ms/token | vs ref | streamed tokens/s | first token ms | implied GB/s | "
             "of copy bw | tokens differing from ours eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            last = r["error"].strip().splitlines()[-1][:120].replace("|", "/")
            lines.append(f"| {name} | failed: {last} | | | | | | | |")
            continue
        rate = r["tokens_per_s"]
        gbs = rate * info["lm_weight_gb"]
        vs = f"{rate / ref:.2f}x" if ref else "-"
        stream = f"{r['stream_rate']:.1f}" if "stream_rate" in r else "-"
        first = f"{r['first_token_s'] * 1e3:.0f}" if "first_token_s" in r else "-"
        lines.append(f"| {name} | {rate:.1f} | {1e3 / rate:.2f} | {vs} | {stream} | {first} | {gbs:.0f} | "
                     f"{gbs / info['copy_gbs']:.0%} | {differing(r.get('tokens'), eager_tokens)} |")
    lines.append(f"\ndistinct tokens in ours eager's output: {len(set(eager_tokens or []))}")
    g, s = rows.get("ours graphed", {}), rows.get("ours static", {})
    if g.get("tokens") and s.get("tokens"):
        same_kernels = differing(g["tokens"], s["tokens"])
        lines.append(f"ours graphed vs ours static (same kernels, no graph): {same_kernels} differ")
    if info.get("graph_check"):
        bad = [case for case, r in info["graph_check"].items() if not r["match"]]
        lines.append(f"tiny-model check, graphed_generate == generate: {len(info['graph_check']) - len(bad)}/"
                     f"{len(info['graph_check'])} cases match" + (f"; MISMATCH in {bad}" if bad else ""))
    return "\n".join(lines)


def setup(args):
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32  # float16 matmuls on CPU are slow or missing
    if not cuda:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return device, dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (checks the script anywhere)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=360.0,
                        help="seconds this script may take in all; the compiled reference gets what is left")
    parser.add_argument("--no-compiled", action="store_true", help="skip the reference's compiled static cache")
    parser.add_argument("--json", type=Path, help="write the results here (default $OUT/bench_gpu.json if $OUT is set)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return compiled_worker(args)

    device, dtype = setup(args)
    info = {**versions(), "dtype": str(dtype).removeprefix("torch."), "tokens": args.tokens, "tiny": args.tiny}
    say(json.dumps(info))
    out = args.json or (Path(os.environ["OUT"]) / "bench_gpu.json" if os.environ.get("OUT") else None)
    rows: dict[str, dict] = {}

    def save():
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"info": info, "rows": rows}, indent=2))

    try:
        info["graph_check"] = graph_check(device)
    except Exception as err:
        traceback.print_exc()
        info["graph_check_error"] = f"{type(err).__name__}: {err}"
    say("tiny-model check (graphed_generate vs generate):", json.dumps(info.get("graph_check")))
    ref = build_reference(args.tiny, device, dtype, args.seed)
    say(f"reference built: {sum(p.numel() for p in ref.parameters()) / 1e9:.3f} B parameters")
    try:
        ours = ours_from_reference(ref)
        info["lm_weight_gb"] = lm_weight_bytes(ours.language_model) / 1e9
    except Exception:
        traceback.print_exc()
        ours, info["lm_weight_gb"] = None, lm_weight_bytes(ref.language_model) / 1e9
    info["copy_gbs"] = copy_bandwidth_gbs(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    say(f"LM weights {info['lm_weight_gb']:.2f} GB, copy bandwidth {info['copy_gbs']:.0f} GB/s")
    pixels, ids, ref_ids = inputs(device, dtype)

    for name, (run, opts) in runners(ref, ours, pixels, ref_ids, ids).items():
        try:
            with torch.no_grad():
                rows[name] = measure(run, args.tokens, args.repeats, device, **opts)
        except Exception as err:
            traceback.print_exc()
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
        say(name, json.dumps({k: v for k, v in rows[name].items() if k != "tokens"}))
        save()
    if device.type == "cuda":
        info["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(report(rows, info), flush=True)

    left = args.budget - (time.perf_counter() - T0)
    if not args.no_compiled and left > 60:
        run = ref = ours = None  # free the GPU for the child (a cached graph holds a reference cycle)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        say(f"reference static cache, compiled, in a child process (limit {left:.0f} s) ...")
        try:
            rows["ref static compiled"] = run_compiled(args, left)
        except Exception as err:
            rows["ref static compiled"] = {"error": f"{type(err).__name__}: {str(err)[-1500:]}"}
        compiled = rows["ref static compiled"]
        say("ref static compiled", json.dumps({k: v for k, v in compiled.items() if k != "tokens"}))
        save()
        print(report(rows, info), flush=True)
    save()
    say(f"done{f'; JSON in {out}' if out else ''}")


if __name__ == "__main__":
    main()
