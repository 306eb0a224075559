"""Evaluation sets: images with reference captions and/or questions with their answers.

Read from what training reads (a JSONL file or a folder, see `blip2.train.data`), from a JSON
list of such records (LAVIS's annotation files: "caption" or "answer" may be lists), or from a
COCO caption annotation file ({"images": [{"id", "file_name"}], "annotations": [{"image_id",
"caption"}]}), whose file names are relative to `image_root` (default: the file's folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..train.data import _normalise, read_records


@dataclass
class Question:
    image: int  # index into EvalSet.images
    question: str
    answers: list[str]


@dataclass
class EvalSet:
    source: str
    images: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)  # reference captions, per image
    questions: list[Question] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        """What this set can score: "caption" (and "retrieval") when it has captions, "vqa" when it has questions."""
        out = ["caption", "retrieval"] if any(self.captions) else []
        return out + (["vqa"] if self.questions else [])

    def captioned(self) -> list[int]:
        """Indices of the images that have reference captions."""
        return [i for i, refs in enumerate(self.captions) if refs]

    @classmethod
    def from_records(cls, records: list[dict], source: str) -> "EvalSet":
        out = cls(source)
        index: dict[str, int] = {}
        for r in records:
            i = index.setdefault(r["image"], len(out.images))
            if i == len(out.images):
                out.images.append(r["image"])
                out.captions.append([])
            if "question" in r:
                out.questions.append(Question(i, r["question"], list(r.get("answers", [r["answer"]]))))
            else:
                out.captions[i].append(r["caption"])
        return out


def read_eval_set(path: str | Path, image_root: str | Path | None = None,
                  questions: str | Path | None = None) -> EvalSet:
    """An evaluation set from a JSONL file, a folder, a JSON list of records, a COCO caption file, or
    VQAv2's annotation file with its `questions` file (`image_root`: where a .json file's image names
    are relative to; default its folder)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return _read_json(path, Path(image_root) if image_root else path.parent, questions)
    if path.is_file() and path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise ValueError(f"{path}: unknown evaluation format {path.suffix or '(no suffix)'!r}: expected a "
                         ".jsonl of records, a .json list of records or COCO caption annotations, or a folder")
    return EvalSet.from_records(read_records(path), str(path))


def _read_json(path: Path, root: Path, questions: str | Path | None = None) -> EvalSet:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not JSON: {err.msg}") from None
    if isinstance(data, list):
        records = []
        for n, item in enumerate(data):
            records += _normalise(item, root, f"{path}: item {n}")
        if not records:
            raise ValueError(f"{path} has no records")
        return EvalSet.from_records(records, str(path))
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return _coco_captions(data, path, root)
    if isinstance(data, dict) and data.get("annotations") and "answers" in data["annotations"][0]:
        return _vqav2(data, path, root, questions)
    keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
    raise ValueError(f"{path}: unknown evaluation format (top level {keys}): expected a list of records, "
                     "COCO caption annotations ('images' and 'annotations') or VQAv2 annotations")


def _coco_captions(data: dict, path: Path, root: Path) -> EvalSet:
    out = EvalSet(str(path))
    index = {}
    for n, image in enumerate(data["images"]):
        if "id" not in image or "file_name" not in image:
            raise ValueError(f"{path}: images[{n}] needs 'id' and 'file_name'")
        index[image["id"]] = len(out.images)
        out.images.append(str(root / image["file_name"]))
        out.captions.append([])
    for n, ann in enumerate(data["annotations"]):
        if "caption" not in ann:
            raise ValueError(f"{path}: annotations[{n}] has no 'caption' (only COCO caption annotations are read)")
        if ann.get("image_id") not in index:
            raise ValueError(f"{path}: annotations[{n}] names image_id {ann.get('image_id')!r}, not in 'images'")
        out.captions[index[ann["image_id"]]].append(ann["caption"])
    if not any(out.captions):
        raise ValueError(f"{path} has no captions")
    return out


def _vqav2(data: dict, path: Path, root: Path, questions: str | Path | None) -> EvalSet:
    """VQAv2: annotations (ten answers per question_id) + the questions file; images are
    COCO_<data_subtype>_<image_id, 12 digits>.jpg under `root`."""
    if questions is None:
        raise ValueError(f"{path} holds VQAv2 answers; pass its questions file too (--questions FILE)")
    qpath = Path(questions)
    try:
        asked = {q["question_id"]: q for q in json.loads(qpath.read_text(encoding="utf-8"))["questions"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{qpath}: not a VQAv2 questions file ({err})") from None
    subtype = data.get("data_subtype", "val2014")
    out = EvalSet(str(path))
    index: dict[int, int] = {}
    for n, ann in enumerate(data["annotations"]):
        q = asked.get(ann.get("question_id"))
        if q is None:
            raise ValueError(f"{path}: annotations[{n}]: question_id {ann.get('question_id')!r} is not in {qpath}")
        image_id = ann["image_id"]
        if image_id not in index:
            index[image_id] = len(out.images)
            out.images.append(str(root / f"COCO_{subtype}_{image_id:012d}.jpg"))
            out.captions.append([])
        out.questions.append(Question(index[image_id], q["question"], [a["answer"] for a in ann["answers"]]))
    return out
