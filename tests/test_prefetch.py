"""Images decoded ahead in worker processes (blip2.prefetch): the same pixels, names and errors as
decoding in the model's process, in order, with bounded read-ahead; the commands use it by default."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip2.bulk import read_rows
from blip2.cli import main
from blip2.demo import EXAMPLES_DIR
from blip2.prefetch import AHEAD_PER_WORKER, decoded_chunks
from blip2.processing import BlipImageProcessor

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))


def items(tmp_path) -> list:
    """Every kind of source, readable or not: paths, bytes, PIL images, a truncated file, a missing path."""
    good = [(f"path{n}", str(p)) for n, p in enumerate(EXAMPLES)]
    data = [(f"bytes{n}", p.read_bytes()) for n, p in enumerate(EXAMPLES)]
    pil = [(f"pil{n}", Image.open(p).convert("RGB")) for n, p in enumerate(EXAMPLES[:2])]
    bad = [("truncated", EXAMPLES[0].read_bytes()[:150]), ("missing", str(tmp_path / "nope.png")),
           ("text", b"not an image")]
    mixed = good + bad[:1] + data + bad[1:] + pil
    return mixed


def chunks_of(seq: list, size: int) -> list[list]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def flatten(decoded) -> tuple[list, list, list, list]:
    sizes, names, pixels, errors = [], [], [], []
    for d in decoded:
        sizes.append(d.size)
        names += d.names
        pixels += d.pixels
        errors += d.errors
    return sizes, names, pixels, errors


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_what_the_main_process_gives_in_order(tmp_path, workers):
    processor = BlipImageProcessor(size={"height": 40, "width": 40})
    chunks = chunks_of(items(tmp_path), 3)
    here = flatten(decoded_chunks(chunks, processor, 0))
    ahead = flatten(decoded_chunks(chunks, processor, workers))
    assert here[0] == ahead[0] == [len(c) for c in chunks]
    assert here[1] == ahead[1] and len(here[1]) == len(EXAMPLES) * 2 + 2
    assert [e[0] for e in here[3]] == [e[0] for e in ahead[3]] == ["truncated", "missing", "text"]
    assert here[3] == ahead[3]
    for a, b in zip(here[2], ahead[2]):
        assert a.dtype == b.dtype == np.float32 and a.shape == (3, 40, 40)
        np.testing.assert_array_equal(a, b)


def test_read_ahead_is_bounded(tmp_path):
    """A long stream is pulled at most AHEAD_PER_WORKER chunks per worker ahead of the consumer."""
    processor = BlipImageProcessor(size={"height": 16, "width": 16})
    source = EXAMPLES[0].read_bytes()
    pulled = []

    def stream():
        for n in range(40):
            pulled.append(n)
            yield [(n, source)]

    for consumed, decoded in enumerate(decoded_chunks(stream(), processor, 1), start=1):
        assert decoded.names == [consumed - 1]
        assert len(pulled) <= consumed + AHEAD_PER_WORKER, (consumed, len(pulled))
    assert len(pulled) == 40


class OpenedFile:
    """A file-like source that cannot be sent to another process: decoded in this one instead."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)
        self.lock = __import__("threading").Lock()  # unpicklable, as an open file is

    def read(self, *args):
        return self.data.read(*args)


def test_a_source_that_cannot_reach_a_worker_is_decoded_here():
    processor = BlipImageProcessor(size={"height": 16, "width": 16})
    data = EXAMPLES[1].read_bytes()
    chunks = [[("plain", data)], [("opened", OpenedFile(data))], [("after", data)]]
    _, names, pixels, errors = flatten(decoded_chunks(chunks, processor, 1))
    assert names == ["plain", "opened", "after"] and errors == []
    np.testing.assert_array_equal(pixels[0], pixels[1])


class DiesInWorker:
    """Reading it kills the process it is read in, unless that is the test's own process."""

    def __init__(self) -> None:
        self.parent = os.getpid()

    def read(self, *args):
        if os.getpid() != self.parent:
            os._exit(3)
        raise OSError("read in the parent")


