"""`tokenizers` backends built from slow-tokenizer files, as transformers 4.37 converts them.

GPT-2 / OPT: a byte-level BPE from `vocab.json` + `merges.txt`. T5: a Unigram model from
`spiece.model`, read by the small protobuf reader below so that sentencepiece is not needed.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

# ---------------------------------------------------------------- spiece.model, read without sentencepiece


@dataclass
class SentencePieceModel:
    """The parts of a sentencepiece ModelProto that the conversion needs."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: int = 1  # 1 unigram, 2 BPE, 3 word, 4 char
    unk_id: int = 0
    precompiled_charsmap: bytes = b""


def read_sentencepiece_model(path: str | os.PathLike) -> SentencePieceModel:
    """Pieces (field 1), trainer_spec (2) and normalizer_spec (3) of a ModelProto."""
    model = SentencePieceModel(pieces=[])
    try:
        for number, value in _fields(Path(path).read_bytes()):
            if number == 1:
                model.pieces.append(_piece(value))
            elif number == 2:
                _read_trainer_spec(value, model)
            elif number == 3:
                _read_normalizer_spec(value, model)
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        raise ValueError(f"{path} is not a valid sentencepiece model: {err}") from None
    if not model.pieces:
        raise ValueError(f"{path} is not a valid sentencepiece model: it has no pieces")
    return model


def _piece(message: bytes) -> tuple[str, float, int]:
    """A SentencePiece message: piece (field 1), score (2, a float32), type (3)."""
    piece, score, kind = "", 0.0, 1
    for number, value in _fields(message):
        if number == 1:
            piece = value.decode("utf-8")
        elif number == 2:
            score = struct.unpack("<f", value)[0]
        elif number == 3:
            kind = value
    return piece, score, kind


def _read_trainer_spec(message: bytes, model: SentencePieceModel) -> None:
    """model_type (field 3) and unk_id (40) of a TrainerSpec."""
    for number, value in _fields(message):
        if number == 3:
            model.model_type = value
        elif number == 40:
            model.unk_id = _int32(value)


def _read_normalizer_spec(message: bytes, model: SentencePieceModel) -> None:
    """precompiled_charsmap (field 2) of a NormalizerSpec."""
    for number, value in _fields(message):
        if number == 2:
            model.precompiled_charsmap = bytes(value)


def _fields(buf: bytes):
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("message ends inside a field")
        yield number, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # negative int32s are sign-extended varints


# ---------------------------------------------------------------- the backends


def byte_level_bpe(vocab_file: Path, merges_file: Path, add_prefix_space: bool, bos: str | None) -> Backend:
    """GPT-2 / OPT byte-level BPE; with `bos`, the post-processor puts it in front (OPT's add_bos_token)."""
    from ..hub import read_json

    vocab = read_json(vocab_file)
    backend = Backend(models.BPE(vocab=vocab, merges=_read_merges(merges_file), dropout=None,
                                 continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    if bos is not None:
        # A bos missing from vocab.json is added next, so it gets the next id.
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, vocab.get(bos, len(vocab)))])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _read_merges(merges_file: Path) -> list[tuple[str, str]]:
    """The pairs of merges.txt, one a line, after an optional `#version` header."""
    merges = []
    for number, line in enumerate(Path(merges_file).read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{merges_file} line {number}: expected two tokens, got {line!r}")
        merges.append(tuple(pair))
    return merges


def t5_unigram(spm: SentencePieceModel, extra_ids: int, legacy: bool, source: Path) -> Backend:
    """T5's Unigram model: sentencepiece pieces, then `<extra_id_N>` (highest N first), `</s>` appended."""
    if spm.model_type != 1:
        raise ValueError(f"{source}: only Unigram sentencepiece models can be converted (model_type "
                         f"{spm.model_type}); provide a tokenizer.json instead")
    vocab = [(piece, score) for piece, score, _ in spm.pieces]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    backend = Backend(models.Unigram(vocab, spm.unk_id))
    steps = [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    if spm.precompiled_charsmap:
        steps.insert(0, normalizers.Precompiled(spm.precompiled_charsmap))
    backend.normalizer = normalizers.Sequence(steps)
    # legacy=False only prefixes "▁" to the first piece of text, not after every special token.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", add_prefix_space=True,
                                                     prepend_scheme="always" if legacy else "first")
    backend.decoder = decoders.Metaspace(replacement="▁", add_prefix_space=True)
    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    eos_id = ids.get("</s>", spm.unk_id)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", eos_id)])
    return backend
