"""The language model's tokenizer, on the `tokenizers` library, with the parts of transformers' API
that BLIP-2 users call. Its files are read and written by `tokenizer_files`; backends built from
slow-tokenizer files come from `spm`.
"""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from .batch import BatchEncoding
from .config_io import json_text, pop_hub_kwargs
from .spm import SentencePieceModel, byte_level_bpe, read_sentencepiece_model, t5_unigram
from .tokenizer_files import (
    ADDED_TOKENS_FILE,
    CONFIG_FILE,
    MERGES_FILE,
    SLOW_FILES,
    SPECIAL_KEYS,
    SPECIAL_TOKENS_FILE,
    SPIECE_FILE,
    TOKENIZER_FILE,
    VOCAB_FILE,
    find_tokenizer_files,
    load_tokenizer_json,
    read_tokenizer_files,
    saved_config,
    saved_special_map,
    slow_files,
    write_tokenizer_files,
)

# Importable from here as before the split into spm / tokenizer_files / batch.
__all__ = [
    "ADDED_TOKENS_FILE", "CONFIG_FILE", "LARGE_INTEGER", "MERGES_FILE", "SLOW_FILES", "SPECIAL_KEYS",
    "SPECIAL_TOKENS_FILE", "SPIECE_FILE", "TOKENIZER_FILE", "VERY_LARGE_INTEGER", "VOCAB_FILE", "BatchEncoding",
    "SentencePieceModel", "Tokenizer", "byte_level_bpe", "clean_up_tokenization", "json_text",
    "load_tokenizer_json", "read_sentencepiece_model", "t5_unigram",
]

VERY_LARGE_INTEGER = int(1e30)  # "no limit", as transformers writes it
LARGE_INTEGER = int(1e20)
_PADDINGS = {False: None, None: None, "do_not_pad": None, True: "longest", "longest": "longest",
             "max_length": "max_length"}
