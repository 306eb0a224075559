"""Workload d: decoding tokens per second at batch 1 on the full-size blip2-opt-2.7b model
(random float16 checkpoint from bench/make_full_checkpoint.py), ours against transformers.

    python bench/bench_decode.py                 # ours bf16 / + int8 / + int4 LM, reference bf16 and fp32
    python bench/bench_decode.py --configs ours:bf16 ref:bf16 --tokens 24
    python bench/bench_decode.py --configs ours:bf16:int4 ref:bf16:int4   # the reference's int4: torchao's CPU int4
    python bench/bench_decode.py --checkpoint "$BLIP2_BENCH_CACHE/blip2-small-random"   # a smaller shape

One image and a short question, greedy, `--tokens` new tokens (min = max, so every run does
the same work). A streamer stamps each token; the decode rate is (tokens - 1) over the time
from the first token to the last, so the image encoder and the prompt are left out; the figure
is the median of --repeats runs. Ours is plain `from_pretrained` (with `quantize=` for int8 / int4). Each
configuration runs in a fresh process (the full model in float32 is 15 GB). The rate is also
given as the fraction of the measured memory bandwidth (bench/peak.py) it implies: decoding
one token reads every language-model weight once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = [45641, 35, 99, 16, 11, 5, 2170, 116, 31652, 35]  # "Question: what is in the picture? Answer:"
DEFAULT_CONFIGS = ["ours:bf16", "ours:bf16:int8", "ours:bf16:int4", "ref:bf16", "ref:fp32", "ours:fp32"]


class Stamps:
    """A streamer (the reference's protocol) that notes when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.first = True

    def put(self, value) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        self.times.append(common.CLOCK())

    def end(self) -> None:
        pass


def lm_weight_bytes(lm: torch.nn.Module) -> int:
    """Bytes one decoding step reads: every weight of the language model except the embedding
    tables (a lookup reads one row), with an output head tied to the embeddings counted once."""
    seen = {}
    for module in lm.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        packed = getattr(module, "packed", None)  # a prepacked weight is not a parameter
        for t in tensors + ([packed] if isinstance(packed, torch.Tensor) else []):
            if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
                from bench_memory import tensor_bytes  # a torchao tensor: by its parts

                tensor_bytes(t, seen)
                continue
            key = id(t) if t.is_mkldnn else t.data_ptr()
            seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


def single_thread_bandwidth() -> float:
    """GB/s one thread streams through a prepacked bfloat16 matrix-vector product, or a sum."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peak

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bw = peak.bandwidth_gbs(0.5, nbytes=256 << 20)
    finally:
        torch.set_num_threads(threads)
    return max(bw.values())


def worker(args) -> dict:
    impl, dname, *opts = args.config.split(":")
    dtype = DTYPES[dname]
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 224, 224).to(dtype)
    image_tokens = impl == "ours" or common.ref_major() >= 5
    ids = torch.tensor([common.prompt_ids(PROMPT, image_tokens=image_tokens)])
    t0 = time.perf_counter()
    checkpoint = Path(args.checkpoint)
    if impl == "ours":
        quantize = next((o for o in opts if o in ("int8", "int4")), None)
        model = common.load_ours(checkpoint, dtype, quantize=quantize)
        model.auto_pack = "plain" not in opts
    else:
        quantize = next((o for o in opts if o in ("int8", "int4")), None)
        if quantize:  # torchao through TorchAoConfig (transformers 4.43+), the language model only, as ours
            from bench_memory import torchao_config

            model = common.load_reference(checkpoint, dtype, quantization_config=torchao_config(quantize))
        else:
            model = common.load_reference(checkpoint, dtype)
    load_s = time.perf_counter() - t0
    model_gb = common.model_bytes(model) / 1e9  # before the first use packs it (asking a packed model unpacks it)
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    with torch.inference_mode():
        model.generate(pixel_values=pixels, input_ids=ids, max_new_tokens=3, min_new_tokens=3)  # warm-up
        rates, tokens = [], None
        for _ in range(args.repeats):
            stamps = Stamps()
            out = model.generate(pixel_values=pixels, input_ids=ids, streamer=stamps, **gen)
            tokens = out[0, -args.tokens:].tolist()
            rates.append((len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0]))
    weights = lm_weight_bytes(model.language_model)
    return {"config": args.config, "reference": common.reference()[1], "load_s": load_s,
            "tokens_per_s": statistics.median(rates), "rates": rates, "tokens": tokens, "lm_weight_gb": weights / 1e9,
            "peak_rss_gb": common.peak_rss_bytes() / 1e9, "model_gb": model_gb, "kv_gb": kv_bytes(model, ids, args) / 1e9,
            "load": common.load_average()}


def kv_bytes(model, ids: torch.Tensor, args) -> int:
    """Keys and values of every layer for the prompt (image queries included) and the new tokens."""
    cfg = model.config.text_config
    dtype = next(iter(model.language_model.state_dict().values())).dtype
    positions = ids.shape[1] + args.tokens + (model.config.num_query_tokens if ids.shape[1] < 32 else 0)
    return 2 * cfg.num_hidden_layers * cfg.hidden_size * positions * torch.finfo(dtype).bits // 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--config", default="ours:bf16", help="impl:dtype[:int8|:int4][:plain]")
    parser.add_argument("--checkpoint", default=str(common.FULL_DIR), help="checkpoint folder (default: the full-size one)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--ref", default="newest", help="environment of the reference (in $BLIP2_BENCH_PYTHONS)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: one thread, this process's CPU time (for a machine others are using)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (Path(args.checkpoint) / "config.json").is_file():
        sys.exit(f"{args.checkpoint} is missing: run python bench/make_full_checkpoint.py")
    if args.worker:
        common.set_clock(args.clock)
        print(json.dumps(worker(args)))
        return
    peaks = common.peaks()
    bandwidth = peaks["bandwidth_gbs"]
    if args.clock == "cpu":  # one thread: compare with what one thread streams (measured)
        bandwidth = single_thread_bandwidth()
    envs = common.pythons()
    rows = []
    for config in args.configs:
        python = sys.executable if config.startswith("ours") else envs.get(args.ref)
        if python is None:
            continue
        print(f"{config} (load {common.load_average():.2f}) ...", flush=True)
        rows.append(common.run_worker(python, Path(__file__), ["--config", config, "--tokens", str(args.tokens),
                                                               "--repeats", str(args.repeats), "--clock", args.clock,
                                                               "--checkpoint", args.checkpoint]))
        print("  ", json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    by = {r["config"]: r for r in rows}
    print()
    print(f"clock: {args.clock}; memory bandwidth measured: {bandwidth:.1f} GB/s"
          f"{' (one thread)' if args.clock == 'cpu' else ''}")
    print(f"checkpoint: {common.shown_path(args.checkpoint)}")
    print("| config | tokens/s | LM weights GB | implied GB/s | of bandwidth | vs ref bf16 | vs ref fp32 | vs ref, same setting | tokens differing from ours bf16 | peak RSS / (weights + KV cache) | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gbs = r["tokens_per_s"] * r["lm_weight_gb"]
        same = r["config"].replace("ours", "ref", 1) if r["config"].startswith("ours") else None
        vs = [f"{r['tokens_per_s'] / by[c]['tokens_per_s']:.2f}x" if c in by else "-" for c in ("ref:bf16", "ref:fp32", same)]
        base = by.get("ours:bf16", {}).get("tokens")
        differ = f"{sum(a != b for a, b in zip(r['tokens'], base))} / {len(base)}" if base and r["config"].startswith("ours") else ""
        name = r["config"] if r["config"].startswith("ours") else r["config"].replace("ref", f"transformers {r['reference']}")
        print(f"| {name} | {r['tokens_per_s']:.2f} | {r['lm_weight_gb']:.2f} | {gbs:.1f} | {gbs / bandwidth:.0%} | "
              f"{vs[0]} | {vs[1]} | {vs[2]} | {differ} | {rss_ratio(r)} | {r['load']:.2f} |")


def rss_ratio(r: dict) -> str:
    if "model_gb" not in r:
        return "-"
    return f"{r['peak_rss_gb']:.2f} GB / ({r['model_gb']:.2f} + {r['kv_gb']:.3f}) = {r['peak_rss_gb'] / (r['model_gb'] + r['kv_gb']):.3f}x"


if __name__ == "__main__":
    main()
