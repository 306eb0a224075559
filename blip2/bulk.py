"""Bulk inference over datasets: `blip2 caption | ask | embed ... --output DIR`.

Inputs, besides image files: WebDataset tar shards (`KEY.jpg|png|webp` beside an optional `KEY.json`,
the layout img2dataset writes), Parquet files with an image column (bytes, a path, or the {"bytes",
"path"} struct Hugging Face writes), a folder of such shards, a Hugging Face dataset saved with
`save_to_disk`, and `hf:NAME[:SPLIT]` (streamed). Their libraries (pyarrow, datasets) are the `[data]`
extra, imported only when such an input is given; tar shards need nothing.

Each input shard becomes one output file, `DIR/<shard>.jsonl` (or .parquet), with one row per sample
(per sample and question for `ask`) named by `key` and `shard`. A file is written only when its shard
is done, through a temporary file renamed into place, so a killed run leaves no half shard, and a rerun
skips the shards whose file exists: nothing is done twice and no row is doubled. A sample whose image
cannot be read becomes a row with its `error`; the shard goes on. Under torchrun (RANK, WORLD_SIZE in
the environment) rank r takes shards r, r + N, ...; the files are the same as one process writes.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .io import atomic_write

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".parquet")
TAR_IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_path", "path")


class ShardError(Exception):
    """A shard that cannot be read as a whole (corrupt tar, not Parquet, missing column)."""


class SampleError(str):
    """Yielded in place of a sample's image when it has none; becomes the sample's error row."""


@dataclass
class Shard:
    name: str  # the output file's stem, unique in a run
    source: str  # what the rows call their shard
    samples: Callable[[], Iterator[tuple[str, Any]]]  # (key, path | bytes | PIL image | SampleError)
    count: Callable[[], int | None]  # samples in the shard, None when unknown (streams)


# ---------------------------------------------------------------- finding shards
def find_shards(items: list[str], failures, image_column: str | None = None) -> tuple[list[Shard], list[str]]:
    """The dataset shards among the command line's inputs, and the other inputs (images)."""
    shards, rest = [], []
    for item in items:
        path = Path(item)
        if item.startswith("hf:"):
            shards.append(_hf_stream_shard(item[3:], image_column))
        elif path.is_dir() and ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
            shards.append(_hf_disk_shard(path, image_column))
        elif path.is_dir() and _shard_files(sorted(str(p) for p in path.iterdir())):
            shards += [_file_shard(f, image_column) for f in _shard_files(sorted(str(p) for p in path.iterdir()))]
        elif item.lower().endswith(SHARD_SUFFIXES):
            found = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
            if not found or not all(Path(f).is_file() for f in found):
                failures.report(item, "no such shard file" if not glob.has_magic(item) else "no file matches")
            shards += [_file_shard(f, image_column) for f in found if Path(f).is_file()]
        else:
            rest.append(item)
    _check_unique(shards)
    return shards, rest


def _shard_files(paths: list[str]) -> list[str]:
    return [p for p in paths if p.lower().endswith(SHARD_SUFFIXES) and Path(p).is_file()]


def _check_unique(shards: list[Shard]) -> None:
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.name in seen:
            raise SystemExit(f"blip2: {seen[shard.name]} and {shard.source} would both write the output shard "
                             f"{shard.name!r}; give shards with different file names")
        seen[shard.name] = shard.source


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in SHARD_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _file_shard(path: str, image_column: str | None) -> Shard:
    if path.lower().endswith(".parquet"):
        return Shard(_stem(path), path, lambda: _parquet_samples(path, image_column), lambda: _parquet_count(path))
    return Shard(_stem(path), path, lambda: _tar_samples(path), lambda: _tar_count(path))