_TRUNCATIONS = {None: False, False: False, "do_not_truncate": False, True: True, "longest_first": True,
                "only_first": True}


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

        def is_special(token: Any) -> bool:
            return (token.special or str(token) in specials) if isinstance(token, AddedToken) else token in specials

        # Consecutive tokens of one kind go in one call, so that they get ids in the queue's order.
        for special, run in itertools.groupby(queue, key=is_special):
            self._add(list(run), special)

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
                to_add += self._set_additional(value, replace_additional_special_tokens)
            elif key in SPECIAL_KEYS:
                to_add.append(self._set_special(key, value))
            else:
                raise ValueError(f"unknown special token key {key!r}; use one of {SPECIAL_KEYS} "
                                 "or additional_special_tokens")
        return self._add(to_add, True)

    def _set_additional(self, value: Any, replace: bool) -> list:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if replace:
            self._additional = values
        else:
            self._additional += [v for v in values if str(v) not in self.additional_special_tokens]
        return values

    def _set_special(self, key: str, value: Any) -> AddedToken:
        if not isinstance(value, (str, AddedToken)):
            raise TypeError(f"{key} must be a str or AddedToken, got {type(value).__name__}")
        if isinstance(value, str):
            value = AddedToken(value, rstrip=False, lstrip=False, normalized=False, special=True)
        self._special[key] = value
        return value

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
        text_list(text)
        return self._backend.encode(text, add_special_tokens=add_special_tokens).tokens

    # ------------------------------------------------------------ encoding
    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, add_special_tokens: bool = True,
                 return_tensors: str | None = None, return_attention_mask: bool | None = None,
                 pad_to_multiple_of: int | None = None, return_token_type_ids: bool | None = None,
                 return_length: bool = False, stride: int = 0, verbose: bool = True,
                 padding_side: str | None = None) -> BatchEncoding:
        """input_ids and attention_mask for one string (unbatched lists) or a list of strings.

        padding: False, True / "longest" or "max_length"; truncation: True / "longest_first" / "only_first"
        to max_length (default: model_max_length); return_tensors: None, "pt" or "np";
        padding_side: "left" or "right" for this call (default: the tokenizer's `padding_side`).
        """
        texts, batched = text_list(text)
        if stride:
            raise ValueError("stride (overflowing windows) is not supported")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
        pad, truncate, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of)
        with self._lock:
            self._configure_backend(pad, truncate, max_length, pad_to_multiple_of, padding_side or self.padding_side)
            try:
                encodings = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            except Exception as err:  # e.g. max_length smaller than the special tokens it must keep
                raise ValueError(f"could not encode the text: {err}") from None
        data = _encoding_data(encodings, return_attention_mask is not False, bool(return_token_type_ids),
                              return_length)
        if not batched and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data).convert_to_tensors(return_tensors)

    def _configure_backend(self, pad: str | None, truncate: bool, max_length: int | None,
                           pad_to_multiple_of: int | None, padding_side: str) -> None:
        if truncate:
            self._backend.enable_truncation(max_length, stride=0, strategy="longest_first",
                                            direction=self.truncation_side)
        else:
            self._backend.no_truncation()
        if pad:
            self._backend.enable_padding(length=max_length if pad == "max_length" else None,
                                         direction=padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                                         pad_token=self.pad_token, pad_to_multiple_of=pad_to_multiple_of)
        else:
            self._backend.no_padding()

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of):
        """(padding None|"longest"|"max_length", truncate, max_length), by the reference's rules."""
        pad, truncate = _parse_strategies(padding, truncation, max_length)
        if max_length is None:
            pad, truncate, max_length = self._model_max_length_default(pad, truncate)
        if pad and (self._special["pad_token"] is None or self.pad_token_id is None):
            raise ValueError("asked to pad but the tokenizer has no pad token; set tokenizer.pad_token "
                             "(for example to tokenizer.eos_token)")
        if truncate and pad and pad_to_multiple_of and max_length is not None and max_length % pad_to_multiple_of:
            raise ValueError(f"truncation length {max_length} is not a multiple of pad_to_multiple_of "
                             f"{pad_to_multiple_of}")
        return pad, truncate, max_length

    def _model_max_length_default(self, pad: str | None, truncate: bool) -> tuple[str | None, bool, int | None]:
        """Without max_length, padding to max_length and truncating use model_max_length; when that says
        "no limit" there is nothing to pad or truncate to, so both are off."""
        if self.model_max_length > LARGE_INTEGER:
            return (None if pad == "max_length" else pad), False, None
        return pad, truncate, (self.model_max_length if pad == "max_length" or truncate else None)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        """The ids of one string."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        return self(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    # ------------------------------------------------------------ decoding
    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text for a sequence of ids; `skip_special_tokens` drops tokens such as `</s>` and `<pad>`."""
        ids = _ids_list(token_ids)
        with self._lock:  # a call in another thread may be reconfiguring the backend (a server's threads)
            text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
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
        files = find_tokenizer_files(name_or_path, **pop_hub_kwargs(kwargs))
        tokenizer = cls.from_files(files, where=os.fspath(name_or_path), **kwargs)
        tokenizer.name_or_path = os.fspath(name_or_path)
        return tokenizer

    @classmethod
    def from_files(cls, files: dict[str, Path | None], where: str = "the tokenizer", **overrides: Any) -> "Tokenizer":
        """Builds a tokenizer from already-located files (keys: the standard file names)."""
        backend, arguments = read_tokenizer_files(files, where, overrides)
        tokenizer = cls(backend, **arguments)
        tokenizer._slow_files = slow_files(files)
        return tokenizer

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json (plus the slow
        vocabulary files it was loaded from) in a form transformers 4.37 loads."""
        with self._lock:
            self._backend.no_padding()
            self._backend.no_truncation()
            backend_text = self._backend.to_str(pretty=True)
        beyond = {t.content: i for i, t in self.added_tokens_decoder.items() if i >= self.vocab_size}
        return write_tokenizer_files(Path(directory), backend_text, saved_config(self),
                                     saved_special_map(self._special, self._additional), self._slow_files, beyond)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"added={len(self) - self.vocab_size}, padding_side={self.padding_side!r}, "
                f"special_tokens={self.special_tokens_map})")


# ---------------------------------------------------------------- argument checks and small helpers

def text_list(text: Any) -> tuple[list[str], bool]:
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


def _parse_strategies(padding: Any, truncation: Any, max_length: Any) -> tuple[str | None, bool]:
    """(padding None|"longest"|"max_length", truncate) from the spellings transformers accepts."""
    if max_length is not None and (not isinstance(max_length, int) or max_length < 0):
        raise ValueError(f"max_length must be a non-negative int, got {max_length!r}")
    if max_length is not None and padding is False and truncation is None:
        truncation = True  # the reference's legacy default: a max_length alone truncates
    if not isinstance(padding, (bool, str, type(None))) or padding not in _PADDINGS:
        raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
    if not isinstance(truncation, (bool, str, type(None))) or truncation not in _TRUNCATIONS:
        raise ValueError(f"truncation must be True, False, 'longest_first' or 'only_first', got {truncation!r}")
    return _PADDINGS[padding], _TRUNCATIONS[truncation]


def _encoding_data(encodings: list, attention_mask: bool, token_type_ids: bool, length: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
    if attention_mask:
        data["attention_mask"] = [e.attention_mask for e in encodings]
    if token_type_ids:
        data["token_type_ids"] = [e.type_ids for e in encodings]
    if length:
        data["length"] = [len(e.ids) for e in encodings]
    return data


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


def clean_up_tokenization(text: str) -> str:
    """Removes the spaces a word-piece decode leaves before punctuation and English contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text
