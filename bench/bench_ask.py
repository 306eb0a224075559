"""`blip2 ask` on one image after the model is loaded: wall time of what the command runs per
image (read and process the image, tokenise the question for the LM and the Q-Former, generate,
decode), with the shipped instruction-aware demo model by default.

    python bench/bench_ask.py [--model DIR] [--repeats 20] [--dtype float32]

Prints the median and the slowest of the repeats and the load average.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from contextlib import redirect_stdout
from pathlib import Path

from blip2.commands import load
from blip2.demo import EXAMPLES_DIR


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the shipped demo model `blip2 ask` uses")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--question", default="what colour is the square?")
    args = p.parse_args()
    from blip2.cli import build_parser

    image = str(sorted(EXAMPLES_DIR.glob("*.png"))[0])
    argv = ["ask", image, args.question, "--dtype", args.dtype, "--device", "cpu", "--no-progress"]
    if args.model:
        argv += ["--model", args.model]
    parsed = build_parser().parse_args(argv)
    m = load(parsed, retrieval=False, task="answer")
    # the command's own path after loading: `_generate_over` with the loaded model reused
    import blip2.commands as commands

    commands.load = lambda *a, **k: m  # noqa: E731 - the model is loaded once, as in a session
    times, answers = [], []
    for _ in range(args.repeats + 1):  # the first is a warm-up (prepacked layouts)
        buffer = io.StringIO()
        start = time.perf_counter()
        with redirect_stdout(buffer):
            commands.run_ask(build_parser().parse_args(argv))
        times.append(time.perf_counter() - start)
        answers.append(buffer.getvalue().strip().split(": ", 1)[-1])  # the answer, not the path
    times = times[1:]
    print(json.dumps({"model": args.model or "shipped default", "image": Path(image).name, "question": args.question,
                      "answer": answers[-1], "median_s": round(statistics.median(times), 4),
                      "max_s": round(max(times), 4), "repeats": args.repeats,
                      "load_average": [round(v, 2) for v in os.getloadavg()]}))


if __name__ == "__main__":
    main()