# ---------------------------------------------------------------- WebDataset tars
def _split_key(member: str) -> tuple[str, str]:
    """'dir/000012.jpg' -> ('dir/000012', 'jpg'): the key runs to the first dot of the file name."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_groups(path: str, read: bool, mode: str = "r|*") -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {extension: bytes}) per run of consecutive members sharing a key, streamed (mode "r|*"), or
    with the data seeked over ("r:", an uncompressed tar)."""
    key, group = None, {}
    try:
        with tarfile.open(path, mode) as tar:
            for member in tar:
                if not member.isfile() or Path(member.name).name.startswith((".", "__")):
                    continue
                k, ext = _split_key(member.name)
                if k != key and group:
                    yield key, group
                    group = {}
                key = k
                data = tar.extractfile(member).read() if read and ext in TAR_IMAGE_EXTENSIONS | {"json"} else None
                group[ext] = data
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"not a readable tar file ({err})") from None
    if group:
        yield key, group


def _tar_samples(path: str) -> Iterator[tuple[str, Any]]:
    for key, group in _tar_groups(path, read=True):
        image = next((group[ext] for ext in group if ext in TAR_IMAGE_EXTENSIONS), None)
        missing = SampleError(f"no image file in the sample (found {', '.join(sorted(group))})")
        yield key, image if image is not None else missing


def _tar_count(path: str) -> int | None:
    """Samples in a tar: an uncompressed one's headers are read and its data seeked over (a streamed count
    would read the whole shard once more); a compressed one is decompressed to count."""
    mode = "r|*" if path.endswith((".gz", ".tgz")) else "r:"
    try:
        return sum(1 for _ in _tar_groups(path, read=False, mode=mode))
    except ShardError:
        return None


# ---------------------------------------------------------------- Parquet and datasets
def _image_source(value: Any, folder: Path | None) -> Any:
    """A column value as something the image processor opens: bytes, a path, a PIL image."""
    if isinstance(value, dict):  # the Hugging Face Image struct
        value = value.get("bytes") or value.get("path")
    if value is None:
        return SampleError("the image column is empty for this sample")
    if isinstance(value, str) and folder is not None and not Path(value).is_absolute():
        return str(folder / value)  # relative paths are relative to the Parquet file
    return value


def _pick_column(names: list[str], image_column: str | None) -> str:
    if image_column is not None:
        if image_column not in names:
            raise ShardError(f"no column {image_column!r} (columns: {', '.join(names)})")
        return image_column
    for name in IMAGE_COLUMNS:
        if name in names:
            return name
    raise ShardError(f"no image column among {', '.join(names)}; name it with --image-column")


def _parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise SystemExit(f"blip2: {path}: reading Parquet needs pyarrow: pip install 'blip2[data]'") from None
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise ShardError(f"not a readable Parquet file ({err})") from None


def _parquet_samples(path: str, image_column: str | None) -> Iterator[tuple[str, Any]]:
    table = _parquet(path)
    names = table.schema_arrow.names
    column = _pick_column(names, image_column)
    columns = [column] + (["key"] if "key" in names and column != "key" else [])
    index = 0
    try:
        for batch in table.iter_batches(batch_size=256, columns=columns):
            data = batch.to_pydict()
            for n, value in enumerate(data[column]):
                key = str(data["key"][n]) if "key" in data else f"{index:09d}"
                index += 1
                yield key, _image_source(value, Path(path).parent)
    except ShardError:
        raise
    except Exception as err:
        raise ShardError(f"cannot read row {index} ({err})") from None


def _parquet_count(path: str) -> int | None:
    try:
        return _parquet(path).metadata.num_rows
    except ShardError:
        return None


def _datasets():
    try:
        import datasets
    except ModuleNotFoundError:
        raise SystemExit("blip2: Hugging Face datasets need the datasets library: pip install 'blip2[data]'") from None
    return datasets


def _dataset_samples(dataset, image_column: str | None) -> Iterator[tuple[str, Any]]:
    datasets = _datasets()
    names = list(dataset.column_names or dataset.features)
    features = dataset.features or {}
    typed = [n for n in names if isinstance(features.get(n), datasets.Image)]
    column = image_column or (typed[0] if typed else None) or _pick_column(names, None)
    if column not in names:
        raise ShardError(f"no column {column!r} (columns: {', '.join(names)})")
    if isinstance(features.get(column), datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))  # bytes; the processor decodes
    for index, row in enumerate(dataset):
        yield str(row["key"]) if "key" in row else f"{index:09d}", _image_source(row[column], None)


