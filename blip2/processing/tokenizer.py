"""The language model's tokenizer, on the `tokenizers` library, loading and saving transformers' files.

The backend comes from `tokenizer.json` when there is one; otherwise it is built the way
transformers 4.37 converts its slow tokenizers: a byte-level BPE from `vocab.json` + `merges.txt`
(GPT-2 / OPT) or a Unigram model from `spiece.model` (T5), read by a small protobuf reader so
that sentencepiece is not needed. `tokenizer_config.json`, `special_tokens_map.json` and
`added_tokens.json` then set the special tokens, added tokens, padding side and lengths, with
the reference's precedence, so ids and decoded text match its fast tokenizers.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from ..io import atomic_write, atomic_write_text
from .image import BatchFeature

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
VOCAB_FILE, MERGES_FILE, SPIECE_FILE = "vocab.json", "merges.txt", "spiece.model"
SLOW_FILES = (VOCAB_FILE, MERGES_FILE, SPIECE_FILE)
VERY_LARGE_INTEGER = int(1e30)  # "no limit", as transformers writes it
LARGE_INTEGER = int(1e20)
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token")
# tokenizer_config.json keys that the Tokenizer holds as attributes, or that only said where files were.
_NOT_KEPT = (*SPECIAL_KEYS, "additional_special_tokens", "padding_side", "truncation_side", "model_max_length",
             "max_len", "clean_up_tokenization_spaces", "extra_special_tokens", "added_tokens_decoder",
             "name_or_path", "tokenizer_file", "special_tokens_map_file", "vocab_file", "merges_file")


class BatchEncoding(BatchFeature):
    """The tokenizer's output: input_ids, attention_mask, as lists, torch tensors or NumPy arrays."""


# ---------------------------------------------------------------- spiece.model, read without sentencepiece

@dataclass
class SentencePieceModel:
    """The parts of a sentencepiece ModelProto that the conversion needs."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: int = 1  # 1 unigram, 2 BPE, 3 word, 4 char
    unk_id: int = 0
    byte_fallback: bool = False
    precompiled_charsmap: bytes = b""


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


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # negative int32s are sign-extended varints


def read_sentencepiece_model(path: str | os.PathLike) -> SentencePieceModel:
    """Pieces (field 1: piece=1, score=2, type=3), trainer_spec (2) and normalizer_spec (3) of a ModelProto."""
    buf = Path(path).read_bytes()
    model = SentencePieceModel(pieces=[])
    try:
        for number, value in _fields(buf):
            if number == 1:
                piece, score, kind = "", 0.0, 1
                for n, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                model.pieces.append((piece, score, kind))
            elif number == 2:
                for n, v in _fields(value):
                    if n == 3:
                        model.model_type = v
                    elif n == 40:
                        model.unk_id = _int32(v)
                    elif n == 35:
                        model.byte_fallback = bool(v)
            elif number == 3:
                for n, v in _fields(value):
                    if n == 2:
                        model.precompiled_charsmap = bytes(v)
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        raise ValueError(f"{path} is not a valid sentencepiece model: {err}") from None
    if not model.pieces:
        raise ValueError(f"{path} is not a valid sentencepiece model: it has no pieces")
    return model


# ---------------------------------------------------------------- backends built from slow files

def byte_level_bpe(vocab_file: Path, merges_file: Path, add_prefix_space: bool, bos: str | None) -> Backend:
    """GPT-2 / OPT byte-level BPE; with `bos`, the post-processor puts it in front (OPT's add_bos_token)."""
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    merges = []
    for number, line in enumerate(Path(merges_file).read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{merges_file} line {number}: expected two tokens, got {line!r}")
        merges.append(tuple(pair))
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    if bos is not None:
        # A bos missing from vocab.json is added next, so it gets the next id.
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, vocab.get(bos, len(vocab)))])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


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


# ---------------------------------------------------------------- reading the config files

def _added_token(value: Any, **defaults: Any) -> Any:
    """A dict (with or without transformers' "__type" tag) becomes an AddedToken; strings stay strings."""
    if isinstance(value, dict) and "content" in value:
        fields = {k: v for k, v in value.items() if k in ("content", "single_word", "lstrip", "rstrip",
                                                           "normalized", "special")}
        return AddedToken(**{**defaults, **fields})
    return value


