"""Where the time from `from_pretrained` to the first new token goes, on the InstructBLIP-Vicuna-7B
shape (bench/bench_instructblip_7b.py --make writes the checkpoint).

    python bench/profile_first_token.py                  # bf16, the 7B shape
    python bench/profile_first_token.py --tiny           # the same on the tiny model (smoke test)

One process, plain `from_pretrained`, default threads, wall clock. Phases, each with its minor page
faults (first touches of fresh memory) and the RSS after it:
- load: `from_pretrained`;
- pack: the prepacking the first inference does on its own (`fit_layout`), run here by itself;
- first generate: one new token, the linear layers already packed, torch.profiler's top ops;
- again: the same generate once more (whatever the first call paid once shows as the difference).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_instructblip_7b import FULL_DIR, IMAGE_TOKEN, PROMPT, QFORMER_PROMPT, TINY_DIR  # noqa: E402


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def phase(name: str, fn):
    f, t = faults(), time.perf_counter()
    out = fn()
    seconds, touched = time.perf_counter() - t, faults() - f
    print(f"{name:16s} {seconds:7.2f} s  {touched * 4096 / 1e9:6.2f} GB first-touched ({touched} minor faults)  "
          f"RSS {rss_gb():5.2f} GB  load average {common.load_average():.2f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--top", type=int, default=15, help="rows of the profiler's table")
    args = parser.parse_args()
    import blip2

    folder = TINY_DIR if args.tiny else FULL_DIR
    torch.manual_seed(0)
    inputs = dict(pixel_values=torch.randn(1, 3, 224, 224).bfloat16(), qformer_input_ids=torch.tensor([QFORMER_PROMPT]),
                  input_ids=torch.tensor([[IMAGE_TOKEN] * 32 + PROMPT]))
    print(f"{folder.name}, threads {torch.get_num_threads()}, load average {common.load_average():.2f}")
    model = phase("load", lambda: blip2.load_model(folder, torch_dtype=torch.bfloat16).eval())
    phase("pack", lambda: model.fit_layout(generating=True))
    with torch.inference_mode():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            phase("first generate", lambda: model.generate(**inputs, max_new_tokens=1))
        phase("again", lambda: model.generate(**inputs, max_new_tokens=1))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(f"peak RSS {common.peak_rss_bytes() / 1e9:.2f} GB, load average {common.load_average():.2f}")


if __name__ == "__main__":
    main()