def _hf_disk_shard(path: Path, image_column: str | None) -> Shard:
    def load():
        try:
            return _datasets().load_from_disk(str(path))
        except Exception as err:
            raise ShardError(f"not a readable saved dataset ({err})") from None

    return Shard(path.name, str(path), lambda: _dataset_samples(load(), image_column), lambda: len(load()))


def _hf_stream_shard(spec: str, image_column: str | None) -> Shard:
    name, _, split = spec.partition(":")

    def load():
        try:
            return _datasets().load_dataset(name, split=split or "train", streaming=True)
        except Exception as err:
            raise ShardError(f"cannot open the dataset ({err})") from None

    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{name}-{split or 'train'}").strip("-")
    return Shard(stem, f"hf:{spec}", lambda: _dataset_samples(load(), image_column), lambda: None)


def _files_shard(paths: list[str]) -> Shard:
    """Plain image files given beside --output: one shard named 'images', keyed by path."""
    return Shard("images", "images", lambda: iter([(p, p) for p in paths]), lambda: len(paths))


# ---------------------------------------------------------------- running
def rank_and_world() -> tuple[int, int]:
    """This process's place among torchrun's (RANK, WORLD_SIZE); (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class SampleErrors:
    """What `load_pixels` reports about a sample, kept for its output row instead of printed."""

    def __init__(self) -> None:
        self.by_name: dict[Any, str] = {}
        self.count = 0

    def report(self, name, message: str) -> None:
        self.by_name[name] = message
        self.count += 1


def output_path(out: Path, shard: Shard, fmt: str) -> Path:
    return out / f"{shard.name}.{fmt}"


def _pending(args, paths: list[str], shards: list[Shard], world: int = 1, rank: int = 0) -> tuple[Path, list[Shard]]:
    """--output, and this rank's shards whose file is not written yet (the others are said skipped)."""
    if not args.output:
        raise SystemExit("blip2: dataset inputs (shards, Parquet, datasets) are written to files: give --output DIR")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"blip2: --output {out}: exists and is not a folder")
    if paths:
        shards = [_files_shard(paths)] + shards
        _check_unique(shards)
    mine = shards[rank::world]
    todo = [s for s in mine if not output_path(out, s, args.output_format).exists()]
    if len(todo) < len(mine):
        print(f"blip2: {len(mine) - len(todo)} shard(s) already written in {out}, skipped", file=sys.stderr)
    return out, todo


def run_bulk(args, m, paths: list[str], shards: list[Shard], rows, key: str, failures) -> int:
    """Writes each shard's rows to --output; this rank's shards only, the finished ones skipped."""
    from tqdm.auto import tqdm

    rank, world = rank_and_world()
    out, todo = _pending(args, paths, shards, world, rank)
    shown = not args.no_progress and rank == 0
    counts = [_count(s) for s in todo] if shown else [None]  # only the bar's ETA needs them
    total = None if None in counts else sum(counts)
    bar = tqdm(total=total, desc=f"{key} {len(todo)} shard(s)", unit="img", file=sys.stderr, disable=not shown)
    sample_errors = 0
    for shard in todo:
        try:
            records, errors = _shard_rows(shard, args, m, rows, bar)
        except ShardError as err:
            failures.report(shard.source, str(err))
            continue
        sample_errors += errors
        write_rows(output_path(out, shard, args.output_format), records, args.output_format)
    bar.close()
    return _finish(failures, sample_errors, out)


def _finish(failures, sample_errors: int, out: Path) -> int:
    from .commands import finish

    if sample_errors:
        print(f"blip2: {sample_errors} sample(s) could not be read; their rows in {out} hold the error",
              file=sys.stderr)
        failures.count += sample_errors
    return finish(failures)


def _count(shard: Shard) -> int | None:
    try:
        return shard.count()
    except ShardError:
        return None  # reported when the shard is read