def _convert_tagged(value: Any) -> Any:
    """Turns every {"__type": "AddedToken", ...} inside a config value into an AddedToken."""
    if isinstance(value, dict):
        if value.get("__type") == "AddedToken":
            return _added_token(value)
        return {k: _convert_tagged(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_convert_tagged(v) for v in value]
    return value


def _family(config: dict, files: dict[str, Path | None]) -> str | None:
    """'gpt2' (byte-level BPE, OPT), 't5' (sentencepiece Unigram) or None (a tokenizer.json of another kind)."""
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    if name in ("GPT2Tokenizer", "CodeGenTokenizer"):
        return "gpt2"
    if name == "T5Tokenizer":
        return "t5"
    if name:
        return None
    if files.get(SPIECE_FILE):
        return "t5"
    if files.get(VOCAB_FILE) and files.get(MERGES_FILE):
        return "gpt2"
    if files.get(TOKENIZER_FILE):
        model = json.loads(Path(files[TOKENIZER_FILE]).read_text(encoding="utf-8")).get("model", {})
        return {"BPE": "gpt2", "Unigram": "t5"}.get(model.get("type"))
    return None


_FAMILY_DEFAULTS = {
    "gpt2": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
             "add_prefix_space": False},
    "t5": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 100},
}


def _t5_special_tokens(config: dict) -> None:
    """T5 lists its `<extra_id_N>` sentinels among the additional special tokens."""
    extra_ids = int(config.get("extra_ids", 100))
    listed = list(config.get("additional_special_tokens") or [])
    sentinels = [t for t in listed if "<extra_id_" in str(t)]
    if not sentinels:
        listed += [f"<extra_id_{i}>" for i in range(extra_ids)]
    elif extra_ids > 0 and extra_ids != len(sentinels):
        raise ValueError(f"extra_ids is {extra_ids} but additional_special_tokens lists {len(sentinels)} "
                         "<extra_id_N> tokens; they must agree")
    config["additional_special_tokens"] = listed


def _read_configs(files: dict[str, Path | None]) -> tuple[dict, dict[int, AddedToken]]:
    """tokenizer_config.json merged with special_tokens_map.json / added_tokens.json / tokenizer.json's
    added tokens, with the reference's precedence; returns (config, added tokens by id)."""
    from ..hub import read_json

    config = read_json(files[CONFIG_FILE]) if files.get(CONFIG_FILE) else {}
    added: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in config:
        for index, token in config["added_tokens_decoder"].items():
            if not isinstance(token, dict) or "content" not in token:
                raise ValueError(f"{files[CONFIG_FILE]}: added_tokens_decoder[{index!r}] must be a token dict")
            added[int(index)] = _added_token(token)
    else:
        _merge_special_map(config, files)
        added.update(_legacy_added_tokens(config, files))
    config = _convert_tagged(config)
    by_text = {str(token): token for token in added.values()}
    for key in SPECIAL_KEYS:
        if config.get(key) is not None and by_text:
            config[key] = by_text.get(str(config[key]), config[key])
    return config, added


def _merge_special_map(config: dict, files: dict[str, Path | None]) -> None:
    from ..hub import read_json

    if not files.get(SPECIAL_TOKENS_FILE):
        return
    for key, value in read_json(files[SPECIAL_TOKENS_FILE]).items():
        if key == "additional_special_tokens" and isinstance(value, list):
            merged = list(config.get("additional_special_tokens") or [])
            for token in value:
                token = _added_token(token, special=True)
                if all(str(token) != str(t) for t in merged):
                    merged.append(token)
            value = merged
        else:
            value = _added_token(value, special=True)
        config[key] = value


def _legacy_added_tokens(config: dict, files: dict[str, Path | None]) -> dict[int, AddedToken]:
    """Older layouts: added_tokens.json ({token: id}) and the added_tokens list of tokenizer.json."""
    from ..hub import read_json

    added: dict[int, AddedToken] = {}
    if files.get(ADDED_TOKENS_FILE):
        specials = {str(config[k]) for k in SPECIAL_KEYS if config.get(k) is not None}
        specials |= {str(t) for t in config.get("additional_special_tokens") or []}
        for text, index in read_json(files[ADDED_TOKENS_FILE]).items():
            special = text in specials
            added[int(index)] = AddedToken(text, rstrip=False, lstrip=False, normalized=not special, special=special)
    if files.get(TOKENIZER_FILE):
        for entry in json.loads(Path(files[TOKENIZER_FILE]).read_text(encoding="utf-8")).get("added_tokens", []):
            added[int(entry["id"])] = _added_token(entry)
    return added


