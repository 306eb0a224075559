"""Makes the random-weight checkpoints the benchmarks load, saved by the reference's save_pretrained.

    python bench/make_full_checkpoint.py            # full-size blip2-opt-2.7b in float16 (~7.7 GB)
    python bench/make_full_checkpoint.py --small    # ViT-B/14 + base Q-Former + OPT-125m sizes, float32

Runs under an interpreter with transformers (the pinned 4.37.2 or a newer release). The full
model is built on the meta device in float16 and only then given storage, so no 15 GB float32
instance ever exists. Weights are drawn with a fixed seed: normal(0, 0.02) for matrices and
embeddings, small normal biases, layer norms at 1 / 0. The config carries `image_token_index`
(as the newer hub snapshots do) so that transformers 5.x, which needs image tokens in the
prompt, runs it too.
Files go under $BLIP2_BENCH_CACHE (default ~/.cache/blip2-bench), never into the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("BLIP2_BENCH_CACHE", Path.home() / ".cache" / "blip2-bench"))
FULL_DIR = CACHE / "blip2-opt-2.7b-random-fp16"
SMALL_DIR = CACHE / "blip2-small-random"
IMAGE_TOKEN = 50265  # the newer checkpoints' <image> id; inside OPT's 50272-row table

OPT_2_7B = dict(
    model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
    num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
    do_layer_norm_before=True, activation_function="relu", pad_token_id=1, bos_token_id=2,
    eos_token_id=50118, dropout=0.1, attention_dropout=0.0, enable_bias=True,
)
OPT_125M = {**OPT_2_7B, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072,
            "num_attention_heads": 12, "word_embed_proj_dim": 768}
VIT_B14 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=14, qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-6)
QFORMER_BASE_FOR_VIT_B = dict(encoder_hidden_size=768)  # everything else: the documented base defaults


def config(small: bool):
    from transformers import Blip2Config

    if small:
        return Blip2Config(vision_config=VIT_B14, qformer_config=QFORMER_BASE_FOR_VIT_B, text_config=OPT_125M,
                           num_query_tokens=32, image_token_index=IMAGE_TOKEN)
    # The documented defaults are the blip2-opt-2.7b vision encoder (ViT-g/14) and Q-Former.
    return Blip2Config(text_config=OPT_2_7B, num_query_tokens=32, image_token_index=IMAGE_TOKEN)


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int = 0) -> None:
    """Draws every parameter in place, module by module, in the parameter's own dtype."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.LayerNorm):
                p.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def make(small: bool, out: Path, seed: int = 0, force: bool = False) -> Path:
    from transformers import Blip2ForConditionalGeneration

    if (out / "config.json").is_file() and not force:
        print(f"{out} exists (use --force to remake)")
        return out
    t0 = time.perf_counter()
    dtype = torch.float32 if small else torch.float16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Blip2ForConditionalGeneration(config(small))
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty unties nothing, but re-tie in case a release builds lm_head apart
    fill_random_(model, seed)
    model.eval()
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"built {n / 1e9:.3f} B parameters in {dtype} in {time.perf_counter() - t0:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"saved {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s total")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the small model of workloads a and b")
    parser.add_argument("--out", type=Path, help="output folder (default under $BLIP2_BENCH_CACHE)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    out = args.out or (SMALL_DIR if args.small else FULL_DIR)
    torch.set_num_threads(os.cpu_count() or 1)
    make(args.small, out, args.seed, args.force)


if __name__ == "__main__":
    sys.exit(main())