def _shard_rows(shard: Shard, args, m, rows, bar) -> tuple[list[dict], int]:
    """Every row of one shard, in sample order: results, or the sample's error."""
    from .commands import image_batches

    keys: list[str] = []
    errors = SampleErrors()

    def stream():
        for key, source in shard.samples():
            keys.append(key)
            if isinstance(source, SampleError):
                errors.report(len(keys) - 1, str(source))
                bar.update(1)
            else:
                yield len(keys) - 1, source  # the sample's index is its name: keys may repeat

    results: dict[int, list[dict]] = {}
    for names, pixel_values in image_batches(stream(), args, m, errors, bar):
        for record, _ in rows(names, pixel_values):
            results.setdefault(record.pop("image"), []).append(record)
    out = []
    for index, key in enumerate(keys):
        if index in errors.by_name:
            out.append({"key": key, "shard": shard.source, "error": errors.by_name[index]})
        else:
            out += [{"key": key, "shard": shard.source, **record} for record in results.get(index, [])]
    return out, errors.count


def write_rows(target: Path, records: list[dict], fmt: str) -> None:
    """One shard's rows, atomically: JSON lines, or Parquet with every column in every row."""
    from .commands import printable_values

    records = [printable_values(r) for r in records]
    if fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for r in records for k in r))
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records])
    atomic_write(target, lambda tmp: pq.write_table(table, str(tmp)))


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of one output shard (JSONL or Parquet)."""
    if str(path).endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]



# ---------------------------------------------------------------- Ray Data
def run_ray(args, paths: list[str], shards: list[Shard], build, key: str, failures) -> int:
    """The same shard files through Ray Data: shards read by Ray tasks, rows made by `--ray-workers`
    model actors (`map_batches`), each shard's rows put back in sample order and written atomically
    as soon as they are all back (a killed run redoes only the shards it had not written)."""
    try:
        import ray
    except ModuleNotFoundError:
        raise SystemExit("blip2: --ray needs Ray: pip install 'blip2[ray]'") from None
    out, todo = _pending(args, paths, shards)
    if not todo:
        return _finish(failures, 0, out)
    local = args.ray == "local"
    ray.init(address=None if local else args.ray, num_cpus=args.ray_workers + 1 if local else None,
             include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = not args.no_progress
        ds = ray.data.from_items([{"shard": i} for i in range(len(todo))])
        ds = ds.flat_map(_RaySamples(todo))
        ds = ds.map_batches(_RayRows, fn_constructor_args=(build, args), batch_size=args.batch_size,
                            concurrency=args.ray_workers, num_cpus=1, batch_format="numpy")
        collector = _ShardCollector(len(todo))
        sample_errors = 0
        # A shard is written as soon as all its rows are back, so a killed run keeps the shards it finished.
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in collector.add(batch):
                sample_errors += _write_ray_shard(todo[i], collector.take(i), out, args, failures)
        for i in collector.left():  # shards with no samples
            sample_errors += _write_ray_shard(todo[i], collector.take(i), out, args, failures)
    finally:
        if local:
            ray.shutdown()
    return _finish(failures, sample_errors, out)


def _write_ray_shard(shard: Shard, rows: list[tuple[int, int, str, str]], out: Path, args, failures) -> int:
    """One shard's rows (index, order, key, record JSON) in sample order to its file; returns its sample errors."""
    broken = [r for r in rows if r[0] < 0]
    if broken:
        failures.report(shard.source, json.loads(broken[0][3])["error"])
        return 0
    records = [{"key": k, "shard": shard.source, **json.loads(record)} for _, _, k, record in rows]
    write_rows(output_path(out, shard, args.output_format), records, args.output_format)
    return sum(1 for r in records if "error" in r)