def load_tokenizer_json(path: Path) -> Backend:
    """tokenizer.json, also when a newer `tokenizers` wrote it than the one installed (see `_older_format`)."""
    try:
        return Backend.from_file(str(path))
    except Exception as err:  # the Rust side raises plain Exceptions
        first_error = err
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    try:
        return Backend.from_str(json.dumps(_older_format(data, path)))
    except Exception:
        raise ValueError(f"{path} could not be read by tokenizers {_tokenizers_version()}: {first_error}; "
                         "a newer tokenizers release may be needed") from None


def _tokenizers_version() -> str:
    import tokenizers

    return tokenizers.__version__


def _older_format(node: Any, path: Path) -> Any:
    """Rewrites what newer `tokenizers` releases write (BPE merges as pairs, `ignore_merges`, Metaspace
    without add_prefix_space but with `split`) in the older form, where the meaning is unchanged."""
    if isinstance(node, list):
        return [_older_format(item, path) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _older_format(value, path) for key, value in node.items()}
    if node.get("type") == "BPE":
        if node.pop("ignore_merges", False):
            raise ValueError(f"{path}: a BPE model with ignore_merges needs a newer tokenizers release")
        merges = node.get("merges") or []
        if merges and isinstance(merges[0], list):
            if any(" " in part for pair in merges for part in pair):
                raise ValueError(f"{path}: merges containing spaces need a newer tokenizers release")
            node["merges"] = [" ".join(pair) for pair in merges]
    if node.get("type") == "Metaspace":
        if node.pop("split", True) is False:
            raise ValueError(f"{path}: a Metaspace with split=false needs a newer tokenizers release")
        node.setdefault("add_prefix_space", node.get("prepend_scheme", "always") != "never")
    return node


def _build_backend(family: str | None, config: dict, files: dict[str, Path | None], where: str) -> Backend:
    if files.get(TOKENIZER_FILE):
        return load_tokenizer_json(files[TOKENIZER_FILE])
    if family == "gpt2" and files.get(VOCAB_FILE) and files.get(MERGES_FILE):
        bos = str(config["bos_token"]) if config.get("add_bos_token") and config.get("bos_token") else None
        return byte_level_bpe(files[VOCAB_FILE], files[MERGES_FILE], bool(config.get("add_prefix_space")), bos)
    if family == "t5" and files.get(SPIECE_FILE):
        spm = read_sentencepiece_model(files[SPIECE_FILE])
        legacy = config.get("legacy")
        return t5_unigram(spm, int(config.get("extra_ids", 100)), legacy is None or bool(legacy), files[SPIECE_FILE])
    raise FileNotFoundError(f"no tokenizer files for {where}: looked for {TOKENIZER_FILE}, "
                            f"{VOCAB_FILE} + {MERGES_FILE} (GPT-2/OPT BPE) and {SPIECE_FILE} (T5)")


def _as_slow_special(family: str | None, config: dict) -> None:
    """The reference passes slow-file layouts through its slow classes, which wrap plain-string special
    tokens as AddedTokens; the flags they choose end up in the backend, so mirror them."""
    for key in SPECIAL_KEYS:
        value = config.get(key)
        if not isinstance(value, str):
            continue
        if family == "gpt2" and key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            config[key] = AddedToken(value, lstrip=False, rstrip=False, normalized=True)
        elif family == "t5" and key in ("eos_token", "unk_token", "pad_token"):
            config[key] = AddedToken(value, normalized=False, special=True)


# ---------------------------------------------------------------- the tokenizer

def _ids_list(token_ids: Any, what: str = "token_ids") -> list[int]:
    if isinstance(token_ids, (torch.Tensor, np.ndarray)):
        token_ids = token_ids.tolist()
    if isinstance(token_ids, (int, np.integer)):
        token_ids = [int(token_ids)]
    if not isinstance(token_ids, (list, tuple)):
        raise TypeError(f"{what} must be an int, a list of ints or a 1-D tensor, got {type(token_ids).__name__}")
    ids = []
    for i, value in enumerate(token_ids):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{what}[{i}] is {type(value).__name__}, expected an int token id")
        if value < 0:
            raise ValueError(f"{what}[{i}] is {value}: token ids are never negative "
                             "(replace -100 label padding before decoding)")
        ids.append(int(value))
    return ids


