"""Two processes under torchrun (gloo on CPU) train as one process with the same global batch.

The 2-process run gathers ITC features (with their gradients) and ITM negatives across
processes and normalises ITG by the global token count, so its losses and weights follow
the 1-process run's up to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from blip2.cli import main
from blip2.train.loop import METRICS
from train_helpers import one_thread, write_dataset, write_stage1_config, write_tokenizer  # noqa: F401 (one_thread: an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


def test_two_processes_match_one_process_of_the_same_global_batch(tmp_path):
    data = write_dataset(tmp_path / "data", n=8)
    tokenizer = write_tokenizer(tmp_path / "tokenizer.json")
    one = write_stage1_config(tmp_path / "one.json", data, tokenizer, tmp_path / "one", batch_size=4, max_steps=STEPS)
    two = write_stage1_config(tmp_path / "two.json", data, tokenizer, tmp_path / "two", batch_size=2, max_steps=STEPS)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "blip2.cli", "train", "stage1", "--config", str(two)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert main(["train", "stage1", "--config", str(one)]) == 0

    single, double = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in single] == [r["step"] for r in double] == list(range(1, STEPS + 1))
    worst = max(abs(s[k] - d[k]) for s, d in zip(single, double) for k in ("itc", "itm", "itg", "loss"))
    print(f"max |loss(1 process) - loss(2 processes)| over {STEPS} steps: {worst:.2e}")
    print("1 process:", [round(r["loss"], 5) for r in single], "2 processes:", [round(r["loss"], 5) for r in double])
    assert worst < 1e-5
    # The gradients agree too (their global norm, before clipping). Weights are not compared
    # elementwise: Adam's first steps move each weight by about lr * sign(gradient), so a
    # gradient of ~1e-9 whose rounding differs moves a weight differently by ~lr.
    norms = [abs(s["grad_norm"] - d["grad_norm"]) / s["grad_norm"] for s, d in zip(single, double)]
    print(f"max relative |grad norm difference|: {max(norms):.2e}")
    assert max(norms) < 1e-5
