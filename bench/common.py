"""Shared pieces of the benchmarks: which transformers is here, timing, peak memory, workers.

Every benchmark runs ours and the reference in one process on the same weights and inputs.
A driver can repeat that under other interpreters (the pinned transformers 4.37.2 and the
newest release live in separate virtual environments) and gather their JSON results.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BLIP2_BENCH_CACHE", Path.home() / ".cache" / "blip2-bench"))


def shown_path(path) -> str:
    """A checkpoint path as results files show it: under $BLIP2_BENCH_CACHE, never this machine's folder."""
    try:
        return "$BLIP2_BENCH_CACHE/" + Path(path).resolve().relative_to(CACHE.resolve()).as_posix()
    except ValueError:
        return Path(path).name
SMALL_DIR = CACHE / "blip2-small-random"
FULL_DIR = CACHE / "blip2-opt-2.7b-random-fp16"
IMAGE_TOKEN = 50265
BOS, PAD = 2, 1

# $BLIP2_BENCH_PYTHONS: name=python,... for each environment the drivers run their workers in
# (e.g. "4.37.2=.venv/bin/python,newest=../newtf/bin/python"); by default this interpreter, "here".


def pythons() -> dict[str, str]:
    spec = os.environ.get("BLIP2_BENCH_PYTHONS", "")
    found = {}
    for item in filter(None, spec.split(",")):
        name, _, path = item.partition("=")
        if Path(path).exists():
            found[name] = path
    return found or {"here": sys.executable}


def reference():
    """(transformers module, version) or (None, None) when this interpreter has none."""
    try:
        import transformers
    except ImportError:
        return None, None
    return transformers, transformers.__version__


def ref_major() -> int:
    _, version = reference()
    return int(version.split(".")[0]) if version else 0


def load_reference(path: Path, dtype: torch.dtype, **kwargs):
    """The reference's Blip2ForConditionalGeneration, as its users load it (`kwargs`: more of from_pretrained's)."""
    transformers, _ = reference()
    key = "dtype" if ref_major() >= 5 else "torch_dtype"  # 5.x renamed the argument
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(str(path), **{key: dtype}, **kwargs)
    return model.eval()


def load_ours(path: Path, dtype, **kwargs):
    from blip2 import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration.from_pretrained(str(path), torch_dtype=dtype, **kwargs).eval()


def prompt_ids(text_ids: list[int], num_query_tokens: int = 32, image_tokens: bool = True) -> list[int]:
    """A prompt as each implementation wants it: the newer layout puts <image> tokens first;
    transformers 4.37 has no image tokens and puts the queries in front by itself."""
    head = [IMAGE_TOKEN] * num_query_tokens if image_tokens else []
    return head + [BOS] + text_ids


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


CLOCK = time.perf_counter  # set_clock("cpu") switches to this process's CPU time


def set_clock(kind: str) -> None:
    """"wall" (default): elapsed time. "cpu": CPU time of this process on one thread, which
    other processes on a busy machine disturb far less (they still share caches and memory)."""
    global CLOCK
    if kind == "cpu":
        torch.set_num_threads(1)
        CLOCK = time.process_time
    else:
        CLOCK = time.perf_counter


def measure(fn, repeats: int = 3, warmup: int = 1) -> dict:
    """Seconds per call: the fastest (least disturbed by other load) and the median."""
    return measure_many({"x": fn}, repeats, warmup)["x"]


def measure_many(fns: dict, repeats: int = 3, warmup: int = 1) -> dict:
    """Times several functions taking turns (so a burst of other load hits them alike):
    name -> {"min", "median", "runs"} seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = CLOCK()
            fn()
            times[name].append(CLOCK() - t)
    return {name: {"min": min(ts), "median": statistics.median(ts), "runs": len(ts)} for name, ts in times.items()}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM): file pages it mapped count too."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_bytes(model: torch.nn.Module) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def peaks() -> dict:
    """The machine's measured peaks (bench/peak.py), measured once and cached."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peak

    return peak.cached()


def load_average() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return float("nan")


def run_worker(python: str, script: Path, args: list[str], timeout: float = 600) -> dict:
    """Runs `python script --worker args...`; its last stdout line is a JSON result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([python, str(script), "--worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{python} {script.name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def fmt_ratio(ours: float, ref: float) -> str:
    return f"{ref / ours:.2f}x" if ours and ref else "-"
