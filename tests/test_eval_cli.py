"""`blip2 eval` on world images with the shipped demo models: a table, a JSON file, clear errors."""

from __future__ import annotations

import json

import pytest

from blip2.cli import main
from blip2.demo import MODEL_DIR, RETRIEVAL_DIR
from blip2.demo.dataset import write_split


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("val") / "heldout", "heldout", 12, start=5000, questions=True)


def test_eval_prints_a_table_and_writes_json(val, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["eval", str(val), "--out", str(out), "--no-java", "--max-images", "8", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "CIDEr" in table and "vqa_accuracy" in table
    result = json.loads(out.read_text())
    caption, vqa = result["metrics"]["caption"], result["metrics"]["vqa"]
    assert caption["n"] == 8 and 0 < caption["BLEU-4"] <= 1 and caption["CIDEr"] > 0
    assert vqa["n"] == 8 and 0 <= vqa["vqa_accuracy"] <= 1
    assert result["metrics"]["retrieval"]["n"] == 8  # the demo ships a retrieval model too
    first = result["predictions"]["caption"][0]
    assert first["caption"] and len(first["references"]) == 8  # every phrasing of the scene is a reference


def test_eval_retrieval_with_the_retrieval_model(val, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(val), "--model", str(RETRIEVAL_DIR), "--out", str(out), "--no-java"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"retrieval"}  # what that model can do
    assert main(["eval", str(val), "--model", str(MODEL_DIR), "--out", str(out), "--no-java", "--max-images", "2"]) == 0
    assert set(json.loads(out.read_text())["metrics"]) == {"caption", "vqa"}  # the captioner has no ITC heads
    r = metrics["retrieval"]
    assert r["n"] == 12 and r["i2t_r1"] <= r["i2t_r5"] <= r["i2t_r10"] and r["t2i_r10"] > r["t2i_r1"] - 1e-9
    assert r["t2i_r10"] > 10 / 12 * 0.5  # better than chance (10 of 12 images)


def test_eval_errors_name_the_culprit(val, tmp_path, capsys):
    with pytest.raises(SystemExit, match="no language model"):
        main(["eval", str(val), "--model", str(RETRIEVAL_DIR), "--task", "caption", "--out", str(tmp_path / "x.json")])
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    with pytest.raises(SystemExit, match="notes.txt: unknown evaluation format"):
        main(["eval", str(bad), "--out", str(tmp_path / "y.json")])
    captions_only = tmp_path / "c.jsonl"
    captions_only.write_text(json.dumps({"image": str(val.parent / "heldout-05000.png"), "caption": "a red triangle"}) + "\n")
    with pytest.raises(SystemExit, match="has no questions for --task vqa"):
        main(["eval", str(captions_only), "--task", "vqa", "--out", str(tmp_path / "z.json")])
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()
