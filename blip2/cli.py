"""The `blip2` command: caption, ask, match, embed, serve, train, eval, convert.

Each subcommand lives beside the code it drives and registers itself through an
`add_*_parser(subparsers)` function, so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import sys


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
