"""`blip2 caption | ask | embed --output DIR` over WebDataset tars, Parquet and datasets folders."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from blip2.bulk import read_rows
from blip2.cli import main
from blip2.demo import EXAMPLES_DIR

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))
FAST = ["--max-new-tokens", "4", "--no-progress", "--batch-size", "2"]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tar(path: Path, images: list[Path], broken: str | None = None) -> list[str]:
    """A WebDataset shard as img2dataset writes it (KEY.png + KEY.json); returns its keys in order."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for n, image in enumerate(images):
            key = f"{path.stem}{n:04d}"
            add(tar, f"{key}.png", image.read_bytes())
            add(tar, f"{key}.json", json.dumps({"key": key, "url": image.name}).encode())
            keys.append(key)
            if broken and n == 0:
                add(tar, f"{broken}.png", image.read_bytes()[:150])  # truncated PNG
                add(tar, f"{broken}.json", b"{}")
                keys.append(broken)
    return keys


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def rows_of(out: Path, fmt: str = "jsonl") -> dict[str, list[dict]]:
    return {p.stem: read_rows(p) for p in sorted(out.glob(f"*.{fmt}"))}


def test_tar_shards_one_row_per_sample_and_bad_sample_recorded(capsys, tmp_path):
    keys_a = make_tar(tmp_path / "a.tar", EXAMPLES[:3], broken="a_bad")
    keys_b = make_tar(tmp_path / "b.tar", EXAMPLES[3:])
    out = tmp_path / "out"
    code, err = run(capsys, "caption", str(tmp_path / "*.tar"), "--output", str(out), *FAST)
    assert code == 1 and "1 sample(s) could not be read" in err
    rows = rows_of(out)
    assert sorted(rows) == ["a", "b"]
    assert [r["key"] for r in rows["a"]] == keys_a and [r["key"] for r in rows["b"]] == keys_b
    bad = next(r for r in rows["a"] if r["key"] == "a_bad")
    assert "truncated" in bad["error"] and "caption" not in bad
    good = [r for r in rows["a"] + rows["b"] if "error" not in r]
    assert len(good) == len(EXAMPLES) and all(r["caption"] for r in good)
    assert {r["shard"] for r in rows["a"]} == {str(tmp_path / "a.tar")}
    # the same captions as the plain command prints for the files themselves
    assert main(["caption", *map(str, EXAMPLES[:2]), "--format", "jsonl", *FAST]) == 0
    plain = [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]
    assert plain == [r["caption"] for r in rows["a"] if "error" not in r][:2]


def test_killed_run_resumes_without_doubling(capsys, tmp_path):
    for name, images in (("s0", EXAMPLES[:2]), ("s1", EXAMPLES[2:4]), ("s2", EXAMPLES[4:])):
        make_tar(tmp_path / f"{name}.tar", images)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "blip2.cli", "caption", str(tmp_path), "--output", str(out), *FAST]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
    # kill it as soon as its first shard is in place (or it finished): the others may be mid-write
    while proc.poll() is None and not list(out.glob("*.jsonl")):
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    first = {p.name for p in out.glob("*.jsonl")}
    code, err = run(capsys, "caption", str(tmp_path), "--output", str(out), *FAST)
    assert code == 0
    assert (f"{len(first)} shard(s) already written" in err) == bool(first)
    rows = rows_of(out)
    assert sorted(rows) == ["s0", "s1", "s2"]
    keys = [r["key"] for shard in rows.values() for r in shard]
    assert len(keys) == len(set(keys)) == len(EXAMPLES)
    assert not [p for p in out.iterdir() if p.suffix != ".jsonl"]  # no temporary file left


def test_parquet_bytes_and_paths_and_parquet_output(capsys, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "rel.png").write_bytes(EXAMPLES[1].read_bytes())
    pq.write_table(pa.table({"key": ["k0", "k1", "k2", "k3"],
                             "image": [EXAMPLES[0].read_bytes(), None, b"not an image", EXAMPLES[2].read_bytes()]}),
                   tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"image_path": ["rel.png", str(EXAMPLES[3])]}), tmp_path / "paths.parquet")
    out = tmp_path / "out"
    code, _ = run(capsys, "ask", str(tmp_path / "bytes.parquet"), str(tmp_path / "paths.parquet"),
                  "--question", "what is it?", "--output", str(out), "--output-format", "parquet", *FAST)
    assert code == 1
    rows = rows_of(out, "parquet")
    assert [r["key"] for r in rows["bytes"]] == ["k0", "k1", "k2", "k3"]
    assert [bool(r["error"]) for r in rows["bytes"]] == [False, True, True, False]
    assert rows["bytes"][0]["answer"] and rows["bytes"][0]["question"] == "what is it?"
    assert [r["key"] for r in rows["paths"]] == ["000000000", "000000001"]
    assert all(r["answer"] and "error" not in r for r in rows["paths"])  # no error column there


def test_embed_a_saved_datasets_folder(capsys, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in EXAMPLES[:3]], "key": ["x", "y", "z"]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    code, _ = run(capsys, "embed", str(tmp_path / "ds"), "--output", str(out), "--no-progress")
    assert code == 0
    rows = rows_of(out)["ds"]
    assert [r["key"] for r in rows] == ["x", "y", "z"]
    assert all(len(r["embedding"]) > 0 for r in rows)


