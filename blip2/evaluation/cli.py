"""`blip2 eval DATA`: score a model on captions, questions or retrieval; print a table, write JSON.

    blip2 eval val.jsonl                                  # the shipped demo model
    blip2 eval captions_val2014.json --images val2014/ --model Salesforce/blip2-opt-2.7b --num-beams 5
    blip2 eval val.jsonl --task retrieval --model ./runs/s1/final
    blip2 eval v2_mscoco_val2014_annotations.json --questions v2_OpenEnded_mscoco_val2014_questions.json \
        --images val2014/ --model Salesforce/blip2-flan-t5-xl --num-beams 5 --length-penalty -1

The tasks default to all that the data holds (captions: caption metrics and retrieval; questions:
VQA accuracy) and the model can do (a checkpoint with a language model generates, one with the
ITC/ITM heads retrieves).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import int_option, template_option

TASKS = ("caption", "vqa", "retrieval")


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="caption metrics, VQA accuracy and retrieval recall on a dataset",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a .jsonl or folder like training data, a .json list of records, "
                                "or COCO caption annotations")
    p.add_argument("--task", action="append", choices=TASKS, help="what to score (repeatable; default: all "
                                                                  "the data and model allow)")
    p.add_argument("--images", default=None, help="folder the .json file's image names are relative to")
    p.add_argument("--questions", default=None, help="VQAv2: the questions file beside the annotation file DATA")
    p.add_argument("--out", default="eval.json", help="JSON file for metrics and predictions (default eval.json)")
    p.add_argument("--prompt", default=None, help="text captions continue (default: none)")
    p.add_argument("--template", default=None, type=template_option,
                   help="VQA prompt with {} for the question (default: the model family's)")
    p.add_argument("--max-images", type=int_option(0), default=0, help="score only the first N images / questions")
    p.add_argument("--no-java", action="store_true", help="no Java: Python tokenizer, no METEOR or SPICE")
    from ..commands import _common, _decode_option

    _common(p, generation=True, formats=("text",))  # --model, --device, --dtype, --batch-size, generation
    _decode_option(p)
    p.set_defaults(run=run_eval)


def _has_language_model(folder: Path) -> bool:
    from .. import checkpoint as ckpt

    return any(k.startswith("language_model.") for k in ckpt.read_state_dict(ckpt.find_weights(folder)))


def _model_dir(args, retrieval: bool) -> Path:
    from ..commands import default_dir
    from ..hf_compat import checkpoint_dir

    return checkpoint_dir(args.model) if args.model else Path(default_dir(retrieval, task="blip2"))


def _tasks(args, ev) -> list[str]:
    possible = ev.tasks
    asked = args.task or possible
    missing = [t for t in asked if t not in possible]
    if missing:
        have = "captions" if "caption" in possible else "questions"
        raise SystemExit(f"blip2: {ev.source} has no {'questions' if 'vqa' in missing else 'captions'} "
                         f"for --task {missing[0]} (it has {have})")
    if args.task or not args.model:
        return asked
    generates = _has_language_model(_model_dir(args, retrieval=False))
    return [t for t in asked if (t != "retrieval") == generates]


def run_eval(args) -> int:
    import torch

    from ..commands import generation_kwargs, load
    from .data import read_eval_set
    from .predict import EvalSettings, TextCodec, caption_results, retrieval_results, vqa_results
    from ..families import question_template

    try:
        ev = read_eval_set(args.data, args.images, args.questions)
    except (OSError, ValueError) as err:
        raise SystemExit(f"blip2: {err}") from None
    tasks = _tasks(args, ev)
    if not tasks:
        raise SystemExit(f"blip2: nothing to score: {args.model} cannot do what {args.data} asks ({ev.tasks})")
    gen = generation_kwargs(args)
    results: dict = {"data": str(args.data), "model": args.model or "demo", "metrics": {}, "predictions": {}}
    for retrieval in (False, True):
        mine = [t for t in tasks if (t == "retrieval") == retrieval]
        if not mine:
            continue
        if not retrieval and not _has_language_model(_model_dir(args, retrieval=False)):
            raise SystemExit(f"blip2: {_model_dir(args, False)}: the checkpoint has no language model (a retrieval "
                             "or stage-1 model): it cannot caption or answer; try --task retrieval")
        m = load(args, retrieval=retrieval, task="blip2")
        load_images = lambda chunks: _pixel_batches(m, args, chunks)  # noqa: E731
        codec = TextCodec(_model_dir(args, retrieval))
        settings = EvalSettings(
            prompt=args.prompt or "", batch_size=args.batch_size, max_images=args.max_images,
            question_template=args.template or question_template(m.model.config),
            caption_kwargs=gen, vqa_kwargs={**gen, "max_new_tokens": args.max_new_tokens or 10},
            java=False if args.no_java else None,
        )
        with torch.inference_mode():
            for task in mine:
                if task == "caption":
                    out = caption_results(m.model, load_images, codec, ev, settings)
                elif task == "vqa":
                    out = vqa_results(m.model, load_images, codec, ev, settings)
                else:
                    out = retrieval_results(m.model, load_images, lambda t: codec.right_padded(t, 64), ev, settings)
                results["metrics"][task] = out["metrics"]
                results["predictions"][task] = out["predictions"]
    print(format_table(results["metrics"]))
    from ..io import atomic_write_text

    from ..commands import printable_values

    # file names that are not UTF-8 (kept by Python as lone surrogates) must not fail the write at the end
    atomic_write_text(args.out, json.dumps(printable_values(results), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _pixel_batches(m, args, chunks: list[list[str]]):
    """(B, 3, H, W) per chunk of image paths, decoded ahead as the inference commands do; an image that
    cannot be read stops the evaluation (its scores would be wrong without it)."""
    from ..commands import image_batches

    stop = _StopAtFirst()
    items = [(path, path) for chunk in chunks for path in chunk]
    args = argparse.Namespace(**{**vars(args), "batch_size": len(chunks[0]) if chunks else 1})
    for _, pixels in image_batches(items, args, m, stop, _NoBar()):
        yield pixels


class _StopAtFirst:
    def report(self, name: str, message: str) -> None:
        raise SystemExit(f"blip2: {name}: {message}")


class _NoBar:
    def update(self, n: int) -> None:
        pass


def format_table(metrics: dict[str, dict]) -> str:
    """task | metric | value, one row per metric."""
    rows = [(task, name, f"{value:.4f}" if isinstance(value, float) else str(value))
            for task, values in metrics.items() for name, value in values.items()]
    widths = [max(len(r[i]) for r in rows + [("task", "metric", "value")]) for i in range(3)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(("task", "metric", "value")), line(tuple("-" * w for w in widths)), *map(line, rows)])
