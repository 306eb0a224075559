"""Makes the random-weight checkpoints the benchmarks load, saved by the reference's save_pretrained.

    python bench/make_full_checkpoint.py                      # full-size blip2-opt-2.7b in float16 (~7.7 GB)
    python bench/make_full_checkpoint.py --shape flan-t5-xl   # full-size blip2-flan-t5-xl in float16 (~7.9 GB)
    python bench/make_full_checkpoint.py --small              # ViT-B/14 + base Q-Former + OPT-125m, float32

Runs under an interpreter with transformers (the pinned 4.37.2 or a newer release). The full
model is built on the meta device in float16 and only then given storage, so no 15 GB float32
instance ever exists. Weights are drawn with a fixed seed: normal(0, 0.02) for matrices and
embeddings, small normal biases, layer norms (T5's RMS norms too) at 1 / 0. The config carries
`image_token_index` (as the newer hub snapshots do) so that transformers 5.x, which needs image tokens in the
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
T5_XL_DIR = CACHE / "blip2-flan-t5-xl-random-fp16"
SMALL_DIR = CACHE / "blip2-small-random"
IMAGE_TOKEN = 50265  # the newer checkpoints' <image> id; inside OPT's 50272-row table
T5_IMAGE_TOKEN = 32100  # blip2-flan-t5-xl's <image> id: the first unused row of T5's 32128-row table

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
FLAN_T5_XL = dict(
    model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
    num_heads=32, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.1,
)
SHAPES = ("opt-2.7b", "flan-t5-xl", "small")


def config(shape: str):
    from transformers import Blip2Config

    if shape == "small":
        return Blip2Config(vision_config=VIT_B14, qformer_config=QFORMER_BASE_FOR_VIT_B, text_config=OPT_125M,
                           num_query_tokens=32, image_token_index=IMAGE_TOKEN)
    # The documented defaults are the blip2 vision encoder (ViT-g/14) and Q-Former of both shapes.
    if shape == "flan-t5-xl":
        return Blip2Config(text_config=FLAN_T5_XL, num_query_tokens=32, image_token_index=T5_IMAGE_TOKEN)
    return Blip2Config(text_config=OPT_2_7B, num_query_tokens=32, image_token_index=IMAGE_TOKEN)


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int = 0) -> None:
    """Draws every parameter in place, module by module, in the parameter's own dtype."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("LayerNorm"):
                p.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def make(shape: str, out: Path, seed: int = 0, force: bool = False) -> Path:
    from transformers import Blip2ForConditionalGeneration

    if (out / "config.json").is_file() and not force:
        print(f"{out} exists (use --force to remake)")
        return out
    t0 = time.perf_counter()
    dtype = torch.float32 if shape == "small" else torch.float16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Blip2ForConditionalGeneration(config(shape))
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
    parser.add_argument("--small", action="store_true", help="the small model of workloads a and b (--shape small)")
    parser.add_argument("--shape", choices=SHAPES, default="opt-2.7b")
    parser.add_argument("--out", type=Path, help="output folder (default under $BLIP2_BENCH_CACHE)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    shape = "small" if args.small else args.shape
    out = args.out or {"small": SMALL_DIR, "flan-t5-xl": T5_XL_DIR, "opt-2.7b": FULL_DIR}[shape]
    torch.set_num_threads(os.cpu_count() or 1)
    make(shape, out, args.seed, args.force)


if __name__ == "__main__":
    sys.exit(main())
