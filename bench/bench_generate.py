"""Generation speed: ours against transformers 4.37 on the same model and inputs, in one process.

Builds a small random BLIP-2 with the reference (one with OPT, one with a Flan-T5-shaped
T5: `--text`), saves it with the reference's save_pretrained, loads it with ours, and times `generate` for greedy search and beam search
(5 beams) on a batch of left-padded prompts. Prints new tokens per second for each and the
ratio (ours / reference), and checks that both produced the same tokens.

    python bench/bench_generate.py [--text opt,t5] [--batch 4] [--new-tokens 24] [--repeats 5] [--device cpu] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", default="opt,t5", help="language models to time, comma-separated: opt, t5")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case, alternating (the best is kept)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p.parse_args(argv)


# Small language models of real proportions: a deep decoder, a wide vocab. The T5 one is shaped
# like Flan-T5 (gated GELU, untied head, 32 relative-position buckets).
TEXT_CONFIGS = {
    "opt": dict(model_type="opt", vocab_size=16384, hidden_size=512, ffn_dim=2048, num_hidden_layers=6,
                num_attention_heads=8, max_position_embeddings=256, word_embed_proj_dim=512,
                pad_token_id=1, bos_token_id=2, eos_token_id=50),
    "t5": dict(model_type="t5", vocab_size=16384, d_model=512, d_kv=64, num_heads=8, d_ff=1024, num_layers=6,
               num_decoder_layers=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
               pad_token_id=0, bos_token_id=2, eos_token_id=50, decoder_start_token_id=0),
}


def reference_model(text: str = "opt", seed: int = 0):
    """A random reference Blip2: small, but with real proportions (32 queries; TEXT_CONFIGS)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(
        vision_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=6,
                           image_size=112, patch_size=14),
        qformer_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                            encoder_hidden_size=192, cross_attention_frequency=2),
        text_config=TEXT_CONFIGS[text],
        num_query_tokens=32,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the reference's own init is near zero: draw weights that give varied text
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.05
            param.copy_(1.0 + noise if name.endswith("weight") and param.dim() == 1 else noise)
    model.tie_weights()
    return model.eval()


def inputs(config, batch: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=gen)
    lengths = [8 - (row * 3) % 7 for row in range(batch)]  # 8, 5, 2, 6, ...: left padding in most rows
    ids = torch.full((batch, 8), config.text_config.pad_token_id)
    mask = torch.zeros(batch, 8, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 8 - n:] = torch.cat([torch.tensor([2]), torch.randint(100, 16000, (n - 1,), generator=gen)])
        mask[row, 8 - n:] = 1
    return pixel_values, ids, mask


def best_times(run_ours, run_ref, repeats: int, device: str):
    """Best wall time of each, alternating ours and the reference so that load from other
    processes hits both alike. Returns (ours_s, ref_s, ours_out, ref_out)."""
    out_ours, out_ref = run_ours(), run_ref()  # warm-up, and the tokens to compare

    def timed(fn) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    ours, ref = [], []
    for _ in range(repeats):
        ours.append(timed(run_ours))
        ref.append(timed(run_ref))
    return min(ours), min(ref), out_ours, out_ref


def time_model(text: str, args, dtype) -> dict:
    """Greedy and beam-search timings of one BLIP-2 (its language model: `text`), keyed "text case"."""
    from blip2 import Blip2ForConditionalGeneration

    ref = reference_model(text)
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = Blip2ForConditionalGeneration.from_pretrained(folder, torch_dtype=dtype, device=args.device)
    ref = ref.to(args.device, dtype)
    pixel_values, ids, mask = (t.to(args.device) for t in inputs(ref.config, args.batch))
    pixel_values = pixel_values.to(dtype)

    cases = {"greedy": dict(), "beam5": dict(num_beams=5)}
    results = {}
    for name, extra in cases.items():
        kwargs = dict(max_new_tokens=args.new_tokens, **extra)

        def run_ref():
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ref.generate(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, **kwargs)

        def run_ours():
            return ours.generate(pixel_values, ids, mask, **kwargs)

        t_ours, t_ref, out_ours, out_ref = best_times(run_ours, run_ref, args.repeats, args.device)
        new_tokens = out_ours.shape[0] * (out_ours.shape[1] - 1)
        results[f"{text} {name}"] = dict(
            ours_tokens_per_s=new_tokens / t_ours, reference_tokens_per_s=new_tokens / t_ref,
            ours_s=t_ours, reference_s=t_ref, speedup=t_ref / t_ours,
            same_tokens=bool(out_ours.shape == out_ref.shape and torch.equal(out_ours.cpu(), out_ref.cpu())),
        )
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    results = {}
    for text in args.text.split(","):
        results.update(time_model(text, args, dtype))
    if args.json:
        print(json.dumps(dict(device=args.device, dtype=args.dtype, batch=args.batch,
                              new_tokens=args.new_tokens, threads=torch.get_num_threads(), results=results), indent=1))
        return
    print(f"generate: batch {args.batch}, {args.new_tokens} new tokens, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads (best of {args.repeats})")
    for name, r in results.items():
        print(f"  {name:10s} ours {r['ours_tokens_per_s']:8.1f} tok/s   reference {r['reference_tokens_per_s']:8.1f} tok/s"
              f"   ratio {r['speedup']:.2f}x   same tokens: {'yes' if r['same_tokens'] else 'NO'}")


if __name__ == "__main__":
    main()
