"""More ITC and ITM for the demo's retrieval model: the stage-1 Q-Former, continued on its own.

    python -m blip2.demo.retrieval_tune --out blip2/demo [--start-from DIR] [--set NAME=VALUE ...]

The recipe trains the retrieval model for 600 steps of 32 pairs beside the captioner's stage 1,
with ITG; recall@1 among 100 held-out images was 63%. This continues it with ITC and ITM only (the
shipped checkpoint, in the transformers format, has no ITG head) and twice the batch, so that each
caption meets 63 other images in the contrastive loss. It writes out/retrieval/ (replacing it only
once the new one is whole), out/retrieval_scores.json, and its section of out/REPORT.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..io import atomic_write_text
from ..retrieval import Blip2ForImageTextRetrieval
from ..train.data import Stage1Collate
from ..train.loop import Trainer
from ..train.stage1 import Blip2ForQFormerPretraining, Stage1Objective, Stage1Weights
from . import evaluate
from .instruct import MARKER
from .recipe import (Recipe, WorldPairs, apply_sets, draw_images, fill_feature_cache, idle_cores, log, tokenize_with,
                     trainer_config)
from .tokenizer import DEC_ID, PAD_ID

START, END = ("<!-- retrieval tuning: written by python -m blip2.demo.retrieval_tune -->",
              "<!-- end of retrieval tuning -->")
# What a stage-1 model has that the retrieval checkpoint leaves out: the ITG head and ITC's temperature.
NOT_SHIPPED = ("itg_head.", "temp")


@dataclass
class TuneRecipe:
    seed: int = 0
    train_images: int = 12000  # the recipe's training images: seen pairs only
    steps: int = 1500
    batch: int = 64  # in-batch negatives for ITC: 63 per caption
    lr: float = 2e-4  # a continuation: below stage 1's 5e-4
    eval_scenes: int = 200  # the recipe's held-out evaluation set; recall among the first 100 distinct
    eval_per_kind: int = 100
    retrieval_images: int = 100
    save_dtype: str = "float16"


QUICK = TuneRecipe(train_images=32, steps=2, batch=8, eval_scenes=8, eval_per_kind=2, retrieval_images=8)


def stage1_from(retrieval: Blip2ForImageTextRetrieval) -> Blip2ForQFormerPretraining:
    model = Blip2ForQFormerPretraining(retrieval.config)
    missing, unexpected = model.load_state_dict(retrieval.state_dict(), strict=False)
    lost = [k for k in missing if not k.startswith(NOT_SHIPPED)]
    if lost or unexpected:
        raise ValueError(f"the retrieval checkpoint does not match a stage-1 model: missing {lost}, unexpected {unexpected}")
    return model


def scores(model: Blip2ForImageTextRetrieval, tok, ev: evaluate.EvalSet, n: int) -> dict:
    model.eval()
    out = evaluate.itc_recall(model, tok, ev, n)
    out["itm"] = evaluate.itm_accuracy(model, tok, ev, n)
    return out


def export(model: Blip2ForQFormerPretraining, start: Path, folder: Path, dtype: str) -> None:
    """folder/ gets the tuned weights and start/'s other files (tokenizer, processor); a new folder is
    written beside it and swapped in, so an interrupted run leaves the old one whole."""
    retrieval = Blip2ForImageTextRetrieval(model.config)
    retrieval.load_state_dict({k: v for k, v in model.state_dict().items() if k in retrieval.state_dict()})
    retrieval.config.name_or_path = ""
    fresh = Path(tempfile.mkdtemp(prefix=".retrieval-", dir=folder.parent))
    old = folder.with_name(folder.name + ".old")
    try:
        fresh.chmod(0o755)  # mkdtemp's 0700 would hide the shipped model from other users
        for item in start.iterdir():
            if item.is_file() and not item.name.startswith(("model", "config")):
                shutil.copy2(item, fresh / item.name)
        retrieval.to(getattr(torch, dtype)).save_pretrained(fresh)
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        fresh.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        if old.exists() and not folder.exists():  # moved aside, the new one not in: put it back
            old.rename(folder)
        raise


def command(settings: dict) -> str:
    """The command that made the shipped model: each setting that differs from the default as `--set`."""
    default = asdict(TuneRecipe())
    sets = "".join(f" --set {k}={v}" for k, v in settings.items() if k in default and v != default[k])
    return f"python -m blip2.demo.retrieval_tune --out blip2/demo{sets}"


def report(result: dict) -> str:
    r, before, after = result["settings"], result["before"], result["after"]
    earlier = result.get("continued_from") or {}
    chain = (f" It continued {earlier['runs']} earlier run(s) of this command ({earlier['steps']} steps)." if earlier else "")
    return "\n".join([
        START,
        "## The retrieval model, tuned further",
        "",
        f"`{command(r)}` ({r['threads']} threads): {result['minutes']:.1f} minutes. "
        f"It continues the recipe's stage-1 model (`retrieval/`) with ITC and ITM: {r['steps']} steps of {r['batch']} "
        f"pairs at lr {r['lr']:g} on the recipe's {r['train_images']} training images (seen pairs).{chain} "
        f"The same {before['n']} held-out images with distinct captions as the recipe's table above:",
        "",
        "| retrieval model | ITC text-to-image R@1 | ITC image-to-text R@1 | ITM accuracy |",
        "|---|---|---|---|",
        f"| before | {before['t2i_r1']:.1%} | {before['i2t_r1']:.1%} | {before['itm']:.1%} |",
        f"| after (shipped) | {after['t2i_r1']:.1%} | {after['i2t_r1']:.1%} | {after['itm']:.1%} |",
        "",
        f"Losses over the last tenth of the steps: ITC {result['losses']['itc']:.3f}, ITM {result['losses']['itm']:.3f}.",
        END,
    ])


def write_report(out: Path, text: str) -> None:
    """Puts this section in out/REPORT.md in place of the last one, else before the instruct section, else at the end."""
    path = out / "REPORT.md"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if START in old and END in old:
        new = old.split(START)[0] + text + old.split(END, 1)[1]
    else:
        head, sep, tail = old.partition(MARKER)
        new = (head.rstrip("\n") + "\n\n" if head.strip() else "") + text + "\n\n" + sep + tail
    atomic_write_text(path, new.rstrip("\n") + "\n")


def run(r: TuneRecipe, out: Path, start: Path, work: Path, threads: int) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(r.seed)
    from tokenizers import Tokenizer as FastTokenizer

    if not (start / "config.json").is_file():
        raise FileNotFoundError(f"{start} holds no retrieval model (no config.json)")
    tok = FastTokenizer.from_file(str(start / "tokenizer.json"))
    retrieval = Blip2ForImageTextRetrieval.from_pretrained(start, torch_dtype=torch.float32)
    base = Recipe(seed=r.seed, train_images=r.train_images)
    ev = evaluate.build_eval_set("heldout", r.eval_scenes, r.eval_per_kind, base.image_size, r.seed)
    before = scores(retrieval, tok, ev, r.retrieval_images)
    log(f"before: {before}")
    model = stage1_from(retrieval)
    data = draw_images(base, "train", r.train_images)
    cache = fill_feature_cache(model.vision_model, data)
    objective = Stage1Objective(model, Stage1Weights(itc=1.0, itm=1.0, itg=0.0), dec_token_id=DEC_ID, seed=r.seed,
                                feature_cache=cache)
    collate = Stage1Collate(tokenize_with(tok), pad_id=PAD_ID, max_len=base.text_len)
    log(f"retrieval tuning (ITC, ITM): {r.steps} steps of {r.batch} image-caption pairs at lr {r.lr:g}")
    history = Trainer(objective, WorldPairs(data, r.seed + 5), collate,
                      trainer_config(base, work, "retrieval-tune", r.steps, r.batch, r.lr)).fit()
    tail = history[-max(1, r.steps // 10):]
    losses = {k: sum(h[k] for h in tail) / len(tail) for k in ("itc", "itm")}
    model.eval()
    export(model, start, out / "retrieval", r.save_dtype)
    after = scores(Blip2ForImageTextRetrieval.from_pretrained(out / "retrieval", torch_dtype=torch.float32), tok, ev,
                   r.retrieval_images)  # what ships, from its files
    log(f"after: {after}")
    earlier = earlier_runs(start)
    result = {"settings": {**asdict(r), "threads": threads}, "before": before, "after": after, "losses": losses,
              "minutes": (time.perf_counter() - t0) / 60, **({"continued_from": earlier} if earlier else {})}
    atomic_write_text(out / "retrieval_scores.json", json.dumps(result, indent=1) + "\n")
    write_report(out, report(result))
    return result


def earlier_runs(start: Path) -> dict | None:
    """Runs of this command that made `start`, from the retrieval_scores.json beside it; None if none."""
    found = start.parent / "retrieval_scores.json"
    if not found.is_file():
        return None
    earlier = json.loads(found.read_text(encoding="utf-8"))
    before = earlier.get("continued_from") or {"runs": 0, "steps": 0}
    return {"runs": before["runs"] + 1, "steps": before["steps"] + earlier["settings"]["steps"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2.demo.retrieval_tune", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="where retrieval/, retrieval_scores.json and REPORT.md go")
    parser.add_argument("--start-from", type=Path, default=None, help="the retrieval model to tune (default: OUT/retrieval)")
    parser.add_argument("--quick", action="store_true", help="the short CI version")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the idle cores)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    r = apply_sets(QUICK if args.quick else TuneRecipe(), args.set)
    threads = args.threads or idle_cores()
    torch.set_num_threads(threads)
    start = args.start_from or args.out / "retrieval"
    with tempfile.TemporaryDirectory() as scratch:
        try:
            result = run(r, args.out, start, args.work or Path(scratch), threads)
        except (FileNotFoundError, ValueError) as e:  # no model there, or not a retrieval model: a message, no trace
            raise SystemExit(f"retrieval_tune: {e}") from None
    print(json.dumps({k: result[k] for k in ("before", "after", "minutes")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
