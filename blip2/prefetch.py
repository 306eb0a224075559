"""Images decoded ahead of the model, in worker processes.

Opening, decoding and preprocessing an image is PIL and NumPy work under the GIL (about 0.3 ms for a
small PNG), so done in the model's process it adds to every batch. Worker processes, as torch's
DataLoader uses them, decode the next chunks while the model runs on this one. Chunks are still read
from the input in the calling process (a stream's side effects, such as a shard's keys, stay there),
results come back in input order with each image's error, and at most two chunks per worker are in
flight, so a long stream is never read ahead of the model by more than that.

On a CPU each worker's core is taken from torch's threads (`fixed_plan`): a worker beside as many
torch threads as cores stalls their parallel regions (measured on 2 cores: 0.27 of the rate).
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterable, Iterator, NamedTuple

AHEAD_PER_WORKER = 2  # chunks in flight per worker: one being decoded, one waiting for the model
PARENT_POLL_S = 0.5  # how often a worker checks that its main process is alive


class Decoded(NamedTuple):
    size: int  # items in the chunk, readable or not
    names: list  # the readable ones' names, in order
    pixels: list  # their (3, H, W) float32 arrays
    errors: list  # (name, message) for the others


def decode_chunk(chunk: list, image_processor) -> Decoded:
    """One chunk of items: a path, or a (name, source) pair whose source is a path, bytes or a PIL image."""
    pairs = [item if isinstance(item, tuple) else (item, item) for item in chunk]
    names, pixels, errors = [], [], []
    for (name, _), result in zip(pairs, _pixels_or_errors(image_processor, [source for _, source in pairs])):
        if isinstance(result, OSError):
            errors.append((name, f"cannot read: {result}"))
        elif isinstance(result, Exception):  # ImageInputError: "image 3 (path): why"
            errors.append((name, str(result).split(": ", 1)[-1]))
        else:
            names.append(name)
            pixels.append(result)
    return Decoded(len(chunk), names, pixels, errors)


def _pixels_or_errors(image_processor, sources: list) -> list:
    if hasattr(image_processor, "pixels_or_errors"):  # this library's image processors: the batch shares its work
        return image_processor.pixels_or_errors(sources)
    from .processing import ImageInputError

    out = []
    for source in sources:
        try:
            out.append(image_processor([source])["pixel_values"][0])
        except (ImageInputError, OSError) as err:
            out.append(err)
    return out


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(on_cpu: bool) -> int:
    """One worker when the model runs on an accelerator and a second core exists; none when the model runs
    on the CPU, where a worker's core is taken from torch's threads: on this project's 2-core machine a
    worker beside 1 torch thread never beat decoding here with 2 (`bench/bench_bulk.py --num-workers`)."""
    return 1 if not on_cpu and usable_cpus() >= 2 else 0


class Plan(NamedTuple):
    workers: int
    threads: int | None  # torch's threads while the model runs beside them (None: unchanged)


def fixed_plan(workers: int, on_cpu: bool) -> Plan:
    """`workers` as asked; on a CPU their cores are taken from torch's threads."""
    import torch

    if workers <= 0 or not on_cpu:
        return Plan(max(0, workers), None)
    return Plan(workers, max(1, torch.get_num_threads() - workers))


def planned_chunks(chunks: Iterable[list], image_processor, plan: Plan) -> Iterator[Decoded]:
    """`decoded_chunks` by `plan`, with torch's threads set for it while the chunks are consumed."""
    import torch

    before = torch.get_num_threads()
    try:
        if plan.threads is not None:
            torch.set_num_threads(plan.threads)
        yield from decoded_chunks(chunks, image_processor, plan.workers)
    finally:
        torch.set_num_threads(before)


def decoded_chunks(chunks: Iterable[list], image_processor, workers: int) -> Iterator[Decoded]:
    """`decode_chunk` of every chunk, in order: here (workers 0) or `workers` processes ahead."""
    if workers <= 0:
        for chunk in chunks:
            yield decode_chunk(chunk, image_processor)
        return
    methods = multiprocessing.get_all_start_methods()
    # fork: the worker starts at once with the processor it needs (no re-import of torch); it runs only
    # PIL and NumPy. Elsewhere (macOS, Windows) the platform's default start method.
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with _tokenizers_configured():
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(image_processor,))
        pool.submit(int).result()  # the workers start now, inside this block
    pending: collections.deque = collections.deque()
    try:
        for chunk in chunks:
            pending.append((chunk, pool.submit(_decode_in_worker, chunk)))
            if len(pending) > AHEAD_PER_WORKER * workers:
                yield _result(*pending.popleft(), image_processor)
        while pending:
            yield _result(*pending.popleft(), image_processor)
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _tokenizers_configured():
    """huggingface tokenizers prints a warning in a child forked after its thread pool ran, unless
    TOKENIZERS_PARALLELISM is set. The workers never tokenize, so it is set (to the default, true)
    while they fork and put back after: the warning is noise here, and this process is unchanged."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = before or "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]


def _result(chunk: list, future, image_processor) -> Decoded:
    try:
        return future.result()
    except BrokenProcessPool as err:
        raise SystemExit("blip2: the image-decoding worker process died (out of memory, or a decoder crashed); "
                         "rerun with --num-workers 0 to decode in this process") from err
    except Exception:  # noqa: BLE001 - e.g. a source that cannot be sent to a process (an open file)
        return decode_chunk(chunk, image_processor)  # here instead; a real bug raises again, from here


_WORKER_PROCESSOR: Any = None


def _start_worker(image_processor) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = image_processor
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it stops the pool
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose main process was killed (SIGKILL, out of memory) would wait on its queue for ever,
    holding a copy-on-write image of the model's memory; it leaves within a second of its parent."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def _decode_in_worker(chunk: list) -> Decoded:
    return decode_chunk(chunk, _WORKER_PROCESSOR)