def _texts(text: Any) -> tuple[list[str], bool]:
    """(texts, batched): a string or a non-empty list/tuple of strings; anything else is a TypeError."""
    if isinstance(text, str):
        return [text], False
    if isinstance(text, (list, tuple)):
        if not text:
            raise ValueError("text is an empty list")
        for i, item in enumerate(text):
            if not isinstance(item, str):
                raise TypeError(f"text[{i}] is {type(item).__name__}, expected str")
        return list(text), True
    raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")


def clean_up_tokenization(text: str) -> str:
    """Removes the spaces a word-piece decode leaves before punctuation and English contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


class Tokenizer:
    """A fast tokenizer with the parts of transformers' API that BLIP-2 users call.

    Build one with `Tokenizer.from_pretrained(dir_or_hub_id)`, or wrap a `tokenizers.Tokenizer`
    directly: `Tokenizer(backend, bos_token=..., eos_token=..., pad_token=...)`.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, backend: Backend, *, bos_token=None, eos_token=None, unk_token=None, sep_token=None,
                 pad_token=None, cls_token=None, mask_token=None, additional_special_tokens: Iterable = (),
                 padding_side: str = "right", truncation_side: str = "right",
                 model_max_length: int | None = None, clean_up_tokenization_spaces: bool = True,
                 added_tokens: dict[int, AddedToken] | None = None, config: dict | None = None,
                 extra_special_tokens: dict[str, str] | None = None) -> None:
        self._backend = backend
        self._lock = threading.Lock()  # the backend's padding/truncation settings are per call
        self._special: dict[str, Any] = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                                             sep_token=sep_token, pad_token=pad_token, cls_token=cls_token,
                                             mask_token=mask_token)
        self._additional = list(additional_special_tokens or [])
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.extra_special_tokens = dict(extra_special_tokens or {})
        self.config = dict(config or {})  # other tokenizer_config.json keys, written back on save
        self._slow_files: dict[str, Path] = {}
        self.name_or_path = ""
        self._register_tokens(added_tokens or {})

    # ------------------------------------------------------------ special and added tokens
    def _register_tokens(self, added: dict[int, AddedToken]) -> None:
        """Puts the saved added tokens, then any special token not yet added, into the backend (as the
        reference does on load, so that special tokens in text are matched whole)."""
        queue = [token for _, token in sorted(added.items())]
        known = {t.content for t in self._backend.get_added_tokens_decoder().values()} | {str(t) for t in queue}
        for token in self._special_values():
            if isinstance(token, str) and token in known:
                continue
            if any(token == other for other in queue if type(other) is type(token)):
                continue
            queue.append(token)
        specials = set(self.all_special_tokens)
        run: list = []
        run_special = None
        for token in queue:
            special = (token.special or str(token) in specials) if isinstance(token, AddedToken) else token in specials
            if run and special != run_special:
                self._add(run, run_special)
                run = []
            run.append(token)
            run_special = special
        if run:
            self._add(run, run_special)

    def _add(self, tokens: list, special: bool) -> int:
        return self._backend.add_special_tokens(tokens) if special else self._backend.add_tokens(tokens)

    def _special_values(self) -> list:
        """Every set special token (str or AddedToken) once, in transformers' attribute order."""
        seen, values = set(), []
        for value in [*self._special.values(), *self._additional]:
            if value is not None and str(value) not in seen:
                seen.add(str(value))
                values.append(value)
        return values

    @property
    def all_special_tokens(self) -> list[str]:
        return [str(v) for v in self._special_values()]

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: str(v) for k, v in self._special.items() if v is not None}
        if self._additional:
            out["additional_special_tokens"] = [str(t) for t in self._additional]
        return out

    @property
    def additional_special_tokens(self) -> list[str]:
        return [str(t) for t in self._additional]

    def add_tokens(self, new_tokens: str | AddedToken | list, special_tokens: bool = False) -> int:
        """Adds tokens to the vocabulary; returns the count `tokenizers` reports (as transformers does, it
        includes tokens re-added with other flags)."""
        tokens = new_tokens if isinstance(new_tokens, (list, tuple)) else [new_tokens]
        for i, token in enumerate(tokens):
            if not isinstance(token, (str, AddedToken)):
                raise TypeError(f"new_tokens[{i}] is {type(token).__name__}, expected str or AddedToken")
        return self._add(list(tokens), special_tokens)

    def add_special_tokens(self, special_tokens_dict: dict[str, Any],
                           replace_additional_special_tokens: bool = True) -> int:
        """Sets bos/eos/unk/sep/pad/cls/mask tokens or additional_special_tokens and adds them to the vocabulary."""
        to_add = []
        for key, value in special_tokens_dict.items():
            if key == "additional_special_tokens":
                values = list(value) if isinstance(value, (list, tuple)) else [value]
                if replace_additional_special_tokens:
                    self._additional = values
                else:
                    self._additional += [v for v in values if str(v) not in self.additional_special_tokens]
                to_add += values
            elif key in SPECIAL_KEYS:
                if not isinstance(value, (str, AddedToken)):
                    raise TypeError(f"{key} must be a str or AddedToken, got {type(value).__name__}")
                if isinstance(value, str):
                    value = AddedToken(value, rstrip=False, lstrip=False, normalized=False, special=True)
                self._special[key] = value
                to_add.append(value)
            else:
                raise ValueError(f"unknown special token key {key!r}; use one of {SPECIAL_KEYS} "
                                 "or additional_special_tokens")
        return self._add(to_add, True)

    def __getattr__(self, name: str):
        # bos_token / bos_token_id and friends, plus extra named tokens such as image_token.
        special = self.__dict__.get("_special", {})
        if name in special:
            value = special[name]
            return None if value is None else str(value)
        if name.endswith("_id") and name[:-3] in special:
            value = special[name[:-3]]
            return None if value is None else self.convert_tokens_to_ids(str(value))
        extra = self.__dict__.get("extra_special_tokens", {})
        if name in extra:
            return extra[name]
        if name.endswith("_id") and name[:-3] in extra:
            return self.convert_tokens_to_ids(extra[name[:-3]])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SPECIAL_KEYS:
            if value is not None and not isinstance(value, (str, AddedToken)):
                raise TypeError(f"{name} must be a str, an AddedToken or None, got {type(value).__name__}")
            self._special[name] = value
            return
        if name in ("padding_side", "truncation_side") and value not in ("left", "right"):
            raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
        object.__setattr__(self, name, value)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ vocabulary
    @property
    def backend_tokenizer(self) -> Backend:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (as in transformers)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(sorted(self._backend.get_added_tokens_decoder().items()))

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Token string(s) to id(s); unknown tokens map to the unk id."""
        if isinstance(tokens, str):
            index = self._backend.token_to_id(tokens)
            if index is None and self._special["unk_token"] is not None:
                index = self._backend.token_to_id(str(self._special["unk_token"]))
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False):
        if isinstance(ids, (int, np.integer)):
            return self._backend.id_to_token(int(ids))
        specials = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(i) for i in _ids_list(ids, "ids") if i not in specials]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        _texts(text)
        return self._backend.encode(text, add_special_tokens=add_special_tokens).tokens

    # ------------------------------------------------------------ encoding
    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, add_special_tokens: bool = True,
                 return_tensors: str | None = None, return_attention_mask: bool | None = None,
                 pad_to_multiple_of: int | None = None, return_token_type_ids: bool | None = None,
                 return_length: bool = False, stride: int = 0, verbose: bool = True) -> BatchEncoding:
        """input_ids and attention_mask for one string (unbatched lists) or a list of strings.

        padding: False, True / "longest" or "max_length"; truncation: True / "longest_first" / "only_first"
        to max_length (default: model_max_length); return_tensors: None, "pt" or "np".
        """
        texts, batched = _texts(text)
        if stride:
            raise ValueError("stride (overflowing windows) is not supported")
        pad, truncate, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of)
        with self._lock:
            if truncate:
                self._backend.enable_truncation(max_length, stride=0, strategy="longest_first",
                                                direction=self.truncation_side)
            else:
                self._backend.no_truncation()
            if pad:
                self._backend.enable_padding(length=max_length if pad == "max_length" else None,
                                             direction=self.padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                                             pad_token=self.pad_token, pad_to_multiple_of=pad_to_multiple_of)
            else:
                self._backend.no_padding()
            try:
                encodings = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            except Exception as err:  # e.g. max_length smaller than the special tokens it must keep
                raise ValueError(f"could not encode the text: {err}") from None
        data: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_attention_mask is not False:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if return_token_type_ids:
            data["token_type_ids"] = [e.type_ids for e in encodings]
        if return_length:
            data["length"] = [len(e.ids) for e in encodings]
        if not batched and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data).convert_to_tensors(return_tensors)

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of):
        """(padding None|"longest"|"max_length", truncate, max_length), by the reference's rules."""
        if max_length is not None and (not isinstance(max_length, int) or max_length < 0):
            raise ValueError(f"max_length must be a non-negative int, got {max_length!r}")
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # the reference's legacy default: a max_length alone truncates
        pads = {False: None, None: None, "do_not_pad": None, True: "longest", "longest": "longest",
                "max_length": "max_length"}
        truncations = {None: False, False: False, "do_not_truncate": False, True: True, "longest_first": True,
                       "only_first": True}
        if not isinstance(padding, (bool, str, type(None))) or padding not in pads:
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if not isinstance(truncation, (bool, str, type(None))) or truncation not in truncations:
            raise ValueError(f"truncation must be True, False, 'longest_first' or 'only_first', got {truncation!r}")
        pad, truncate = pads[padding], truncations[truncation]
        if max_length is None:
            if pad == "max_length":
                if self.model_max_length > LARGE_INTEGER:
                    pad = None  # no predefined maximum: nothing to pad to
                else:
                    max_length = self.model_max_length
            if truncate:
                if self.model_max_length > LARGE_INTEGER:
                    truncate = False
                else:
                    max_length = self.model_max_length
        if pad and (self._special["pad_token"] is None or self.pad_token_id is None):
            raise ValueError("asked to pad but the tokenizer has no pad token; set tokenizer.pad_token "
                             "(for example to tokenizer.eos_token)")
        if truncate and pad and pad_to_multiple_of and max_length is not None and max_length % pad_to_multiple_of:
            raise ValueError(f"truncation length {max_length} is not a multiple of pad_to_multiple_of "
                             f"{pad_to_multiple_of}")
        return pad, truncate, max_length

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        """The ids of one string."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        return self(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    # ------------------------------------------------------------ decoding
    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text for a sequence of ids; `skip_special_tokens` drops tokens such as `</s>` and `<pad>`."""
        text = self._backend.decode(_ids_list(token_ids), skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        if isinstance(sequences, (torch.Tensor, np.ndarray)):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in sequences]

    # ------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> "Tokenizer":
        """Loads from a directory, a Hugging Face cache snapshot or the hub (revision, cache_dir,
        local_files_only, token); other kwargs override tokenizer_config.json keys."""
        from ..hub import ModelNotFoundError, resolve_file

        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
        names = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, ADDED_TOKENS_FILE, *SLOW_FILES)
        files = {name: resolve_file(name_or_path, name, required=False, **hub) for name in names}
        if not any(files.values()):
            try:
                resolve_file(name_or_path, TOKENIZER_FILE, **hub)  # raises, saying where it looked
            except ModelNotFoundError as err:
                raise ModelNotFoundError(f"no tokenizer files for {os.fspath(name_or_path)!r} ({TOKENIZER_FILE}, "
                                         f"{VOCAB_FILE} + {MERGES_FILE} or {SPIECE_FILE}): {err}") from None
        tokenizer = cls.from_files(files, where=os.fspath(name_or_path), **kwargs)
        tokenizer.name_or_path = os.fspath(name_or_path)
        return tokenizer

    @classmethod
    def from_files(cls, files: dict[str, Path | None], where: str = "the tokenizer", **overrides: Any) -> "Tokenizer":
        """Builds a tokenizer from already-located files (keys: the standard file names)."""
        config, added = _read_configs(files)
        config.update(overrides)
        family = _family(config, files)
        for key, value in _FAMILY_DEFAULTS.get(family, {}).items():
            config.setdefault(key, value)
        if family == "t5":
            _t5_special_tokens(config)
        backend = _build_backend(family, config, files, where)
        if not files.get(TOKENIZER_FILE):
            _as_slow_special(family, config)
        elif family == "gpt2":
            _match_prefix_space(backend, bool(config.get("add_prefix_space")))
        config.setdefault("tokenizer_class", _class_name(family))
        tokenizer = cls._from_config(backend, config, added)
        tokenizer._slow_files = {name: Path(files[name]) for name in SLOW_FILES if files.get(name)}
        return tokenizer

    @classmethod
    def _from_config(cls, backend: Backend, config: dict, added: dict[int, AddedToken]) -> "Tokenizer":
        _defaults_from_backend(backend, config)
        kept = {k: v for k, v in config.items() if k not in _NOT_KEPT}
        extra = config.get("extra_special_tokens")
        additional = list(config.get("additional_special_tokens") or [])
        if isinstance(extra, list):  # transformers 5 renamed additional_special_tokens to this list
            additional += [t for t in extra if str(t) not in {str(a) for a in additional}]
        return cls(backend, **{k: config.get(k) for k in SPECIAL_KEYS},
                   additional_special_tokens=additional,
                   padding_side=config.get("padding_side") or "right",
                   truncation_side=config.get("truncation_side") or "right",
                   model_max_length=config.get("model_max_length", config.get("max_len")),
                   clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", True),
                   added_tokens=added, config=kept, extra_special_tokens=extra if isinstance(extra, dict) else None)

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json (plus the slow
        vocabulary files it was loaded from) in a form transformers 4.37 loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = [directory / TOKENIZER_FILE, directory / CONFIG_FILE, directory / SPECIAL_TOKENS_FILE]
        with self._lock:
            self._backend.no_padding()
            self._backend.no_truncation()
            text = self._backend.to_str(pretty=True)
        atomic_write_text(written[0], text)
        atomic_write_text(written[1], json_text(self._config_to_save()))
        atomic_write_text(written[2], json_text(self._special_map_to_save()))
        for name, source in self._slow_files.items():
            if source.resolve() != (directory / name).resolve():
                atomic_write(directory / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
            written.append(directory / name)
        beyond = {t.content: i for i, t in self.added_tokens_decoder.items() if i >= self.vocab_size}
        if self._slow_files and beyond:
            atomic_write_text(directory / ADDED_TOKENS_FILE, json_text(beyond))
            written.append(directory / ADDED_TOKENS_FILE)
        return written

    def _config_to_save(self) -> dict:
        config = dict(self.config)
        config.update(model_max_length=self.model_max_length,
                      clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
                      padding_side=self.padding_side)
        if self.truncation_side != "right":
            config["truncation_side"] = self.truncation_side
        config.update(self.special_tokens_map)
        if self.extra_special_tokens:
            config["extra_special_tokens"] = dict(self.extra_special_tokens)
        config["added_tokens_decoder"] = {str(i): _token_dict(t, with_special=True)
                                          for i, t in self.added_tokens_decoder.items()}
        config["tokenizer_class"] = self.config.get("tokenizer_class") or "PreTrainedTokenizerFast"
        return config

    def _special_map_to_save(self) -> dict:
        out: dict[str, Any] = {}
        for key, value in self._special.items():
            if value is not None:
                out[key] = _token_dict(value, with_special=False) if isinstance(value, AddedToken) else value
        if self._additional:
            out["additional_special_tokens"] = [
                _token_dict(t, with_special=False) if isinstance(t, AddedToken) else t for t in self._additional]
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"added={len(self) - self.vocab_size}, padding_side={self.padding_side!r}, "
                f"special_tokens={self.special_tokens_map})")


