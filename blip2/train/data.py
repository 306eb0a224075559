"""Training data: image-caption and image-question-answer records, batches, and the order
they are read in.

A dataset is a JSONL file of {"image": path, "caption": text} or {"image", "question",
"answer"} (image paths relative to the file), or a folder: `metadata.jsonl` / `data.jsonl`
inside it, or images each beside a same-named .txt caption.

Text is tokenised by any callable `texts -> list of token-id lists` (`Tokenizer` wraps a
tokenizer.json); the collates pad and truncate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..families import family
from .losses import lm_labels

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# The image normalisation of every BLIP-2 checkpoint (OpenAI CLIP's statistics).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

Tokenize = Callable[[list[str]], list[list[int]]]


# ---------------------------------------------------------------- records
def read_records(path: str | Path) -> list[dict]:
    """The records of a JSONL file or a folder, with image paths made absolute."""
    path = Path(path)
    if path.is_file():
        return _read_jsonl(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no dataset at {path}: expected a .jsonl file or a folder")
    for name in ("metadata.jsonl", "data.jsonl"):
        if (path / name).is_file():
            return _read_jsonl(path / name)
    records = []
    for image in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if caption.is_file():
            records.append({"image": str(image), "caption": caption.read_text(encoding="utf-8").strip(),
                            "source": str(caption)})
    if not records:
        raise ValueError(f"{path} holds no metadata.jsonl, data.jsonl or image + .txt caption pairs")
    return records


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON: {err}") from None
        records += _normalise(record, path.parent, f"{path}:{n}")
    if not records:
        raise ValueError(f"{path} has no records")
    return records


def _normalise(record, root: Path, where: str) -> list[dict]:
    """One input record -> its training records: one per caption when it lists several.

    A question's "answer" may be a list (VQAv2 has ten): training reads the first, evaluation
    scores against all of them ("answers")."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    image = record.get("image", record.get("image_path", record.get("file_name")))
    if image is None:
        raise ValueError(f"{where}: a record needs an 'image' path")
    out = {"image": str(root / image), "source": where}
    if "question" in record:
        answer = record.get("answers", record.get("answer"))
        answers = answer if isinstance(answer, list) else [answer]
        if answer is None or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: a question needs an 'answer' (a text or a list of texts)")
        return [{**out, "question": record["question"], "answer": answers[0], "answers": answers}]
    caption = record.get("caption", record.get("captions", record.get("text")))
    if caption is None:
        raise ValueError(f"{where}: a record needs a 'caption' (or 'question' and 'answer')")
    captions = caption if isinstance(caption, list) else [caption]
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: 'caption' must be a text or a non-empty list of texts")
    return [{**out, "caption": c} for c in captions]


# ---------------------------------------------------------------- images
class ImageTransform:
    """PIL image -> (3, size, size): RGB, bicubic resize to a square, rescale, normalise (no crop),
    as the BLIP-2 processor does; deterministic, so encoder features can be cached."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image) -> Tensor:
        import numpy as np
        from PIL import Image

        from ..processing.image import to_rgb

        image = to_rgb(image).resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


class ImageTextDataset(Dataset):
    """Records -> {"key", "pixel_values", and "caption" or "question" + "answer"}."""

    def __init__(self, records: Sequence[dict], transform: Callable) -> None:
        self.records = list(records)
        self.transform = transform

    @classmethod
    def from_path(cls, path: str | Path, image_size: int) -> "ImageTextDataset":
        records = read_records(path)
        check_images(records)
        return cls(records, ImageTransform(image_size))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        record = self.records[i]
        try:
            with Image.open(record["image"]) as image:
                pixels = self.transform(image)
        except (OSError, ValueError, SyntaxError) as err:  # what Pillow raises for missing or damaged files
            raise ValueError(f"{_where(record)}: image {record['image']} cannot be read: {err}") from None
        return {**record, "key": record["image"], "pixel_values": pixels}


def _where(record: dict) -> str:
    return record.get("source") or record["image"]


def check_images(records: Sequence[dict]) -> None:
    """Every record's image exists and has a readable header (and, for PNG and JPEG, is complete):
    checked before training, so a bad file stops the run at once, not when its batch comes up."""
    problems = [f"{_where(r)}: {r['image']}: {reason}" for r in records if (reason := image_problem(r["image"]))]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError(f"{len(problems)} image(s) of the data cannot be used{more}:\n  " + "\n  ".join(problems[:10]))


def image_problem(path: str | Path) -> str | None:
    """Why the image file cannot be used, or None; reads the header, not the pixels (PNG: its chunks'
    checksums; JPEG: the end-of-image marker), so a dataset is checked in about the time it takes to list."""
    import os

    from PIL import Image

    try:
        size = os.path.getsize(path)
    except OSError:
        return "no such file"
    if size == 0:
        return "the file is empty"
    try:
        with Image.open(path) as image:
            kind = image.format
            if image.width < 1 or image.height < 1:
                return f"no pixels ({image.width}x{image.height})"
            if kind == "PNG":
                image.verify()  # chunk checksums, through to the end of the file
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for damaged files; all mean unusable
        return f"not a readable image ({type(err).__name__}: {err})"
    if kind == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, size - 64))
            if b"\xff\xd9" not in f.read():
                return "truncated (no JPEG end-of-image marker)"
    return None


# ---------------------------------------------------------------- text
class Tokenizer:
    """A tokenizer as a `Tokenize` callable: a model's tokenizer folder (read by
    `blip2.processing`, special tokens and all) or a bare tokenizer.json."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir() and (path / "tokenizer_config.json").is_file():
            from ..processing import Tokenizer as FolderTokenizer

            tok = FolderTokenizer.from_pretrained(path)
            self._encode = lambda texts: list(tok(texts)["input_ids"])
            self._vocab = tok.get_vocab()
        else:
            from tokenizers import Tokenizer as FileTokenizer

            tok = FileTokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
            self._encode = lambda texts: [e.ids for e in tok.encode_batch(texts)]
            self._vocab = tok.get_vocab(with_added_tokens=True)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._encode(texts)]

    def token_id(self, token: str) -> int | None:
        return self._vocab.get(token)


