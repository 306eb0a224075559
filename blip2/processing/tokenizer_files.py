"""The tokenizer's files, read and written as transformers does.

The backend comes from `tokenizer.json` when there is one (rewritten into the older format when
a newer `tokenizers` wrote it); otherwise it is built from the slow files (see `spm`).
`tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json` then set the special
tokens, added tokens, padding side and lengths, with the reference's precedence, so ids and
decoded text match its fast tokenizers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, pre_tokenizers
from tokenizers import Tokenizer as Backend

from ..io import atomic_write, atomic_write_text
from .config_io import json_text
from .spm import byte_level_bpe, read_sentencepiece_model, t5_unigram

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
VOCAB_FILE, MERGES_FILE, SPIECE_FILE = "vocab.json", "merges.txt", "spiece.model"
SLOW_FILES = (VOCAB_FILE, MERGES_FILE, SPIECE_FILE)
ALL_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, ADDED_TOKENS_FILE, *SLOW_FILES)
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys that the Tokenizer holds as attributes, or that only said where files were.
_NOT_KEPT = (*SPECIAL_KEYS, "additional_special_tokens", "padding_side", "truncation_side", "model_max_length",
             "max_len", "clean_up_tokenization_spaces", "extra_special_tokens", "added_tokens_decoder",
             "name_or_path", "tokenizer_file", "special_tokens_map_file", "vocab_file", "merges_file")
_FAMILY_DEFAULTS = {
    "gpt2": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
             "add_prefix_space": False},
    "t5": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 100},
}


def find_tokenizer_files(name_or_path: str | os.PathLike, **hub: Any) -> dict[str, Path | None]:
    """Each of `ALL_FILES` in a directory, a Hugging Face cache snapshot or the hub (None where absent)."""
    from ..hub import ModelNotFoundError, resolve_file

    files = {name: resolve_file(name_or_path, name, required=False, **hub) for name in ALL_FILES}
    if not any(files.values()):
        try:
            resolve_file(name_or_path, TOKENIZER_FILE, **hub)  # raises, saying where it looked
        except ModelNotFoundError as err:
            raise ModelNotFoundError(f"no tokenizer files for {os.fspath(name_or_path)!r} ({TOKENIZER_FILE}, "
                                     f"{VOCAB_FILE} + {MERGES_FILE} or {SPIECE_FILE}): {err}") from None
    return files


def read_tokenizer_files(files: dict[str, Path | None], where: str,
                         overrides: dict[str, Any]) -> tuple[Backend, dict[str, Any]]:
    """The backend and the Tokenizer's keyword arguments; `overrides` replace tokenizer_config.json keys."""
    config, added = _read_configs(files)
    config.update(overrides)
    family = _with_family_defaults(config, files)
    backend = _build_backend(family, config, files, where)
    if not files.get(TOKENIZER_FILE):
        _as_slow_special(family, config)
    elif family == "gpt2":
        _match_prefix_space(backend, bool(config.get("add_prefix_space")))
    config.setdefault("tokenizer_class", _class_name(family))
    _defaults_from_backend(backend, config)
    return backend, _tokenizer_arguments(config, added)


def slow_files(files: dict[str, Path | None]) -> dict[str, Path]:
    """The slow vocabulary files among `files`, which save_pretrained copies along."""
    return {name: Path(files[name]) for name in SLOW_FILES if files.get(name)}


# ---------------------------------------------------------------- tokenizer_config.json and its companions

def _read_configs(files: dict[str, Path | None]) -> tuple[dict, dict[int, AddedToken]]:
    """tokenizer_config.json merged with special_tokens_map.json / added_tokens.json / tokenizer.json's
    added tokens, with the reference's precedence; returns (config, added tokens by id)."""
    from ..hub import read_json

    config = read_json(files[CONFIG_FILE]) if files.get(CONFIG_FILE) else {}
    if "added_tokens_decoder" in config:
        added = _added_tokens_decoder(config, files[CONFIG_FILE])
    else:
        _merge_special_map(config, files)
        added = _legacy_added_tokens(config, files)
    config = _convert_tagged(config)
    by_text = {str(token): token for token in added.values()}
    for key in SPECIAL_KEYS:
        if config.get(key) is not None and by_text:
            config[key] = by_text.get(str(config[key]), config[key])
    return config, added


def _added_tokens_decoder(config: dict, source: Path) -> dict[int, AddedToken]:
    added: dict[int, AddedToken] = {}
    for index, token in config["added_tokens_decoder"].items():
        if not isinstance(token, dict) or "content" not in token:
            raise ValueError(f"{source}: added_tokens_decoder[{index!r}] must be a token dict")
        added[int(index)] = _added_token(token)
    return added


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
        for entry in read_json(files[TOKENIZER_FILE]).get("added_tokens") or []:
            added[int(entry["id"])] = _added_token(entry)
    return added


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


