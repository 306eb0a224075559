"""The `blip2` command: caption, ask, match, embed, serve, train, eval, convert.

Each subcommand lives beside the code it drives and registers itself through an
`add_*_parser(subparsers)` function, so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import math
import sys


# ---------------------------------------------------------------- option types
# argparse calls these on the option's text; an ArgumentTypeError becomes "argument --x: message", exit 2.
def int_option(minimum: int | None = None, maximum: int | None = None):
    """An integer option in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        _check_range(value, minimum, maximum)
        return value

    parse.__name__ = "integer"
    return parse


def float_option(minimum: float | None = None, maximum: float | None = None, above: float | None = None):
    """A finite number in [minimum, maximum] (and > `above` when given); NaN and infinities are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be greater than {above:g}, got {text}")
        _check_range(value, minimum, maximum)
        return value

    parse.__name__ = "number"
    return parse


def _check_range(value, minimum, maximum) -> None:
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")


def template_option(text: str) -> str:
    """A prompt template with exactly one "{}" where the question goes (other braces are text)."""
    if text.count("{}") != 1:
        raise argparse.ArgumentTypeError(f"must contain {{}} exactly once, where the question goes; got {text!r}")
    return text


def device_option(text: str):
    """A torch device this build and machine can use (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({str(err).splitlines()[0]})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this torch build or machine has no CUDA device; use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: there are only {count} CUDA device(s) (0..{count - 1})")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available in this torch build or machine; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(0, device=device)
        except (RuntimeError, ValueError) as err:
            raise argparse.ArgumentTypeError(f"{text!r}: cannot use this device ({str(err).splitlines()[0]})") from None
    return str(device)


def _registrars():
    """(module, function) pairs; a module that is missing is simply not offered."""
    return [
        ("blip2.commands", "add_inference_parsers"),
        ("blip2.train.cli", "add_train_parser"),
        ("blip2.evaluation.cli", "add_eval_parser"),
        ("blip2.server.cli", "add_serve_parser"),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2", description="BLIP-2: caption images, answer questions, match text, train the Q-Former."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    for module_name, func in _registrars():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # that part of the package is not installed / not built yet
            raise
        getattr(module, func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
