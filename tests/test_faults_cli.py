"""Command-line faults: every numeric option is range-checked when read, unusable devices and bad
templates are one-line errors, and file names that are not UTF-8 never stop a run or its JSON lines."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

import pytest

from blip2.cli import build_parser, main
from blip2.demo import EXAMPLES_DIR

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))

BAD_OPTIONS = [
    ("--batch-size", "-1"), ("--batch-size", "0"), ("--batch-size", "two"), ("--max-new-tokens", "0"),
    ("--min-new-tokens", "-1"), ("--num-beams", "0"), ("--temperature", "nan"), ("--temperature", "-1"),
    ("--temperature", "inf"), ("--top-k", "-3"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"),
    ("--repetition-penalty", "0"), ("--length-penalty", "nan"), ("--no-repeat-ngram-size", "-1"),
    ("--num-return-sequences", "0"), ("--seed", "-1"), ("--device", "nonsense"), ("--device", "cuda:99"),
]


@pytest.mark.parametrize("option,value", BAD_OPTIONS)
def test_bad_numeric_options_and_devices_are_refused_when_read(capsys, option, value):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["caption", str(EXAMPLES[0]), option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["match", "x.png", "a text"], ["embed", "x.png"], ["ask", "x.png", "q?"]])
def test_every_command_checks_its_batch_size(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command, "--batch-size", "0"])
    assert exit_.value.code == 2


def test_eval_checks_max_images(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["eval", "data.jsonl", "--max-images", "-2"])
    assert exit_.value.code == 2


def test_train_checks_max_steps(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "stage1", "--config", "c.json", "--max-steps", "-5"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("command", [["ask", str(EXAMPLES[0]), "what?"], ["eval", "data.jsonl"]])
@pytest.mark.parametrize("template", ["{0}: {1}", "Q: {question}", "{} and {}", "{", "no slot"])
def test_a_bad_template_is_a_one_line_error(capsys, command, template):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--template", template, "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --template: must contain {} exactly once" in err


def test_a_template_with_other_braces_keeps_them_as_text(capsys):
    assert main(["ask", str(EXAMPLES[0]), "what?", "--template", "{json}: Question: {} Answer:",
                 "--max-new-tokens", "2"]) == 0


def test_non_utf8_file_names_neither_crash_nor_break_jsonl(tmp_path, monkeypatch):
    if sys.platform == "darwin":
        pytest.skip("macOS file systems refuse names that are not UTF-8")
    folder = os.fsencode(tmp_path)
    odd = os.path.join(folder, b"caf\xe9-\xff.png")  # Latin-1 bytes: not UTF-8
    shutil.copy(EXAMPLES[0], odd)
    shutil.copy(EXAMPLES[1], tmp_path / "z_after.png")
    # stdout as PYTHONIOENCODING=utf-8 makes it: strict UTF-8, where a lone surrogate cannot be written
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True))
    code = main(["caption", str(tmp_path), "--format", "jsonl", "--max-new-tokens", "3"])
    sys.stdout.flush()
    lines = raw.getvalue().decode("utf-8").splitlines()  # valid UTF-8 throughout
    records = [json.loads(line) for line in lines]
    assert code == 0 and len(records) == 2
    assert records[0]["image"].endswith("caf\\xe9-\\xff.png") and records[1]["image"].endswith("z_after.png")


def test_eval_writes_valid_json_for_non_utf8_file_names(tmp_path, capsys):
    if sys.platform == "darwin":
        pytest.skip("macOS file systems refuse names that are not UTF-8")
    shutil.copy(EXAMPLES[0], os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))
    shutil.copy(EXAMPLES[1], tmp_path / "plain.png")
    name = os.fsdecode(b"caf\xe9.png")  # a lone surrogate in Python: valid JSON with \\u escapes
    lines = [json.dumps({"image": name, "caption": "a red triangle"}),
             json.dumps({"image": "plain.png", "caption": "a red triangle"})]
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "val.jsonl"), "--task", "caption", "--no-java", "--out", str(out),
                 "--max-new-tokens", "3", "--no-progress"]) == 0
    result = json.loads(out.read_bytes().decode("utf-8"))
    assert result["metrics"]["caption"]["n"] == 2