def pad(seqs: list[list[int]], pad_id: int, max_len: int, to_max: bool = False) -> tuple[Tensor, Tensor]:
    """Right-pads (and truncates) token lists -> input_ids, attention_mask, both (B, T)."""
    seqs = [s[:max_len] for s in seqs]
    T = max_len if to_max else max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _text_of(example: dict) -> str:
    if "caption" in example:
        return example["caption"]
    return f"{example['question']} {example['answer']}"


@dataclass
class Stage1Collate:
    """Images and captions for the Q-Former. Text is padded to `max_len` on every process, as
    the paper's code does, so hard negatives can be gathered across processes."""

    tokenize: Tokenize
    pad_id: int = 0
    max_len: int = 32

    def __call__(self, examples: list[dict]) -> dict:
        ids, mask = pad(self.tokenize([_text_of(e) for e in examples]), self.pad_id, self.max_len, to_max=True)
        return {
            "keys": [e["key"] for e in examples],
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": ids,
            "attention_mask": mask,
        }


@dataclass
class PromptedText:
    """What stage 2 reads for one record: a prompt (not learned) and the text to learn."""

    prompt: str = ""  # for captions, e.g. "a photo of"
    question_template: str = family("opt").question_template  # for question-answer records
    suffix: str = "\n"  # OPT's end of text; T5 appends its own eos

    def __post_init__(self) -> None:
        if self.question_template.count("{}") != 1:
            raise ValueError(f"data.question_template must contain {{}} exactly once, where the question goes; "
                             f"got {self.question_template!r}")

    def __call__(self, example: dict) -> tuple[str, str]:
        if "question" in example:
            # replace, not format: other braces in the template are text, never a format field
            prompt = self.question_template.replace("{}", example["question"])
            return prompt, " " + example["answer"] + self.suffix
        target = example["caption"] + self.suffix
        return self.prompt, (" " + target if self.prompt else target)


@dataclass
class DecoderLMCollate:
    """Stage 2 for a decoder-only LM (OPT): prompt + text in one sequence; labels mask the prompt."""

    tokenize: Tokenize
    pad_id: int
    max_len: int = 64
    text: PromptedText = field(default_factory=PromptedText)

    def __call__(self, examples: list[dict]) -> dict:
        pairs = [self.text(e) for e in examples]
        full = self.tokenize([p + t for p, t in pairs])
        prompt_lengths = torch.tensor([len(s) for s in self.tokenize([p for p, _ in pairs])])
        ids, mask = pad(full, self.pad_id, self.max_len)
        return {
            "keys": [e["key"] for e in examples],
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": ids,
            "attention_mask": mask,
            "labels": lm_labels(ids, mask, prompt_lengths),
        }


@dataclass
class InstructionCollate:
    """InstructBLIP stage 2: a stage-2 collate's batch plus each example's prompt (its instruction)
    for the Q-Former, in the Q-Former's own (BERT) tokens: qformer_input_ids / qformer_attention_mask."""

    collate: DecoderLMCollate | Seq2SeqLMCollate
    tokenize: Tokenize
    pad_id: int = 0
    max_len: int = 64

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        prompts = [self.collate.text(e)[0] for e in examples]
        batch["qformer_input_ids"], batch["qformer_attention_mask"] = pad(self.tokenize(prompts), self.pad_id, self.max_len)
        return batch


@dataclass
class Seq2SeqLMCollate:
    """Stage 2 for an encoder-decoder LM (T5): the prompt goes to the encoder, the text is the target."""

    tokenize: Tokenize
    pad_id: int
    max_len: int = 64
    text: PromptedText = field(
        default_factory=lambda: PromptedText(question_template=family("t5").question_template, suffix=""))

    def __call__(self, examples: list[dict]) -> dict:
        pairs = [self.text(e) for e in examples]
        ids, mask = pad(self.tokenize([p for p, _ in pairs]), self.pad_id, self.max_len)
        target, target_mask = pad(self.tokenize([t.strip() for _, t in pairs]), self.pad_id, self.max_len)
        return {
            "keys": [e["key"] for e in examples],
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": ids,
            "attention_mask": mask,
            "decoder_attention_mask": target_mask,
            "labels": target.masked_fill(target_mask == 0, -100),
        }


# ---------------------------------------------------------------- order
class ShardedBatches(Sampler):
    """Batches of indices for this process, resumable at any batch.

    Each epoch shuffles all indices with seed + epoch; global batch b is the slice
    [b*N, (b+1)*N) of that order (N = world * batch_size) and this process takes its rank's
    part of it, so one process with batch N reads exactly what `world` processes read together.
    The last incomplete global batch is dropped: every process sees the same shapes.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{size} examples cannot fill one global batch of {batch_size} x {world_size} processes"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world)

    def set_position(self, epoch: int, start: int) -> None:
        """The next iteration reads epoch `epoch` from batch `start`."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        N, B = self.batch_size * self.world, self.batch_size
        for b in range(self.start, self.batches_per_epoch):
            mine = order[b * N + self.rank * B : b * N + (self.rank + 1) * B]
            yield mine.tolist()