# ---------------------------------------------------------------- small helpers

def json_text(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _token_dict(token: AddedToken, with_special: bool) -> dict:
    data = {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
            "rstrip": token.rstrip, "single_word": token.single_word}
    if with_special:
        data["special"] = token.special
    return data


def _class_name(family: str | None) -> str:
    return {"gpt2": "GPT2Tokenizer", "t5": "T5Tokenizer"}.get(family, "PreTrainedTokenizerFast")


def _match_prefix_space(backend: Backend, add_prefix_space: bool) -> None:
    """GPT-2's fast tokenizer rebuilds a ByteLevel pre-tokenizer whose add_prefix_space disagrees with the config."""
    if backend.pre_tokenizer is None:
        return
    state = json.loads(backend.pre_tokenizer.__getstate__())
    if state.get("type") == "ByteLevel" and state.get("add_prefix_space", add_prefix_space) != add_prefix_space:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space,
                                                         use_regex=state.get("use_regex", True))


def _defaults_from_backend(backend: Backend, config: dict) -> None:
    """A tokenizer.json saved with padding or truncation on supplies defaults, as in transformers."""
    if backend.truncation is not None:
        config.setdefault("truncation_side", backend.truncation.get("direction", "right"))
        backend.no_truncation()
    if backend.padding is not None:
        config.setdefault("pad_token", backend.padding.get("pad_token"))
        config.setdefault("padding_side", backend.padding.get("direction", "right"))
        backend.no_padding()
