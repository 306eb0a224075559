"""Peak memory (RSS) to load and to generate on CPU, ours against the reference, one process per cell.

    python bench/make_full_checkpoint.py [--shape flan-t5-xl]        # the random fp16 checkpoints, once
    python bench/bench_memory.py --shape opt-2.7b --impls ours --settings bf16 int8 int4 --out R.jsonl
    python bench/bench_memory.py --shape opt-2.7b --impls ref --settings fp32 --out R.jsonl
    python bench/bench_memory.py --table R.jsonl                      # the Markdown table of all cells
    python bench/bench_memory.py --shape tiny --out R.jsonl           # a smoke run (tiny-t5: the T5 path)

Each cell (implementation, transformers release, setting) runs alone in a fresh process: it loads
the checkpoint as users do, captions one image (8 new tokens, greedy) and reports its peak RSS
(VmHWM: safetensors pages it mapped count too) after loading and after generating, the bytes of
its weights and of the language model's, and the top-1 next token at fixed positions (--images
random images, 16 teacher-forced text tokens each), which the table compares against bf16.
Cells append one JSON line each to --out, so the runs can be split (one model and a few
settings per run) and the table drawn from all of them.

Settings: fp32, bf16, int8 and int4 (weight-only language model, bf16 elsewhere). Ours quantizes
with `quantize=`. The reference has no CPU int8/int4 path in 4.37.2 (bitsandbytes needs CUDA;
`TorchAoConfig` came later): those cells say why. From 4.43 it has torchao: when torchao is
importable the reference's cells use `TorchAoConfig` with `Int8WeightOnlyConfig` and torchao's
CPU int4 (`PrototypeInt4WeightOnlyConfig`, group 128), restricted to the language model as ours.
The reference runs under every interpreter of $BLIP2_BENCH_PYTHONS (bench/common.py); transformers
4.x also once more with `low_cpu_mem_usage=True` ("ref-lowmem"; 5.x always loads that way).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import make_full_checkpoint as mfc  # noqa: E402

SETTINGS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
            "int4": (torch.bfloat16, "int4")}
FOLDERS = {"opt-2.7b": mfc.FULL_DIR, "flan-t5-xl": mfc.T5_XL_DIR, "tiny": common.CACHE / "blip2-memory-tiny",
           "tiny-t5": common.CACHE / "blip2-memory-tiny-t5"}
TINY_TEXT = {"tiny": {**mfc.OPT_2_7B, "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 128,
                      "num_attention_heads": 4, "word_embed_proj_dim": 64},
             "tiny-t5": {**mfc.FLAN_T5_XL, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
                         "num_decoder_layers": 2, "num_heads": 4}}
IMAGES, POSITIONS, NEW_TOKENS = 8, 16, 8
NOT_LM = ["vision_model", "qformer", "language_projection"]  # torchao's skip list: quantize the LM only, as ours


# ----------------------------------------------------------------------------- the measured process

def tensor_bytes(t: torch.Tensor, seen: dict) -> None:
    """Adds the storage of `t` to seen (data_ptr -> bytes); a tensor subclass (torchao) by its parts."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for name in names:
            tensor_bytes(getattr(t, name), seen)
        return
    seen[t.data_ptr()] = t.numel() * t.element_size()


def weight_bytes(module: torch.nn.Module) -> int:
    seen: dict = {}
    for t in list(module.parameters()) + list(module.buffers()):
        tensor_bytes(t, seen)
    return sum(seen.values())


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def load(impl: str, folder: Path, setting: str):
    dtype, quantize = SETTINGS[setting]
    if impl == "ours":
        return common.load_ours(folder, dtype, **({"quantize": quantize} if quantize else {}))
    import transformers

    kwargs = {"dtype" if common.ref_major() >= 5 else "torch_dtype": dtype}
    if impl == "ref-lowmem":
        kwargs["low_cpu_mem_usage"] = True
    if quantize:
        kwargs["quantization_config"] = torchao_config(quantize)
    return transformers.Blip2ForConditionalGeneration.from_pretrained(str(folder), **kwargs).eval()