class _ShardCollector:
    """The rows coming back from Ray, per shard. Every row says how many samples its shard has
    (`total`) and how many rows its sample made (`parts`: one per question); a shard is complete
    when every sample's rows are back."""

    def __init__(self, shards: int) -> None:
        self.rows: dict[int, list[tuple[int, int, str, str]]] = {i: [] for i in range(shards)}
        self.got: dict[int, collections.Counter] = {i: collections.Counter() for i in range(shards)}
        self.done = collections.Counter()  # samples with all their rows back, per shard
        self.total: dict[int, int] = {}

    def add(self, batch: dict) -> list[int]:
        """Takes one batch of rows; returns the shards it completed."""
        completed = []
        for shard, index, order, key, record, total, parts in zip(
                batch["shard"], batch["index"], batch["order"], batch["key"], batch["record"], batch["total"],
                batch["parts"]):
            shard, index = int(shard), int(index)
            self.rows[shard].append((index, int(order), str(key), str(record)))
            self.total[shard] = int(total)
            self.got[shard][index] += 1
            if self.got[shard][index] == int(parts):
                self.done[shard] += 1
                if self.done[shard] == self.total[shard]:
                    completed.append(shard)
        return completed

    def take(self, shard: int) -> list[tuple[int, int, str, str]]:
        """A shard's rows in sample order (and question order within a sample); forgotten here."""
        return sorted(self.rows.pop(shard))

    def left(self) -> list[int]:
        return sorted(self.rows)


class _RaySamples:
    """flat_map: a shard index to its samples as rows (shard, index, key, image bytes, error); a shard
    that cannot be read is one row with index -1 and its error."""

    def __init__(self, shards: list[Shard]) -> None:
        self.shards = shards

    def __call__(self, row: dict) -> list[dict]:
        shard = int(row["shard"])
        out = []
        try:
            for index, (key, source) in enumerate(self.shards[shard].samples()):
                image, error = _bytes_of(source)
                out.append({"shard": shard, "index": index, "key": key, "image": image, "error": error})
        except ShardError as err:
            return [{"shard": shard, "index": -1, "key": "", "image": b"", "error": str(err), "total": 1}]
        return [{**sample, "total": len(out)} for sample in out]  # the driver knows when a shard is complete


def _bytes_of(source) -> tuple[bytes, str]:
    """(image file bytes, "") or (b"", why not): rows cross processes as bytes."""
    if isinstance(source, SampleError):
        return b"", str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), ""
    try:
        return Path(source).read_bytes(), ""
    except (OSError, TypeError) as err:
        return b"", f"cannot read: {err}"


class _RayRows:
    """map_batches actor: loads the model once, then makes the rows of each batch of samples with the
    CLI's own batch loop and row function; every row leaves as (shard, index, order, key, record JSON)."""

    def __init__(self, build, args) -> None:
        self.args = args
        self.m, self.rows = build()

    def __call__(self, batch: dict) -> dict:
        from tqdm.auto import tqdm

        from .commands import image_batches

        n = len(batch["key"])
        errors = SampleErrors()
        for i in range(n):
            if batch["error"][i]:
                errors.report(i, str(batch["error"][i]))
        items = [(i, bytes(batch["image"][i])) for i in range(n) if i not in errors.by_name]
        made: list[tuple[int, dict]] = []
        # workers=0: Ray's own actors are the parallelism here, and forking inside a Ray worker is unsafe
        for names, pixel_values in image_batches(items, self.args, self.m, errors, tqdm(disable=True), workers=0):
            made += [(record.pop("image"), record) for record, _ in self.rows(names, pixel_values)]
        made += [(i, {"error": message}) for i, message in errors.by_name.items()]
        parts = collections.Counter(i for i, _ in made)  # rows per sample (one per question)
        return {
            "total": [int(batch["total"][i]) for i, _ in made],
            "parts": [parts[i] for i, _ in made],
            "shard": [int(batch["shard"][i]) for i, _ in made],
            "index": [int(batch["index"][i]) for i, _ in made],
            "order": list(range(len(made))),  # several rows of one sample (questions) keep their order
            "key": [str(batch["key"][i]) for i, _ in made],
            "record": [json.dumps(record, ensure_ascii=False) for _, record in made],
        }
