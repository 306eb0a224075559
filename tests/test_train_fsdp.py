"""Stage 2 with the frozen language model sharded over two processes (torch's fully_shard, gloo
on CPU): the same losses, gradients and weights as one process with the same global batch, and
a resumed run continues exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from blip2.cli import main
from blip2.train.loop import CHECKPOINTS, METRICS
from train_helpers import one_thread, stage2_config, write_dataset, write_tokenizer  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


def _spec(path: Path, data: Path, tokenizer: Path, out: Path, **train) -> Path:
    spec = {
        "model": {"config": stage2_config().to_dict(), "seed": 0},
        "data": {"train": str(data), "tokenizer": str(tokenizer), "max_len": 12, "prompt": "a photo of"},
        "train": {"out_dir": str(out), "batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "max_steps": 3,
                  "progress": False, "save_every": 1, **train},
    }
    path.write_text(json.dumps(spec))
    return path


def _torchrun(config: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "blip2.cli", "train", "stage2", "--config", str(config), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too, not only torchrun
        out, err = proc.communicate()
    assert proc.returncode == 0, out[-2000:] + err[-4000:]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


def _trainable(out: Path, step: int) -> dict:
    return torch.load(out / CHECKPOINTS / f"step-{step:08d}.pt", weights_only=True)["model"]


def test_sharded_frozen_lm_trains_as_one_process_and_resumes_exactly(tmp_path):
    data = write_dataset(tmp_path / "data", n=8)
    tok = write_tokenizer(tmp_path / "tokenizer.json")
    one = _spec(tmp_path / "one.json", data, tok, tmp_path / "one")
    assert main(["train", "stage2", "--config", str(one)]) == 0
    two = _spec(tmp_path / "two.json", data, tok, tmp_path / "two", batch_size=2, fsdp_frozen=True)  # 2 x 2 rows
    _torchrun(two)

    single, double = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in double] == [1, 2, 3]
    worst = max(abs(s["loss"] - d["loss"]) for s, d in zip(single, double))
    norms = max(abs(s["grad_norm"] - d["grad_norm"]) / s["grad_norm"] for s, d in zip(single, double))
    print(f"max |loss(1 process) - loss(2 processes, sharded LM)|: {worst:.2e}; grad norms: {norms:.2e} relative")
    assert worst < 1e-5 and norms < 1e-5
    a, b = _trainable(tmp_path / "one", 3), _trainable(tmp_path / "two", 3)
    assert set(a) == set(b) and not any(k.startswith("model.language_model.") for k in a)
    weights = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |weight difference| after 3 steps: {weights:.2e}")
    assert weights < 1e-4

    # As if killed after step 2's checkpoint: the rerun resumes there and redoes step 3 exactly.
    folder = tmp_path / "two" / CHECKPOINTS
    step3 = _trainable(tmp_path / "two", 3)
    (folder / "step-00000003.pt").unlink()
    (folder / "latest.json").write_text(json.dumps({"step": 2, "file": "step-00000002.pt"}))
    _torchrun(two)
    again = _metrics(tmp_path / "two")
    assert [r["step"] for r in again] == [1, 2, 3] and again[2]["loss"] == double[2]["loss"]
    redone = _trainable(tmp_path / "two", 3)
    assert all(torch.equal(redone[k], step3[k]) for k in step3)


def test_gradient_checkpointing_from_the_config_gives_the_same_gradients(tmp_path):
    from blip2.train.recipes import read_spec, stage2_job

    data = write_dataset(tmp_path / "data", n=4)
    tok = write_tokenizer(tmp_path / "tokenizer.json")
    grads = []
    for on in (False, True):
        path = _spec(tmp_path / f"s{on}.json", data, tok, tmp_path / f"o{on}")
        spec = read_spec(path)
        spec["model"]["gradient_checkpointing"] = on
        job = stage2_job(spec)
        assert (job.model.qformer.checkpointing is not None) == on
        job.objective.train()
        batch = job.collate([job.train_data[i] for i in range(4)])
        job.objective(batch, 0)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in job.objective.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("model.qformer.") for k in grads[0])
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) < 1e-6
