"""Watching a run: TensorBoard (and Weights & Biases) logs, and the paper's metrics at every evaluation.

`Watch` receives every record the trainer logs: the losses, the learning rate and gradient norm
each step, throughput (examples per second between records), and the evaluation's numbers.
`EvalMetrics` is a trainer callback: at each evaluation it captions (or answers, or retrieves
from) the evaluation images with the model being trained and logs the same metrics `blip2 eval`
reports, plus a few sample captions as text and as an image grid.

The "log" section of a training config:
    tensorboard: true        # OUT/tensorboard (needs the tensorboard extra; skipped with a note without it)
    wandb: null              # a project name: log there too (needs wandb installed and logged in)
    eval_metrics: true       # caption metrics / VQA accuracy / retrieval recall at each evaluation
    eval_images: 200         # of the evaluation set, for those metrics
    samples: 8               # sample captions shown per evaluation
    java: false              # METEOR and the PTB tokenizer (a JVM start per evaluation)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

LOG_DEFAULTS = {"tensorboard": True, "wandb": None, "eval_metrics": True, "eval_images": 200, "samples": 8,
                "java": False}


class Watch:
    """A sink for logged records: TensorBoard and/or W&B; does nothing when neither is on."""

    def __init__(self, out_dir: str | Path, log: dict, examples_per_step: int, config: dict | None = None) -> None:
        self.examples_per_step = examples_per_step
        self.tb = self.wandb = None
        self._last: tuple[int, float] | None = None
        if log.get("tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # torch raises ImportError when the tensorboard package is missing
                print("blip2 train: no TensorBoard logs: pip install 'blip2[tensorboard]'", file=sys.stderr)
        if log.get("wandb"):
            try:
                import wandb
            except ModuleNotFoundError:
                raise ModuleNotFoundError("log.wandb is set but wandb is not installed: pip install 'blip2[wandb]'") from None
            self.wandb = wandb.init(project=str(log["wandb"]), dir=str(out_dir), config=config or {})

    def __call__(self, record: dict) -> None:
        step = record["step"]
        scalars = {_tag(k): float(v) for k, v in record.items()
                   if k not in ("step", "epoch", "elapsed_s") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "elapsed_s" in record:
            if self._last is not None and record["elapsed_s"] > self._last[1]:
                done = (step - self._last[0]) * self.examples_per_step
                scalars["train/examples_per_s"] = done / (record["elapsed_s"] - self._last[1])
            self._last = (step, record["elapsed_s"])
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        """rows: {"image": path, "caption": generated, "references": [...]} -> a text table and an image grid."""
        if not rows:
            return
        text = "| image | generated | reference |\n|---|---|---|\n" + "".join(
            f"| {Path(r['image']).name} | {r['caption']} | {r['references'][0] if r['references'] else ''} |\n"
            for r in rows)
        grid = image_grid([r["image"] for r in rows])
        if self.tb is not None:
            self.tb.add_text("eval/samples", text, step)
            self.tb.add_image("eval/samples", grid, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["image", "generated", "reference"],
                                data=[[wandb.Image(r["image"]), r["caption"], (r["references"] or [""])[0]] for r in rows])
            self.wandb.log({"eval/samples": table}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tag(key: str) -> str:
    """metrics.jsonl names -> TensorBoard tags: "eval_lm" -> "eval/lm", "lm" -> "train/lm"."""
    return "eval/" + key.removeprefix("eval_") if key.startswith("eval_") else "train/" + key


def image_grid(paths: list[str], size: int = 128, columns: int = 4) -> np.ndarray:
    """The images side by side, `columns` to a row: (rows * size, columns * size, 3) uint8."""
    from PIL import Image

    rows = -(-len(paths) // columns)
    grid = np.zeros((rows * size, columns * size, 3), dtype=np.uint8)
    for n, path in enumerate(paths):
        with Image.open(path) as image:
            tile = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
        r, c = divmod(n, columns)
        grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = tile
    return grid


class EvalMetrics:
    """Trainer callback: the evaluation metrics of `blip2 eval`, at every evaluation and at the end.

    Args:
        model: the model being trained (a generation model: captions / VQA; a stage-1 model: retrieval).
        eval_data: the evaluation ImageTextDataset (its records and image transform).
        tokenizer: the tokenizer folder or file (the training data's).
        settings: blip2.evaluation.predict.EvalSettings (prompt, template, limits, java).
        watch: where sample captions go.
    """

    def __init__(self, model, eval_data, tokenizer, settings, watch: Watch | None = None) -> None:
        from ..evaluation.data import EvalSet
        from ..evaluation.predict import TextCodec

        self.model, self.settings, self.watch = model, settings, watch
        self.eval_set = EvalSet.from_records(eval_data.records, "evaluation data")
        self.transform = eval_data.transform
        self.codec = TextCodec(tokenizer)
        self.generates = hasattr(model, "generate")

    def _load(self, paths: list[str]) -> torch.Tensor:
        from PIL import Image

        pixels = []
        for path in paths:
            with Image.open(path) as image:
                pixels.append(self.transform(image))
        return torch.stack(pixels)

    def _loads(self, chunks: list[list[str]]):
        return map(self._load, chunks)  # in the training process: no workers forked beside a trainer

    @torch.no_grad()
    def compute(self) -> tuple[dict[str, float], list[dict]]:
        """{"caption_CIDEr": ..., "vqa_vqa_accuracy": ..., "retrieval_i2t_r1": ...} and sample captions."""
        from ..evaluation.predict import caption_results, retrieval_results, vqa_results

        ev, s = self.eval_set, self.settings
        results, samples = {}, []
        if self.generates and "caption" in ev.tasks:
            out = caption_results(self.model, self._loads, self.codec, ev, s)
            results["caption"], samples = out["metrics"], out["predictions"][: s.samples]
        if self.generates and "vqa" in ev.tasks:
            results["vqa"] = vqa_results(self.model, self._loads, self.codec, ev, s)["metrics"]
        if not self.generates and "retrieval" in ev.tasks:
            results["retrieval"] = retrieval_results(self.model, self._loads,
                                                     lambda t: self.codec.right_padded(t, 64), ev, s)["metrics"]
        flat = {f"{task}_{name}": value for task, metrics in results.items() for name, value in metrics.items()
                if name != "n"}
        return flat, samples

    def __call__(self, trainer, record: dict) -> None:
        cfg, step = trainer.cfg, record["step"]
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            self.log(trainer, step)

    def baseline(self, trainer) -> None:
        """The metrics of the model as it starts, logged as step 0."""
        self.log(trainer, 0)

    def log(self, trainer, step: int) -> None:
        if trainer.info.is_main:
            was_training = trainer.objective.training
            trainer.objective.eval()
            try:
                metrics, samples = self.compute()
            finally:
                trainer.objective.train(was_training)
            trainer._log({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
            if self.watch is not None:
                self.watch.samples(step, samples)
        from . import distributed as dist

        dist.barrier()