def test_a_dead_worker_is_a_clear_error_not_a_hang():
    processor = BlipImageProcessor(size={"height": 16, "width": 16})
    with pytest.raises(SystemExit, match="worker process died.*--num-workers 0"):
        list(decoded_chunks([[("boom", DiesInWorker())], [("next", EXAMPLES[0].read_bytes())]], processor, 1))


@pytest.mark.parametrize("command", ["caption", "embed"])
def test_commands_give_the_same_rows_with_and_without_workers(capfd, tmp_path, command):
    # capfd: a library that prints from a forked child writes to the file descriptors, past sys.stdout
    folder = tmp_path / "images"
    folder.mkdir()
    for n, p in enumerate(EXAMPLES * 2):
        (folder / f"{n:02d}.png").write_bytes(p.read_bytes())
    (folder / "99.png").write_bytes(b"broken")
    common = [command, str(folder), "--batch-size", "3", "--no-progress", "--format", "jsonl"]
    common += ["--max-new-tokens", "4"] if command == "caption" else []
    written, printed = {}, {}
    for workers in ("0", "1"):
        out = tmp_path / f"out{workers}"
        assert main([*common, "--output", str(out), "--num-workers", workers]) == 1
        assert "1 sample(s) could not be read" in capfd.readouterr().err
        written[workers] = read_rows(out / "images.jsonl")
        assert main([*common, "--num-workers", workers]) == 1  # printed, not written
        shown = capfd.readouterr()
        assert "99.png: not a readable image" in shown.err and "huggingface/tokenizers" not in shown.out + shown.err
        printed[workers] = shown.out.splitlines()  # JSON lines only
    assert written["0"] == written["1"] and len(written["0"]) == len(EXAMPLES) * 2 + 1
    assert [Path(r["key"]).name for r in written["0"] if "error" in r] == ["99.png"]
    assert printed["0"] == printed["1"] and len(printed["0"]) == len(EXAMPLES) * 2


def test_num_workers_must_not_be_negative(capsys):
    with pytest.raises(SystemExit):
        main(["caption", str(EXAMPLES[0]), "--num-workers", "-1"])
    assert "--num-workers" in capsys.readouterr().err


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_a_killed_run_leaves_no_worker_behind(tmp_path):
    """SIGKILL of the command (no cleanup runs) must not leave its decoding worker waiting for ever."""
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "images"
    folder.mkdir()
    for n in range(400):
        (folder / f"{n:03d}.png").write_bytes(EXAMPLES[n % len(EXAMPLES)].read_bytes())
    command = subprocess.Popen([sys.executable, "-m", "blip2.cli", "caption", str(folder), "--output", str(tmp_path / "out"),
                                "--batch-size", "2", "--no-progress", "--num-workers", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (workers := children_of(command.pid)) and time.monotonic() < deadline and command.poll() is None:
        time.sleep(0.05)
    assert workers, "the command never started its decoding worker"
    command.send_signal(signal.SIGKILL)
    command.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [w for w in workers if Path(f"/proc/{w}/stat").exists()
             and Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"worker(s) {alive} outlived the killed command"


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_a_plan_sets_torch_threads_while_it_runs_and_puts_them_back(workers):
    import torch

    from blip2.prefetch import Plan, fixed_plan, planned_chunks

    processor = BlipImageProcessor(size={"height": 16, "width": 16})
    chunks = [[(n, EXAMPLES[0].read_bytes())] for n in range(5)]
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        plan = fixed_plan(workers, on_cpu=True)  # on a CPU, each worker's core comes out of torch's threads
        assert plan == (Plan(0, None) if workers == 0 else Plan(workers, 3 - workers))
        assert fixed_plan(workers, on_cpu=False) == Plan(workers, None)
        seen = []
        for decoded in planned_chunks(chunks, processor, plan):
            seen.append((decoded.names[0], torch.get_num_threads()))
        assert seen == [(n, plan.threads or 3) for n in range(5)]
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
