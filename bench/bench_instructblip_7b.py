"""InstructBLIP-Vicuna-7B-shaped checkpoint: load time, peak RSS and batch-1 decode rate, ours
(bf16, bf16 + int8 language model) against the reference (bf16), each in a fresh process.

    python bench/bench_instructblip_7b.py --make            # the random fp16 checkpoint (~16 GB on disk;
                                                            #   run under an interpreter with transformers)
    python bench/bench_instructblip_7b.py                   # ours bf16, ours bf16 + int8, reference bf16
    for c in ours:bf16 ours:bf16:int8 ref:bf16; do          # the same, one process per command (e.g. each
      python bench/bench_instructblip_7b.py --configs $c --rows rows.jsonl; done   # under a lock of its own)
    python bench/bench_instructblip_7b.py --tiny --make && python bench/bench_instructblip_7b.py --tiny
                                                            # the same pipeline on a tiny model (smoke test)

Shapes are those of Salesforce/instructblip-vicuna-7b (ViT-g/14, the base Q-Former, a 32-layer
4096-wide Llama with 32001 tokens + the image token), weights drawn normal(0, 0.02), norms at 1 / 0,
written shard by shard (--make needs ~2 GB of memory). Measured peaks (2026-12-05): ours 16.3 GB in
bf16, 10.0 GB with int8 (quantized while loading; 17.6 GB when it was quantized after a bf16 load),
the reference 17.7-18.2 GB; run one
configuration at a time on a quiet machine. One image, a short instruction, greedy, --tokens new
tokens (min = max);
the decode rate is (tokens - 1) over the time from the first new token to the last. The newer
layout (image tokens in the prompt) is used when the reference is transformers 5.x.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_decode import Stamps, lm_weight_bytes  # noqa: E402

FULL_DIR = common.CACHE / "instructblip-vicuna-7b-random-fp16"
TINY_DIR = common.CACHE / "instructblip-tiny-random"
IMAGE_TOKEN = 32001
VICUNA_7B = dict(model_type="llama", vocab_size=32002, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                 architectures=["LlamaForCausalLM"])
TINY = dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
            qformer=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
            text={**VICUNA_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4})
PROMPT = [1, 1724, 338, 297, 278, 1967, 29973]  # BOS + a short instruction's ids
QFORMER_PROMPT = [101, 2054, 2003, 1999, 1996, 3861, 1029, 102]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make(tiny: bool, out: Path, shard_bytes: int = 2 * 1024**3) -> None:
    """Writes the reference's InstructBLIP checkpoint in fp16, shard by shard: the model is built on
    the meta device only for its names, shapes and module kinds, and each tensor is drawn just
    before its shard is written, so no more than one shard (~2 GB) is ever in memory."""
    import shutil

    import transformers
    from safetensors.torch import save_file

    if (out / "config.json").is_file():
        print(f"{out} exists")
        return
    t0 = time.perf_counter()
    parts = TINY if tiny else dict(vision={}, qformer={}, text=VICUNA_7B)
    config = transformers.InstructBlipConfig(vision_config=parts["vision"], qformer_config=parts["qformer"],
                                             text_config=parts["text"], num_query_tokens=32,
                                             image_token_index=IMAGE_TOKEN)
    config.torch_dtype = torch.float16
    with torch.device("meta"):
        model = transformers.InstructBlipForConditionalGeneration(config)
    specs = []  # (key, shape, kind): kind "one" for norm scales, "zero" for norm shifts, else "normal"
    for prefix, module in model.named_modules():
        norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        for name, p in module.named_parameters(recurse=False):  # the state dict is exactly the parameters
            kind = ("one" if name == "weight" else "zero") if norm else "normal"
            specs.append((f"{prefix}.{name}" if prefix else name, tuple(p.shape), kind))
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = 2 * torch.Size(spec[1]).numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    shards.append(current)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape, kind in shard:
            t = torch.empty(shape, dtype=torch.float16)
            if kind == "normal":
                t.normal_(0.0, 0.02, generator=gen)
            else:
                t.fill_(1.0 if kind == "one" else 0.0)
            tensors[key] = t
            weight_map[key] = file
            total += t.numel() * 2
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        print(f"{file}: {len(tensors)} tensors, {time.perf_counter() - t0:.0f} s", flush=True)
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(str(tmp))
    tmp.rename(out)
    print(f"saved {out}: {total / 1e9:.2f} GB of fp16 weights in {len(shards)} shards, "
          f"{time.perf_counter() - t0:.0f} s")


def worker(args) -> dict:
    impl, dname, *opts = args.config.split(":")
    dtype = DTYPES[dname]
    folder = TINY_DIR if args.tiny else FULL_DIR
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 224, 224).to(dtype)
    newer = impl == "ours" or common.ref_major() >= 5  # the newer layout (5.x wants it); same length for both
    ids = torch.tensor([([IMAGE_TOKEN] * 32 if newer else []) + PROMPT])
    qformer_ids = torch.tensor([QFORMER_PROMPT])
    t0 = time.perf_counter()
    if impl == "ours":
        import blip2

        model = blip2.load_model(folder, torch_dtype=dtype, quantize="int8" if "int8" in opts else None).eval()
    else:
        transformers, _ = common.reference()
        key = "dtype" if common.ref_major() >= 5 else "torch_dtype"
        model = transformers.InstructBlipForConditionalGeneration.from_pretrained(str(folder), **{key: dtype}).eval()
    load_s = time.perf_counter() - t0
    inputs = dict(pixel_values=pixels, qformer_input_ids=qformer_ids, input_ids=ids)
    with torch.inference_mode():
        first = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1)
        first_token_s = load_s + time.perf_counter() - first
        stamps = Stamps()
        out = model.generate(**inputs, streamer=stamps, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    rate = (len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0])
    return {"config": args.config, "reference": common.reference()[1], "load_s": load_s,
            "first_token_s": first_token_s, "tokens_per_s": rate, "tokens": out[0, -args.tokens:].tolist(),
            "lm_weight_gb": lm_weight_bytes(model.language_model) / 1e9,
            "peak_rss_gb": common.peak_rss_bytes() / 1e9, "load": common.load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make", action="store_true", help="write the random checkpoint and stop")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same family (smoke test)")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--config", default="ours:bf16")
    parser.add_argument("--configs", nargs="+", default=["ours:bf16", "ours:bf16:int8", "ref:bf16"])
    parser.add_argument("--ref", default="newest", help="environment of the reference (in $BLIP2_BENCH_PYTHONS)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rows", type=Path, help="append each result to this JSON-lines file; the table covers all "
                        "its configurations (run them in separate invocations)")
    parser.add_argument("--report", action="store_true", help="print the table of --rows and stop")
    args = parser.parse_args()
    folder = TINY_DIR if args.tiny else FULL_DIR
    if args.make:
        make(args.tiny, folder)
        return
    if args.report:
        report(read_rows(args.rows))
        return
    if not (folder / "config.json").is_file():
        sys.exit(f"{folder} is missing: run python bench/bench_instructblip_7b.py --make{' --tiny' if args.tiny else ''}")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    envs = common.pythons()
    for config in args.configs:
        python = sys.executable if config.startswith("ours") else envs.get(args.ref, sys.executable)
        extra = ["--tiny"] if args.tiny else []
        row = common.run_worker(python, Path(__file__), ["--config", config, "--tokens", str(args.tokens), *extra],
                                timeout=3600)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
        if args.rows:  # one locked run per configuration: the table is printed from the collected rows
            with open(args.rows, "a") as f:
                f.write(json.dumps(row) + "\n")
    report(read_rows(args.rows) if args.rows else [])


def read_rows(path: Path) -> list[dict]:
    """The latest row of each configuration in a --rows file."""
    rows = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        rows[row["config"]] = row
    return list(rows.values())


def report(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["config"].startswith("ref")), None)
    print("| config | transformers | load s | first token s | peak RSS GB | LM weights GB | tokens/s | vs reference "
          "| load avg | same tokens as ours:bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ours = next((r for r in rows if r["config"] == "ours:bf16"), None)
    for r in rows:
        vs = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        same = "-" if ours is None else ("yes" if r["tokens"] == ours["tokens"] else
                                         f"{sum(a == b for a, b in zip(r['tokens'], ours['tokens']))}/{len(r['tokens'])}")
        print(f"| {r['config']} | {r['reference'] if r['config'].startswith('ref') else '-'} | {r['load_s']:.1f} | {r['first_token_s']:.1f} | "
              f"{r['peak_rss_gb']:.2f} | {r['lm_weight_gb']:.2f} | {r['tokens_per_s']:.3f} | {vs} | {r['load']:.2f} | "
              f"{same} |")


if __name__ == "__main__":
    main()
