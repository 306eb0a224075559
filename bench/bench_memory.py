"""Peak memory (RSS) to load and generate, ours against the reference, side by side on CPU.

    python bench/bench_memory.py --cache DIR                 # blip2-opt-2.7b- and flan-t5-xl-shaped
    python bench/bench_memory.py --cache DIR --shapes tiny   # a smoke run of the script itself

Each shape is a random checkpoint (ViT-g + Q-Former + the language model) saved once in float16
by the reference's save_pretrained under DIR. Each (implementation, setting) then runs in a fresh
process that loads the checkpoint, captions one image (8 new tokens, greedy) and reports its peak
RSS (getrusage). Settings: fp32, bf16, and ours with the language model in int8 (quantize="int8")
and int4 (quantize="int4", where the build has it). The reference has no CPU int8/int4 path
(bitsandbytes is CUDA only): those cells say n/a. Run it on a quiet machine; it prints a Markdown
table (also written to bench/results/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "opt-2.7b": dict(model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                     num_attention_heads=32, word_embed_proj_dim=2560, eos_token_id=50118),
    "flan-t5-xl": dict(model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                       num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
                       tie_word_embeddings=False, decoder_start_token_id=0),
    "tiny": dict(model_type="opt", vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=37,
                 num_attention_heads=4, word_embed_proj_dim=32),
}
TINY_PARTS = dict(vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=16, patch_size=4),
                  qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=40, encoder_hidden_size=32), num_query_tokens=4)
SETTINGS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("bfloat16", "int8"),
            "int4": ("bfloat16", "int4")}


def make_checkpoint(shape: str, folder: Path) -> Path:
    """A float16 random checkpoint of `shape`, made once (built on meta, then given storage)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    parts = TINY_PARTS if shape == "tiny" else {}
    config = Blip2Config(text_config=SHAPES[shape], **parts)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config).half()
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("weight") and p.dim() == 1
                    else torch.randn(p.shape, generator=gen).mul_(0.02).to(p.dtype))
    model.save_pretrained(folder)
    return folder


def child(impl: str, folder: str, setting: str) -> None:
    """Runs in its own process: load, caption one image, print peak RSS in bytes as JSON."""
    import resource

    import torch

    dtype_name, quantize = SETTINGS[setting]
    dtype = getattr(torch, dtype_name)
    if impl == "ours":
        from blip2 import Blip2ForConditionalGeneration

        kwargs = {"quantize": quantize} if quantize else {}
        model = Blip2ForConditionalGeneration.from_pretrained(folder, torch_dtype=dtype, **kwargs)
    else:
        from transformers import Blip2ForConditionalGeneration

        model = Blip2ForConditionalGeneration.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=True)
    size = model.config.vision_config.image_size
    with torch.no_grad():
        model.generate(torch.randn(1, 3, size, size, dtype=dtype), max_new_tokens=8)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure(impl: str, folder: Path, setting: str) -> float | None:
    proc = subprocess.run([sys.executable, __file__, "--child", impl, str(folder), setting], cwd=ROOT,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        print(f"  {impl} {setting}: failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss"] / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", help="folder for the random checkpoints (several GB; required)")
    parser.add_argument("--shapes", nargs="+", default=["opt-2.7b", "flan-t5-xl"], choices=list(SHAPES))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if not args.cache:
        parser.error("--cache DIR is required")
    lines = ["| shape | setting | ours peak RSS (GiB) | reference (GiB) | ours / reference |", "|---|---|---|---|---|"]
    for shape in args.shapes:
        folder = make_checkpoint(shape, Path(args.cache) / f"blip2-{shape}-random-fp16")
        for setting, (_, quantize) in SETTINGS.items():
            ours = measure("ours", folder, setting)
            ref = measure("reference", folder, setting) if quantize is None else None
            ratio = f"{ours / ref:.2f}x" if ours and ref else "n/a"
            cell = lambda v: f"{v:.2f}" if v else "n/a"  # noqa: E731
            lines.append(f"| {shape} | {setting} | {cell(ours)} | {cell(ref)} | {ratio} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results" / f"bench_memory_{date.today()}.md"
    out.write_text(f"`python bench/bench_memory.py --shapes {' '.join(args.shapes)}`\n\n{table}")
    print(f"\n{table}\nwritten to {out}")


if __name__ == "__main__":
    main()
