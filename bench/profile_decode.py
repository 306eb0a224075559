"""Where one batch-1 decoding step spends its time, on the full-size blip2-opt-2.7b shape.

    python bench/profile_decode.py                    # bf16
    python bench/profile_decode.py --quantize int8 --tokens 16

Three figures, in one process (plain `from_pretrained`, default threads, wall clock):
- the step: seconds per new token of `generate` (streamer stamps, first token left out);
- the weight reads alone: every language-model linear layer called once on one row, in order,
  nothing else (the floor the step can reach with these kernels), and the GB/s that implies;
- torch.profiler's table of one `generate`, by self CPU time, to see what else the step runs.
The step over the weight reads is the overhead (Python, attention, norms, sampling, sync).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_decode import PROMPT, Stamps, lm_weight_bytes  # noqa: E402


def linear_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers a decoding step multiplies by, in the order it does (the output head last)."""
    return [m for m in lm.modules() if hasattr(m, "in_features") and not isinstance(m, torch.nn.Embedding)]


def weight_pass_s(layers: list[torch.nn.Module], dtype: torch.dtype, repeats: int) -> float:
    """Median seconds of calling every layer once on a (1, 1, in_features) input."""
    inputs = [torch.randn(1, 1, m.in_features, dtype=dtype) for m in layers]
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        for m, x in zip(layers, inputs):
            m(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def repack(layers: list[torch.nn.Module], hint: int) -> None:
    """Packs each prepacked layer again for `hint` rows, one at a time (no second copy of the model)."""
    from blip2.modeling.packed import _pack

    for m in layers:
        if getattr(m, "packed", None) is not None and m.packed.is_mkldnn:
            m.packed = _pack(m.weight, hint)
            m.batch_hint = hint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(common.FULL_DIR))
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="profiler table rows")
    parser.add_argument("--hints", type=int, nargs="*", default=[],
                        help="also repack the LM's layers for these batch sizes (oneDNN's layout hint) and time again")
    args = parser.parse_args()
    dtype = torch.bfloat16
    print(f"load average {common.load_average():.2f}, threads {torch.get_num_threads()}", flush=True)
    model = common.load_ours(Path(args.checkpoint), dtype, quantize=args.quantize)
    model_bytes = common.model_bytes(model)  # before the first use packs it (asking a packed model unpacks it)
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 224, 224).to(dtype)
    ids = torch.tensor([common.prompt_ids(PROMPT)])
    gen = dict(pixel_values=pixels, input_ids=ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    with torch.inference_mode():
        model.generate(pixel_values=pixels, input_ids=ids, max_new_tokens=3, min_new_tokens=3)  # packs, warms up
        steps = []
        for _ in range(args.repeats):
            stamps = Stamps()
            model.generate(streamer=stamps, **gen)
            steps.append((stamps.times[-1] - stamps.times[0]) / (len(stamps.times) - 1))
        step = statistics.median(steps)
        lm = model.language_model
        layers = linear_layers(lm)
        floor = weight_pass_s(layers, dtype, args.repeats)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.generate(**gen)
        for hint in args.hints:
            repack(layers, hint)
            floor_h = weight_pass_s(layers, dtype, args.repeats)
            steps_h = []
            for _ in range(args.repeats):
                stamps = Stamps()
                model.generate(streamer=stamps, **gen)
                steps_h.append((stamps.times[-1] - stamps.times[0]) / (len(stamps.times) - 1))
            print(f"LM repacked for batch {hint}: step {statistics.median(steps_h) * 1e3:.1f} ms, "
                  f"weight reads alone {floor_h * 1e3:.1f} ms (load {common.load_average():.2f})", flush=True)
    weights = lm_weight_bytes(lm)
    cfg = lm.config  # keys and values of every layer, for the prompt (image queries included) and the new tokens
    kv = 2 * cfg.num_hidden_layers * cfg.hidden_size * (ids.shape[1] + args.tokens) * torch.finfo(dtype).bits // 8
    rss = common.peak_rss_bytes()
    bandwidth = common.peaks().get("bandwidth_gbs", float("nan"))
    print(f"\nLM weights {weights / 1e9:.2f} GB in {len(layers)} linear layers; measured bandwidth {bandwidth:.1f} GB/s")
    print(f"step {step * 1e3:.1f} ms/token ({1 / step:.2f} tok/s, {weights / step / 1e9:.1f} GB/s, "
          f"{weights / step / 1e9 / bandwidth:.0%} of bandwidth)")
    print(f"weight reads alone {floor * 1e3:.1f} ms ({weights / floor / 1e9:.1f} GB/s, "
          f"{weights / floor / 1e9 / bandwidth:.0%} of bandwidth); the rest of the step {(step - floor) * 1e3:.1f} ms "
          f"({(step - floor) / step:.0%})")
    print(f"peak RSS {rss / 1e9:.2f} GB = {rss / (model_bytes + kv):.3f}x the weights ({model_bytes / 1e9:.2f} GB) "
          f"plus the KV cache ({kv / 1e6:.1f} MB)")
    print(f"load average {common.load_average():.2f}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