def _tokenizer_arguments(config: dict, added: dict[int, AddedToken]) -> dict[str, Any]:
    extra = config.get("extra_special_tokens")
    additional = list(config.get("additional_special_tokens") or [])
    if isinstance(extra, list):  # transformers 5 renamed additional_special_tokens to this list
        additional += [t for t in extra if str(t) not in {str(a) for a in additional}]
    return dict(**{k: config.get(k) for k in SPECIAL_KEYS},
                additional_special_tokens=additional,
                padding_side=config.get("padding_side") or "right",
                truncation_side=config.get("truncation_side") or "right",
                model_max_length=config.get("model_max_length", config.get("max_len")),
                clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", True),
                added_tokens=added, config={k: v for k, v in config.items() if k not in _NOT_KEPT},
                extra_special_tokens=extra if isinstance(extra, dict) else None)


# ---------------------------------------------------------------- the tokenizer family and its backend

def _with_family_defaults(config: dict, files: dict[str, Path | None]) -> str | None:
    """Fills in the family's default special tokens; returns the family (see `_family`)."""
    family = _family(config, files)
    for key, value in _FAMILY_DEFAULTS.get(family, {}).items():
        config.setdefault(key, value)
    if family == "t5":
        _t5_special_tokens(config)
    return family


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
        from ..hub import read_json

        model = read_json(files[TOKENIZER_FILE]).get("model")
        return {"BPE": "gpt2", "Unigram": "t5"}.get(model.get("type")) if isinstance(model, dict) else None
    return None


def _class_name(family: str | None) -> str:
    return {"gpt2": "GPT2Tokenizer", "t5": "T5Tokenizer"}.get(family, "PreTrainedTokenizerFast")


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


# ---------------------------------------------------------------- tokenizer.json from newer tokenizers releases

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
        _older_bpe(node, path)
    if node.get("type") == "Metaspace":
        if node.pop("split", True) is False:
            raise ValueError(f"{path}: a Metaspace with split=false needs a newer tokenizers release")
        node.setdefault("add_prefix_space", node.get("prepend_scheme", "always") != "never")
    return node


def _older_bpe(node: dict, path: Path) -> None:
    if node.pop("ignore_merges", False):
        raise ValueError(f"{path}: a BPE model with ignore_merges needs a newer tokenizers release")
    merges = node.get("merges") or []
    if merges and isinstance(merges[0], list):
        if any(" " in part for pair in merges for part in pair):
            raise ValueError(f"{path}: merges containing spaces need a newer tokenizers release")
        node["merges"] = [" ".join(pair) for pair in merges]


# ---------------------------------------------------------------- writing

def write_tokenizer_files(directory: Path, backend_text: str, config: dict, special_map: dict,
                          slow: dict[str, Path], added_beyond: dict[str, int]) -> list[Path]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, then copies of the slow files; with
    those, added_tokens.json holds the added tokens past their vocabulary (`added_beyond`: {token: id})."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / TOKENIZER_FILE, directory / CONFIG_FILE, directory / SPECIAL_TOKENS_FILE]
    atomic_write_text(written[0], backend_text)
    atomic_write_text(written[1], json_text(config))
    atomic_write_text(written[2], json_text(special_map))
    for name, source in slow.items():
        if source.resolve() != (directory / name).resolve():
            atomic_write(directory / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
        written.append(directory / name)
    if slow and added_beyond:
        atomic_write_text(directory / ADDED_TOKENS_FILE, json_text(added_beyond))
        written.append(directory / ADDED_TOKENS_FILE)
    return written


def saved_config(tokenizer: Any) -> dict:
    """tokenizer_config.json for a Tokenizer: its kept keys, settings, special and added tokens."""
    config = dict(tokenizer.config)
    config.update(model_max_length=tokenizer.model_max_length,
                  clean_up_tokenization_spaces=tokenizer.clean_up_tokenization_spaces,
                  padding_side=tokenizer.padding_side)
    if tokenizer.truncation_side != "right":
        config["truncation_side"] = tokenizer.truncation_side
    config.update(tokenizer.special_tokens_map)
    if tokenizer.extra_special_tokens:
        config["extra_special_tokens"] = dict(tokenizer.extra_special_tokens)
    config["added_tokens_decoder"] = {str(i): _token_dict(t, with_special=True)
                                      for i, t in tokenizer.added_tokens_decoder.items()}
    config["tokenizer_class"] = tokenizer.config.get("tokenizer_class") or "PreTrainedTokenizerFast"
    return config


def saved_special_map(special: dict[str, Any], additional: list) -> dict:
    """special_tokens_map.json: the set special tokens (AddedTokens with their flags) and the additional ones."""
    out: dict[str, Any] = {key: _token_or_text(value) for key, value in special.items() if value is not None}
    if additional:
        out["additional_special_tokens"] = [_token_or_text(t) for t in additional]
    return out


def _token_or_text(token: Any) -> Any:
    return _token_dict(token, with_special=False) if isinstance(token, AddedToken) else token


def _token_dict(token: AddedToken, with_special: bool) -> dict:
    data = {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
            "rstrip": token.rstrip, "single_word": token.single_word}
    if with_special:
        data["special"] = token.special
    return data
