"""`blip2 caption | ask | match | embed` on the shipped demo model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blip2.cli import main
from blip2.demo import EXAMPLES_DIR, world

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The example images, plus a corrupt file in the middle of them."""
    for path in EXAMPLES[:3]:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "01b_broken.png").write_bytes(EXAMPLES[0].read_bytes()[:200])  # a truncated PNG
    return tmp_path


def test_corrupt_image_is_reported_and_the_rest_go_on(capsys, folder):
    code, out, err = run(capsys, "caption", str(folder), "--format", "jsonl")
    assert code == 1
    assert "01b_broken.png" in err
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert [Path(r["image"]).name for r in records] == [p.name for p in EXAMPLES[:3]]
    assert all(r["caption"] for r in records)


def test_globs_files_and_missing_files(capsys, folder):
    code, out, err = run(capsys, "caption", str(folder / "0[0-1]_*.png"), str(folder / "nope.png"))
    assert code == 1 and "nope.png" in err
    assert len(out.strip().splitlines()) == 2


def test_batches_and_generation_options(capsys, folder):
    (folder / "01b_broken.png").unlink()
    code, out, _ = run(capsys, "caption", str(folder), "--batch-size", "2", "--num-beams", "3",
                       "--max-new-tokens", "6", "--format", "jsonl")
    assert code == 0
    assert len(out.strip().splitlines()) == 3
    sampled = [run(capsys, "caption", str(EXAMPLES[0]), "--do-sample", "--seed", "3", "--top-k", "5")[1]
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_embed(capsys):
    code, out, err = run(capsys, "embed", str(EXAMPLES[0]), "--text", "a red circle")
    assert code == 0, err
    image, text = (json.loads(line) for line in out.strip().splitlines())
    assert len(image["embedding"][0]) == len(text["embedding"])  # Q x E and E
    assert abs(sum(v * v for v in text["embedding"]) - 1) < 1e-2  # normalised (in bfloat16 where --dtype auto picks it)


def test_installed_command(tmp_path):
    blip2 = shutil.which("blip2", path=str(Path(sys.executable).parent))
    if blip2 is None:
        pytest.skip("the blip2 console script is not installed in this environment")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    result = subprocess.run([blip2, "caption", str(EXAMPLES[0]), str(bad), "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert str(bad) in result.stderr
    assert result.stdout.startswith(str(EXAMPLES[0]))


def test_several_questions_per_image_answer_as_each_alone(capsys, tmp_path):
    """Questions of different lengths share a batch; each answer is the one asked alone."""
    questions = ["what colour is the triangle?", "how many shapes are there?", "is there a circle?"]
    listed = tmp_path / "questions.txt"
    listed.write_text("\n".join(questions[1:]) + "\n\n", encoding="utf-8")
    images = [str(p) for p in EXAMPLES[:2]]
    code, out, err = run(capsys, "ask", *images, "--question", questions[0], "--questions", str(listed),
                         "--format", "jsonl")
    assert code == 0, err
    together = [json.loads(line) for line in out.strip().splitlines()]
    assert [(r["image"], r["question"]) for r in together] == [(i, q) for i in images for q in questions]
    for question in questions:
        _, alone, _ = run(capsys, "ask", *images, question, "--format", "jsonl")
        for record in map(json.loads, alone.strip().splitlines()):
            assert record in together


def test_ask_needs_a_question(capsys, tmp_path):
    with pytest.raises(SystemExit, match="give images and a question"):
        main(["ask", str(EXAMPLES[0])])
    empty = tmp_path / "none.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="none.txt: the file holds no questions"):
        main(["ask", str(EXAMPLES[0]), "--questions", str(empty)])
    with pytest.raises(SystemExit, match="the question is empty"):
        main(["ask", str(EXAMPLES[0]), "  "])
    with pytest.raises(SystemExit, match="the question is empty"):
        main(["ask", str(EXAMPLES[0]), "--question", "what colour is it?", "--question", ""])


def test_a_question_too_long_for_the_model_gets_a_message(capsys):
    with pytest.raises(SystemExit, match="takes .* tokens; with --max-new-tokens 30 this model has room for"):
        main(["ask", str(EXAMPLES[0]), "why " * 80])
    code, out, err = run(capsys, "ask", str(EXAMPLES[0]), "colour circle where how ???")
    assert code == 0 and out.strip()  # not a question the model was taught, still an answer


def test_dtype_auto_is_bfloat16_only_where_the_hardware_has_it():
    import argparse

    from blip2.commands import load
    from blip2.hf_compat import fast_dtype

    loaded = load(argparse.Namespace(model=None, device="cpu", dtype="auto"), retrieval=False)
    assert loaded.model.dtype == fast_dtype("cpu")