def reference_quantization_missing() -> str | None:
    """Why the reference here has no CPU int8/int4 path, or None when it has one (torchao)."""
    import transformers

    if not hasattr(transformers, "TorchAoConfig"):
        return f"transformers {transformers.__version__} has no CPU int8/int4 (bitsandbytes needs CUDA; no TorchAoConfig)"
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "torchao is not installed beside this transformers"
    return None


def torchao_config(quantize: str):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    if quantize == "int8":
        kind = Int8WeightOnlyConfig()
    else:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        kind = PrototypeInt4WeightOnlyConfig(group_size=128)  # torchao's CPU int4 layout
    return TorchAoConfig(kind, modules_to_not_convert=NOT_LM)


def inputs(model, impl: str, rows: int, text: int, seed: int) -> dict:
    """Random images and token ids; the newer prompt layout (image tokens first) where it is wanted."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size
    dtype = next(model.vision_model.parameters()).dtype
    pixels = torch.randn(rows, 3, size, size, generator=gen).to(dtype)
    words = torch.randint(4, 30000, (rows, text), generator=gen)
    image_tokens = impl == "ours" or common.ref_major() >= 5
    head = torch.full((rows, cfg.num_query_tokens if image_tokens else 0), cfg.image_token_index)
    t5 = cfg.text_config.model_type == "t5"
    first = torch.full((rows, 1), 0 if t5 else mfc.OPT_2_7B["bos_token_id"])
    batch = {"pixel_values": pixels}
    if t5:  # encoder: queries + words + </s>; the decoder reads <pad> + words
        batch["input_ids"] = torch.cat([head, words, torch.ones(rows, 1, dtype=torch.long)], 1)
        batch["decoder_input_ids"] = torch.cat([first, words[:, :-1]], 1)
    else:
        batch["input_ids"] = torch.cat([head, first, words[:, :-1]], 1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


@torch.no_grad()
def child(impl: str, folder: Path, setting: str, images: int = IMAGES) -> dict:
    if impl == "ref-lowmem" and common.ref_major() >= 5:
        return {"skipped": "5.x always loads with low_cpu_mem_usage"}
    if impl != "ours" and SETTINGS[setting][1] and (why := reference_quantization_missing()):
        return {"skipped": why}
    t = time.perf_counter()
    model = load(impl, folder, setting)
    out = {"load_s": round(time.perf_counter() - t, 1), "load_peak": common.peak_rss_bytes(),
           "rss_after_load": vm_rss(), "weights": weight_bytes(model), "lm_weights": weight_bytes(model.language_model)}
    prompt = inputs(model, impl, 1, 4, seed=1)
    prompt.pop("decoder_input_ids", None)
    ids = model.generate(**prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    out.update(gen_peak=common.peak_rss_bytes(), generated=ids[0, -NEW_TOKENS:].tolist())
    if images:  # after the peaks: not counted
        logits = model(**inputs(model, impl, images, POSITIONS, seed=2)).logits
        out["top1"] = logits[:, -POSITIONS:].argmax(-1).flatten().tolist()
    return out


# ----------------------------------------------------------------------------- the driver

def run_cell(impl: str, python: str, shape: str, setting: str, images: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    t = time.perf_counter()
    proc = subprocess.run([python, __file__, "--child", impl, shape, setting, "--images", str(images)],
                          cwd=common.ROOT, env=env,
                          capture_output=True, text=True)
    row = {"impl": impl, "shape": shape, "setting": setting, "wall_s": round(time.perf_counter() - t, 1),
           "load_average": common.load_average()}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {**row, "failed": tail[0]}
    return {**row, **json.loads(proc.stdout.strip().splitlines()[-1])}


def drive(args) -> None:
    folder = FOLDERS[args.shape]
    if args.shape in TINY_TEXT:
        make_tiny(args.shape, folder)
    if not (folder / "config.json").is_file():
        sys.exit(f"{folder} is missing: run python bench/make_full_checkpoint.py --shape {args.shape}")
    runs = [("ours", "ours", sys.executable)] if "ours" in args.impls else []
    for name, python in common.pythons().items():
        for impl in ("ref", "ref-lowmem"):
            if impl in args.impls:
                runs.append((impl, name, python))
    with open(args.out, "a") as f:
        for impl, release, python in runs:
            for setting in args.settings:
                row = run_cell(impl, python, args.shape, setting, args.images)
                row["release"] = release
                if impl == "ref-lowmem" and "skipped" in row:
                    break
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(summary(row), flush=True)


def summary(row: dict) -> str:
    gib = lambda key: f"{row[key] / 2**30:.2f}" if key in row else "-"  # noqa: E731
    what = row.get("failed") or row.get("skipped") or (
        f"load peak {gib('load_peak')} GiB, generate peak {gib('gen_peak')} GiB, weights {gib('weights')} GiB "
        f"(LM {gib('lm_weights')}), load {row['load_s']} s")
    return f"{row['shape']} {row['impl']} {row['release']} {row['setting']}: {what} (load average {row['load_average']})"


def make_tiny(shape: str, folder: Path) -> None:
    """A tiny OPT- or T5-shaped checkpoint for smoke runs, by the reference's save_pretrained."""
    if (folder / "config.json").is_file():
        return
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                            encoder_hidden_size=32),
        text_config=TINY_TEXT[shape], num_query_tokens=4,
        image_token_index=mfc.T5_IMAGE_TOKEN if shape == "tiny-t5" else mfc.IMAGE_TOKEN)
    model = Blip2ForConditionalGeneration(config)
    mfc.fill_random_(model)
    model.half().save_pretrained(folder)