def test_dataset_inputs_need_output_and_bad_shards_are_named(capsys, tmp_path):
    make_tar(tmp_path / "a.tar", EXAMPLES[:1])
    with pytest.raises(SystemExit, match="--output"):
        main(["caption", str(tmp_path / "a.tar"), *FAST])
    (tmp_path / "z.tar").write_bytes(b"this is not a tar file at all" * 30)
    code, err = run(capsys, "caption", str(tmp_path / "a.tar"), str(tmp_path / "z.tar"),
                    "--output", str(tmp_path / "out"), *FAST)
    assert code == 1 and "z.tar: not a readable tar file" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jsonl"]


def test_torchrun_ranks_split_shards_into_the_same_rows(capsys, tmp_path):
    for n in range(3):
        make_tar(tmp_path / f"s{n}.tar", EXAMPLES[2 * n:2 * n + 2])
    single = tmp_path / "single"
    run(capsys, "caption", str(tmp_path), "--output", str(single), *FAST)
    ranked = tmp_path / "ranked"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "-m", "blip2.cli", "caption", str(tmp_path), "--output", str(ranked), *FAST]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert rows_of(ranked) == rows_of(single)


def test_ray_data_with_two_workers_gives_the_same_rows(capsys, tmp_path):
    pytest.importorskip("ray")
    for n in range(3):
        make_tar(tmp_path / f"s{n}.tar", EXAMPLES[2 * n:2 * n + 2], broken="bad" if n == 1 else None)
    single, distributed = tmp_path / "single", tmp_path / "ray"
    assert run(capsys, "ask", str(tmp_path), "--question", "what?", "--question", "which colour?",
               "--output", str(single), *FAST)[0] == 1
    code, err = run(capsys, "ask", str(tmp_path), "--question", "what?", "--question", "which colour?",
                    "--output", str(distributed), "--ray", "--ray-workers", "2", *FAST)
    assert code == 1, err
    assert rows_of(distributed) == rows_of(single)
    assert sum(len(rows) for rows in rows_of(single).values()) == 2 * len(EXAMPLES) + 1


def test_killed_ray_run_resumes_without_doubling(capsys, tmp_path):
    """The Ray driver killed once a shard is written: a rerun (with Ray again) writes the rest, one row
    per sample, and leaves no temporary file."""
    pytest.importorskip("ray")
    for n in range(3):
        make_tar(tmp_path / f"s{n}.tar", EXAMPLES[2 * n:2 * n + 2])
    out = tmp_path / "out"
    argv = ["caption", str(tmp_path), "--output", str(out), "--ray", "--ray-workers", "2", *FAST]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "blip2.cli", *argv], env=env, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the kill takes Ray's processes too
    deadline = time.monotonic() + 240
    while proc.poll() is None and not list(out.glob("*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, 9)
    proc.wait()
    first = {p.name for p in out.glob("*.jsonl")}
    code, err = run(capsys, *argv)
    assert code == 0, err
    assert (f"{len(first)} shard(s) already written" in err) == bool(first)
    rows = rows_of(out)
    assert sorted(rows) == ["s0", "s1", "s2"]
    keys = [r["key"] for shard in rows.values() for r in shard]
    assert len(keys) == len(set(keys)) == len(EXAMPLES)
    assert not [p for p in out.iterdir() if p.suffix != ".jsonl"]


def test_ray_rows_complete_a_shard_as_soon_as_all_its_samples_are_back():
    from blip2.bulk import _ShardCollector

    def batch(rows):  # (shard, index, order, total, parts)
        cols = ("shard", "index", "order", "total", "parts")
        out = {c: [r[n] for r in rows] for n, c in enumerate(cols)}
        return {**out, "key": [f"k{r[1]}" for r in rows], "record": ["{}" for _ in rows]}

    c = _ShardCollector(3)
    # shard 0: 2 samples, sample 1 asked two questions; shard 1: 1 sample; shard 2: no samples at all
    assert c.add(batch([(0, 1, 0, 2, 2), (1, 0, 0, 1, 1)])) == [1]
    assert c.add(batch([(0, 0, 0, 2, 1)])) == []  # sample 1's second row is still out
    assert c.add(batch([(0, 1, 1, 2, 2)])) == [0]
    assert [r[:2] for r in c.take(0)] == [(0, 0), (1, 0), (1, 1)]  # sample order, then question order
    assert c.take(1) and c.left() == [2] and c.take(2) == []


def test_tar_shards_are_counted_for_the_progress_bar_without_reading_their_data(tmp_path, monkeypatch):
    import gzip

    from blip2 import bulk

    keys = make_tar(tmp_path / "a.tar", EXAMPLES[:3], broken="a_bad")
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    modes = []
    real = bulk._tar_groups
    monkeypatch.setattr(bulk, "_tar_groups", lambda path, read, mode="r|*": modes.append(mode) or real(path, read, mode))
    assert bulk._tar_count(str(tmp_path / "a.tar")) == len(keys) == 4
    assert bulk._tar_count(str(tmp_path / "a.tar.gz")) == 4
    assert modes == ["r:", "r|*"]  # a plain tar's data is seeked over; a compressed one streams
