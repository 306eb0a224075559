"""The training loop: AdamW, warm-up then cosine, clipping, accumulation, bf16 autocast,
progress bar, JSONL metrics, evaluation and atomic checkpoints with exact resume.

The loop drives any objective module whose forward(batch, step) returns a dict of scalar
losses with a "loss" to minimise. Exact resume: a checkpoint holds the trainable weights,
the optimiser, the schedule, every process's random state and the position in the data, so
a run killed and resumed takes the same steps as one never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import CheckpointError, safe_torch_load
from ..io import atomic_write, atomic_write_text, remove_stale_temps
from ..modeling.inference import fit_layouts
from . import distributed as dist
from .data import ShardedBatches

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
METRICS = "metrics.jsonl"


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient: the run stops with the weights of the step before."""


@dataclass
class TrainConfig:
    out_dir: str = "runs/blip2"
    max_steps: int = 1000  # optimiser steps
    batch_size: int = 8  # per process and micro-step
    accumulation_steps: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5  # where the cosine ends
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    bf16: bool = False
    eval_every: int = 0  # steps; 0 never
    eval_batches: int = 0  # 0: the whole eval set
    save_every: int = 0  # steps; 0 only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    resume: bool = True  # continue from out_dir's latest checkpoint when there is one
    # Shard the objective's frozen modules (its `shardable()`: stage 2's language model) across
    # processes with torch's fully_shard instead of holding a copy in each; the trainable parts
    # stay replicated and their gradients are averaged as DDP would.
    fsdp_frozen: bool = False

    def __post_init__(self) -> None:
        """Every numeric setting in range (NaN and infinities refused), named as the config file names it."""
        at_least = {"max_steps": 1, "batch_size": 1, "accumulation_steps": 1, "keep_checkpoints": 1,
                    "warmup_steps": 0, "eval_every": 0, "eval_batches": 0, "save_every": 0, "num_workers": 0,
                    "seed": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"train.{name} must be an integer >= {low}, got {value!r}")
        for name, low in {"lr": 0.0, "min_lr": 0.0, "weight_decay": 0.0, "grad_clip": 0.0}.items():
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value < low:
                raise ValueError(f"train.{name} must be a finite number >= {low:g}, got {value!r}")
        if self.lr == 0:
            raise ValueError("train.lr must be > 0")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = betas

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """LR factor: linear up to 1 over `warmup` steps, then cosine down to `floor`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms or the temperature."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rng_state() -> dict:
    """Every random state this process draws from, in types torch.load(weights_only=True) reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_device(batch, device: torch.device):
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    """Trains `objective` on `train_data`; see the module docstring.

    Args:
        objective: forward(batch, step) -> {"loss": ..., other named losses}; `step` numbers the
            micro-batch (unique, the same in a resumed run), evaluation batches count down from -1.
        collate: list of dataset items -> batch dict.
        info: this process's place (from `distributed.setup()`); by default the process group
            already joined, if any, on the device the objective's parameters are on.
        callbacks: called as f(trainer, record) after every logged step.
        sinks: called as f(record) with every record logged (steps and evaluations), on the main process.
    """

    def __init__(self, objective: nn.Module, train_data: Dataset, collate: Callable, config: TrainConfig,
                 eval_data: Dataset | None = None, info: dist.DistInfo | None = None,
                 callbacks: list[Callable] | None = None, sinks: list[Callable] | None = None) -> None:
        self.cfg = config
        self.info = info or dist.current(next(objective.parameters()).device)
        self.objective = objective.to(self.info.device)
        self._frozen_sum = self._checksum_frozen()  # before any sharding
        self.module = self._wrap(self.objective)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        half = sorted({str(p.dtype) for p in self.params if p.dtype in (torch.float16, torch.bfloat16)})
        if half:
            # AdamW on half-precision weights loses small updates and overflows (NaN within steps).
            raise ValueError(f"the trainable parameters are {', '.join(half)}; load the model in float32 "
                             "(from_pretrained(..., torch_dtype=torch.float32)) and set bf16: true for bf16 autocast")
        self.optimizer = torch.optim.AdamW(param_groups(self.objective, config.weight_decay), lr=config.lr,
                                           betas=config.betas)
        floor = config.min_lr / config.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, config.warmup_steps, config.max_steps, floor)
        )
        self.train_data, self.eval_data, self.collate = train_data, eval_data, collate
        self.sampler = ShardedBatches(len(train_data), config.batch_size, self.info.rank, self.info.world_size,
                                      config.seed)
        self.callbacks = callbacks or []
        self.sinks = sinks or []
        self.out = Path(config.out_dir)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: list[dict] = []  # what was logged, this process's view

    def _wrap(self, objective: nn.Module) -> nn.Module:
        if self.info.world_size == 1:
            return objective
        if self.cfg.fsdp_frozen:
            shard_frozen(objective, self.info)
            return objective  # gradients are averaged by _average_gradients
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.info.device.index] if self.info.device.type == "cuda" else None
        return DDP(objective, device_ids=ids)

    # ---------------------------------------------------------------- data
    def _loader(self, dataset: Dataset, sampler, seed: int) -> DataLoader:
        # Its own generator: creating a loader must not draw from the global random state,
        # or a resumed run (which creates one mid-epoch) would drift from an uninterrupted one.
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.cfg.num_workers,
                          generator=torch.Generator().manual_seed(seed), pin_memory=self.info.device.type == "cuda")

    def _batches(self):
        """Training batches forever, epoch after epoch, from the current data position."""
        while True:
            self.sampler.set_position(self.epoch, self.batch_in_epoch)
            for batch in self._loader(self.train_data, self.sampler, self.cfg.seed + self.epoch):
                self.batch_in_epoch += 1
                yield to_device(batch, self.info.device)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # ---------------------------------------------------------------- training
    def _autocast(self):
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def fit(self) -> list[dict]:
        """Trains up to max_steps (resuming first if a checkpoint exists); returns the logged records."""
        cfg = self.cfg
        if cfg.resume:
            self.resume()
        self.objective.train()
        batches = self._batches()
        bar = _progress(cfg.max_steps, self.step, cfg.progress and self.info.is_main)
        start = time.perf_counter()
        while self.step < cfg.max_steps:
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
            parts = self._optimiser_step(batches)
            self.step += 1
            record = {"step": self.step, "epoch": self.epoch, "lr": lr, **parts,
                      "elapsed_s": round(time.perf_counter() - start, 3)}
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
            for callback in self.callbacks:
                callback(self, record)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.eval_data is not None:
                self.evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
        bar.close()
        if not cfg.save_every or self.step % cfg.save_every:
            self.save_checkpoint()
        return self.history

    def _optimiser_step(self, batches) -> dict[str, float]:
        """One optimiser step over `accumulation_steps` micro-batches; returns the mean losses over processes."""
        accum = self.cfg.accumulation_steps
        totals: dict[str, Tensor] = {}
        for micro in range(accum):
            batch = next(batches)
            last = micro == accum - 1
            # Gradients are averaged across processes once, on the last micro-batch.
            sync = contextlib.nullcontext() if last or self.module is self.objective else self.module.no_sync()
            with sync:
                with self._autocast():
                    # A number of its own for each micro-batch (ITM draws its negatives from it).
                    losses = self.module(batch, self.step * accum + micro)
                (losses["loss"] / accum).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / accum
        if self.cfg.fsdp_frozen and self.info.world_size > 1:
            _average_gradients(self.params)
        # The norm over every process's gradients (DDP has averaged them), clipped when asked.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or math.inf)
        out = _mean_over_processes(totals)  # the same numbers on every process, so all stop together
        self._check_finite(out["loss"], grad_norm.item())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.grad_clip:
            out["grad_norm"] = grad_norm.item()
        return out

    def _check_finite(self, loss: float, grad_norm: float) -> None:
        """Stops before a NaN or infinite loss or gradient reaches the weights (and any checkpoint)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
        kept = self.latest_checkpoint()
        raise NonFiniteError(
            f"step {self.step + 1}: {what}; training stopped before updating the weights. "
            + (f"The last good checkpoint is {kept}. " if kept else "No checkpoint was written. ")
            + "Lower lr, keep grad_clip on, and train in float32 (or bf16: true)."
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean losses over the eval set (or its first eval_batches), all processes together."""
        self.objective.eval()
        with self._autocast():
            fit_layouts(self.objective)  # prepacked weights while evaluating; train() below gives them back
        sampler = ShardedBatches(len(self.eval_data), self.cfg.batch_size, self.info.rank, self.info.world_size,
                                 shuffle=False)
        totals: dict[str, Tensor] = {}
        n = 0
        for i, batch in enumerate(self._loader(self.eval_data, sampler, 0)):
            if self.cfg.eval_batches and i >= self.cfg.eval_batches:
                break
            with self._autocast():
                losses = self.objective(to_device(batch, self.info.device), -(i + 1))
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.float()
            n += 1
        self.objective.train()
        means = _mean_over_processes({k: v / max(n, 1) for k, v in totals.items()})
        record = {"step": self.step, **{f"eval_{k}": v for k, v in means.items()}}
        self._log(record)
        return means

    # ---------------------------------------------------------------- metrics
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            for sink in self.sinks:
                sink(record)

    # ---------------------------------------------------------------- checkpoints
    def _trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.objective.named_parameters() if p.requires_grad}

    def _checksum_frozen(self) -> float:
        """A fingerprint of the frozen weights, which checkpoints do not hold."""
        with torch.no_grad():
            return float(sum(p.double().abs().sum().item() for p in self.objective.parameters() if not p.requires_grad))

    def latest_checkpoint(self) -> Path | None:
        """The newest step-N.pt on disk (None before the first save)."""
        found = sorted((self.out / CHECKPOINTS).glob("step-*.pt"))
        return found[-1] if found else None

    def save_checkpoint(self) -> Path | None:
        """Writes checkpoints/step-N.pt and then latest.json, each atomically; keeps the newest few."""
        rngs = dist.gather_objects(rng_state())
        path = None
        if self.info.is_main:
            state = {
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "world_size": self.info.world_size, "model": self._trainable_state(),
                "frozen_checksum": self._frozen_sum, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rngs, "config": asdict(self.cfg),
            }
            folder = self.out / CHECKPOINTS
            path = folder / f"step-{self.step:08d}.pt"
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            atomic_write_text(folder / LATEST, json.dumps({"step": self.step, "file": path.name}) + "\n")
            for old in sorted(folder.glob("step-*.pt"))[: -self.cfg.keep_checkpoints]:
                old.unlink(missing_ok=True)
        dist.barrier()
        return path

    def resume(self) -> bool:
        """Loads out_dir's latest readable checkpoint, if any; True when it did.

        A damaged newest checkpoint (a save killed mid-write on a file system without atomic
        rename, a disk error) is reported by name and the one before it is used instead.
        """
        folder = self.out / CHECKPOINTS
        if self.info.is_main:
            remove_stale_temps(folder)
        candidates = self._checkpoint_candidates(folder)
        if not candidates:
            return False
        failures = []
        for path in candidates:
            try:
                state = read_checkpoint(path)
            except CheckpointError as err:
                failures.append(str(err))
                if self.info.is_main:
                    print(f"blip2 train: {err}; trying an older checkpoint", file=sys.stderr)
                continue
            self._load_state(path, state)
            return True
        raise CheckpointError("no checkpoint in " + str(folder) + " can be read:\n  " + "\n  ".join(failures)
                              + "\nmove them away (or pass --no-resume) to start afresh")

    def _checkpoint_candidates(self, folder: Path) -> list[Path]:
        """The file latest.json names first (when it is readable), then every step-N.pt, newest first."""
        found = sorted(folder.glob("step-*.pt"), reverse=True)
        latest = folder / LATEST
        if latest.is_file():
            try:
                named = folder / json.loads(latest.read_text(encoding="utf-8"))["file"]
                found = [named] + [p for p in found if p != named]
            except (ValueError, KeyError, TypeError, OSError) as err:
                if self.info.is_main:
                    print(f"blip2 train: {latest} is damaged ({err}); using the newest readable step-N.pt",
                          file=sys.stderr)
        return found

    def _load_state(self, path: Path, state: dict) -> None:
        if state["world_size"] != self.info.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} processes; resume with as many "
                             f"(this run has {self.info.world_size}) for an exact continuation")
        if not math.isclose(state["frozen_checksum"], self._frozen_sum, rel_tol=1e-9):
            raise ValueError(f"{path}: the frozen weights differ from the checkpointed run's; "
                             "build the model the same way (same init_from, same seed)")
        missing, unexpected = self.objective.load_state_dict(state["model"], strict=False)
        trainable = {n for n, p in self.objective.named_parameters() if p.requires_grad}
        if unexpected or trainable - set(state["model"]):
            raise ValueError(f"{path} does not fit the model: unexpected {unexpected}, "
                             f"missing {sorted(trainable - set(state['model']))[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        set_rng_state(state["rng"][self.info.rank])
        if self.info.is_main:
            self._drop_metrics_after(self.step)
        dist.barrier()

    def _drop_metrics_after(self, step: int) -> None:
        """Lines a killed run logged after its last checkpoint would otherwise be logged twice; a line
        torn by the kill (not JSON) goes too."""
        path = self.out / METRICS
        if path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            kept = [line for line in lines if _logged_step(line) is not None and _logged_step(line) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint, or CheckpointError naming the file (torch's own message would suggest
    weights_only=False, which would run whatever code a damaged or foreign file holds)."""
    state = safe_torch_load(path, "training checkpoint")
    needed = ("step", "epoch", "batch_in_epoch", "world_size", "model", "optimizer", "scheduler", "rng")
    missing = [k for k in needed if k not in state] if isinstance(state, dict) else list(needed)
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (it lacks {missing})")
    return state


def shard_frozen(objective: nn.Module, info) -> None:
    """fully_shard each block (layer) of the objective's frozen modules: every process holds
    1/world of their weights, gathered a block at a time for forward and backward. What lies
    outside the blocks (embeddings, final norm, output head: called outside the module's own
    forward, and tied to each other) stays whole in every process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not hasattr(objective, "shardable"):
        raise ValueError(f"fsdp_frozen: {type(objective).__name__} names no frozen modules to shard (shardable())")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for module, blocks in objective.shardable():
        if any(p.requires_grad for p in module.parameters()):
            raise ValueError("fsdp_frozen shards frozen modules only; this one has trainable parameters "
                             "(a LoRA on the language model?)")
        for block in blocks:
            fully_shard(block, mesh=mesh)


@torch.no_grad()
def unshard_frozen(objective: nn.Module) -> None:
    """Makes the sharded frozen weights whole again in every process (call in all of them, e.g.
    before saving the model)."""
    from torch.distributed.tensor import DTensor

    for module in objective.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                module._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=False)


@torch.no_grad()
def _average_gradients(params: list[Tensor]) -> None:
    """The replicated trainable parameters' gradients, averaged over processes (DDP's rule)."""
    import torch.distributed as tdist

    for p in params:
        if p.grad is not None:  # the same graph on every process: the same parameters have gradients
            tdist.all_reduce(p.grad)
            p.grad /= tdist.get_world_size()


def _mean_over_processes(values: dict[str, Tensor]) -> dict[str, float]:
    names = sorted(values)
    if not names:
        return {}
    stacked = dist.all_mean(torch.stack([torch.as_tensor(values[n]).float().reshape(()) for n in names]))
    return {n: v.item() for n, v in zip(names, stacked.cpu())}


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)