# ----------------------------------------------------------------------------- the table

def table(paths: list[str]) -> str:
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    latest = {(r["shape"], r["impl"], r["release"], r["setting"]): r for r in rows}  # a rerun replaces
    lines = ["| shape | setting | implementation | load peak GiB | generate peak GiB | weights GiB | LM weights GiB "
             "(x bf16) | top-1 = bf16 | greedy tokens = bf16 | ours / this (generate peak) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    gib = lambda v: f"{v / 2**30:.2f}"  # noqa: E731
    for (shape, impl, release, setting), r in sorted(latest.items(), key=order):
        name = "ours" if impl == "ours" else f"transformers {r.get('transformers', release)}" + (
            " low_cpu_mem_usage" if impl == "ref-lowmem" else "")
        if "load_peak" not in r:
            lines.append(f"| {shape} | {setting} | {name} | {r.get('skipped') or 'failed: ' + r['failed']} |||||||")
            continue
        bf16 = latest.get((shape, impl, release, "bf16"), {})
        lm = f"{gib(r['lm_weights'])}" + (f" ({r['lm_weights'] / bf16['lm_weights']:.2f}x)" if "lm_weights" in bf16 else "")
        agree = lambda key: (f"{sum(a == b for a, b in zip(r[key], bf16[key]))}/{len(r[key])}"  # noqa: E731
                             if key in bf16 and key in r and setting != "bf16" else "")
        ours = latest.get((shape, "ours", "ours", setting), {})
        ratio = f"{ours['gen_peak'] / r['gen_peak']:.2f}x" if impl != "ours" and "gen_peak" in ours else ""
        lines.append(f"| {shape} | {setting} | {name} | {gib(r['load_peak'])} | {gib(r['gen_peak'])} | "
                     f"{gib(r['weights'])} | {lm} | {agree('top1')} | {agree('generated')} | {ratio} |")
    loads = [r["load_average"] for r in latest.values()]
    return "\n".join(lines) + f"\n\nload average at the end of each cell: {min(loads):.2f} to {max(loads):.2f}\n"


def order(item):
    (shape, impl, release, setting), _ = item
    return shape, list(SETTINGS).index(setting), impl != "ours", release, impl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(FOLDERS), default="opt-2.7b")
    parser.add_argument("--impls", nargs="+", default=["ours", "ref"], choices=["ours", "ref", "ref-lowmem"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", help="JSON lines file the cells append to")
    parser.add_argument("--images", type=int, default=IMAGES,
                        help=f"images of the top-1 check ({POSITIONS} positions each; 0: no check)")
    parser.add_argument("--table", nargs="+", metavar="JSONL", help="print the Markdown table of these results")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, shape, setting = args.child
        out = child(impl, FOLDERS[shape], setting, args.images)
        _, version = common.reference()
        print(json.dumps({**out, "transformers": version}))
    elif args.table:
        print(table(args.table))
    elif args.out:
        drive(args)
    else:
        parser.error("give --out (to measure) or --table")


if __name__ == "__main__":
    main()
