"""`python -m blip2.demo.retrieval_tune` at toy size, on a copy of the shipped retrieval model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from blip2.demo import DEMO_DIR, retrieval_tune
from blip2.demo.instruct import MARKER
from blip2.retrieval import Blip2ForImageTextRetrieval

SHIPPED = DEMO_DIR / "retrieval"


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "demo"
    folder.mkdir()
    shutil.copytree(SHIPPED, folder / "retrieval")
    (folder / "REPORT.md").write_text(f"# report\n\nrecipe section\n\n{MARKER}\ninstruct section\n", encoding="utf-8")
    return folder


def test_tuning_writes_a_model_scores_and_one_report_section(out, tmp_path):
    before = Blip2ForImageTextRetrieval.from_pretrained(SHIPPED).state_dict()
    retrieval_tune.main(["--out", str(out), "--quick", "--threads", "1", "--set", "steps=3"])
    tuned = Blip2ForImageTextRetrieval.from_pretrained(out / "retrieval")
    assert {p.name for p in (out / "retrieval").iterdir()} == {p.name for p in SHIPPED.iterdir()}
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])]
    # The image encoder stays frozen but for its last LayerNorm, which BLIP-2 trains (ln_vision).
    assert any(k.startswith("qformer.") for k in changed)
    assert not any(k.startswith("vision_model.") and ".post_layernorm." not in k for k in changed)
    scores = json.loads((out / "retrieval_scores.json").read_text())
    assert scores["settings"]["steps"] == 3 and "continued_from" not in scores
    assert set(scores["after"]) == {"t2i_r1", "i2t_r1", "n", "itm"}
    report = (out / "REPORT.md").read_text()
    assert report.index("recipe section") < report.index(retrieval_tune.START) < report.index(MARKER)
    assert "--set steps=3" in report and "instruct section" in report

    retrieval_tune.main(["--out", str(out), "--quick", "--threads", "1"])  # continues the tuned one
    again = json.loads((out / "retrieval_scores.json").read_text())
    assert again["continued_from"] == {"runs": 1, "steps": 3}
    report = (out / "REPORT.md").read_text()
    assert report.count(retrieval_tune.START) == 1 and "1 earlier run(s) of this command (3 steps)" in report
    assert not list(out.glob(".retrieval-*")) and not (out / "retrieval.old").exists()


def half_written(monkeypatch) -> str:
    def broken(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Blip2ForImageTextRetrieval, "save_pretrained", broken)
    return "disk full"


def swap_refused(monkeypatch) -> str:
    rename = Path.rename

    def refuse_the_new_one(self, target):
        if self.name.startswith(".retrieval-"):  # after the old folder was moved aside
            raise OSError("rename refused")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse_the_new_one)
    return "rename refused"


@pytest.mark.parametrize("fail", [half_written, swap_refused])
def test_a_failed_export_leaves_the_old_model_in_place(out, monkeypatch, fail):
    files = {p.name: p.read_bytes() for p in (out / "retrieval").iterdir()}
    with pytest.raises(OSError, match=fail(monkeypatch)):
        retrieval_tune.main(["--out", str(out), "--quick", "--threads", "1"])
    assert {p.name: p.read_bytes() for p in (out / "retrieval").iterdir()} == files
    assert not list(out.glob(".retrieval-*")) and not (out / "retrieval.old").exists()
    assert not (out / "retrieval_scores.json").exists()


def test_bad_input_is_named(out, tmp_path):
    with pytest.raises(SystemExit, match="empty holds no retrieval model"):
        retrieval_tune.main(["--out", str(out), "--quick", "--start-from", str(tmp_path / "empty")])
    captioner = tmp_path / "captioner"  # a BLIP-2 captioning checkpoint is not a retrieval model
    shutil.copytree(DEMO_DIR / "model", captioner)
    with pytest.raises(SystemExit, match="retrieval_tune: "):
        retrieval_tune.main(["--out", str(out), "--quick", "--start-from", str(captioner)])
    with pytest.raises(SystemExit, match="steps takes a whole number"):
        retrieval_tune.main(["--out", str(out), "--quick", "--set", "steps=many"])
    with pytest.raises(SystemExit, match="NAME one of"):
        retrieval_tune.main(["--out", str(out), "--quick", "--set", "stepz=3"])
    assert not (out / "retrieval_scores.json").exists()
