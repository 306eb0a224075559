"""The tokenizer against transformers 4.37's fast tokenizers, in every file layout.

The tests train a small OPT-style byte-level BPE (with `tokenizers`) and a small T5-style
sentencepiece Unigram model (with sentencepiece), save them through the reference's own
tokenizer classes, and compare ids, padding, truncation and decoded text over 500+ strings.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from blip2.processing.tokenizer import Tokenizer, read_sentencepiece_model

WORDS = ("a photo of the cat dog woman man sitting on beach with two people question answer how many are "
         "there what is in picture color red blue green don't it's I'm we're they've can't ship bird").split()
UNICODE = ["café", "naïve", "日本語", "中文字", "Привет", "مرحبا", "नमस्ते", "😀", "👍🏽", "👩‍👩‍👧", "🇫🇷", "é", "ß", "Ω"]


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic training text: English words, made-up words, a little unicode, numbers."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    made_up = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    pool = list(WORDS) * 5 + made_up + UNICODE[:8]
    lines = []
    for _ in range(n):
        words = [rng.choice(pool) for _ in range(rng.randint(3, 14))]
        words = [w.capitalize() if rng.random() < 0.1 else w for w in words]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", "", " 42", " 2023."]))
    return lines


FIXED = [
    "", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", " \t \n ", "\r\n", "a  b", "a   b    c", " leading",
    "trailing ", "  both  ", "line1\nline2", "line1\n\nline2\n", "tab\tseparated\tvalues",
    "don't stop", "it 's fine", "hello , world .", "what ? why !", "I 'm here , we 're there , they 've gone",
    "can n't", " ' quoted ' ", "Question: how many cats are there? Answer:", "Question: what is this? Short answer:",
    "a photo of", "<image>", "<image><image> a photo", "hello</s>world", "</s>", "</s></s>", " </s> ",
    "<pad>", "<pad><pad>text", "<s>", "<unk>", "<extra_id_0>", "<extra_id_0> and <extra_id_1>", " <extra_id_3> x",
    "<|endoftext|>", "text<|endoftext|>more", "😀", "😀😀😀", "👩‍👩‍👧‍👦 family", "🇫🇷🇩🇪🇯🇵", "👍🏽👍🏿",
    "café naïve résumé", "日本語のテキスト", "中文 字符", "Привет мир", "مرحبا بالعالم", "नमस्ते दुनिया",
    "ﬁ ligature", "Ｆｕｌｌｗｉｄｔｈ", "e\u0301 combining", "zero\u200bwidth", "\u00a0nbsp\u00a0", "a\u2028b",
    "x" * 300, "🙂" * 40, "\x07bell", "mixed 123 456.789", "UPPER lower MiXeD", "end.", "...", "!!!",
    "http://example.com/a?b=c", "email@example.com", "#hashtag @user", "1+1=2", "(brackets) [square] {curly}",
]
PIECES = (list(WORDS) + UNICODE + ["😀", "🇫🇷", "👩‍👩‍👧", " ", "  ", "    ", "\n", "\n\n", "\t", "\r\n", ".", ",",
          "?", "!", "'", "n't", "'s", " .", " ,", "</s>", "<pad>", "<image>", "<extra_id_0>", "<extra_id_7>",
          "<unk>", "<s>", "2023", "42", "\u00a0", "\u200b", "ß", "İ", "ǅ", "—", "…", "“quoted”"])


def strings(n_random: int = 480, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out = list(FIXED)
    for _ in range(n_random):
        parts = [rng.choice(PIECES) for _ in range(rng.randint(1, 12))]
        joiner = rng.choice([" ", "", " ", "  ", "\n"])
        out.append(joiner.join(parts))
    return out


TEXTS = strings()


# ---------------------------------------------------------------- tokenizers saved by the reference

def train_opt_files(root: Path) -> Path:
    """vocab.json + merges.txt of a byte-level BPE with OPT's special tokens at ids 0-3."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(corpus(), trainer)
    folder = root / "raw"
    folder.mkdir(parents=True)
    raw.model.save(str(folder))
    return folder


def train_spiece(root: Path, name: str = "spiece.model", **options) -> Path:
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buffer, vocab_size=500,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2, **options)
    path = root / name
    path.write_bytes(buffer.getvalue())
    return path


def make_layouts(root: Path) -> dict[str, Path]:
    """Folders in each layout: fast (tokenizer.json and slow files), json (tokenizer.json only),
    slow (vocab+merges or spiece.model with configs), bare (only the vocabulary files)."""
    from transformers import GPT2Tokenizer, GPT2TokenizerFast, T5Tokenizer, T5TokenizerFast

    dirs: dict[str, Path] = {}
    raw = train_opt_files(root / "opt")
    slow = GPT2Tokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), bos_token="</s>", eos_token="</s>",
                         unk_token="</s>", pad_token="<pad>", add_bos_token=True)
    slow.save_pretrained(str(root / "opt_slow"))
    GPT2TokenizerFast.from_pretrained(str(root / "opt_slow")).save_pretrained(str(root / "opt_fast"))
    dirs.update(opt_slow=root / "opt_slow", opt_fast=root / "opt_fast", opt_bare=raw)

    spiece = train_spiece(root)
    T5Tokenizer(str(spiece), extra_ids=10).save_pretrained(str(root / "t5_slow"))
    T5TokenizerFast.from_pretrained(str(root / "t5_slow")).save_pretrained(str(root / "t5_fast"))
    (root / "t5_bare").mkdir()
    shutil.copy(spiece, root / "t5_bare" / "spiece.model")
    T5Tokenizer(str(spiece), extra_ids=5, legacy=False).save_pretrained(str(root / "t5_nonlegacy"))
    identity = train_spiece(root, "identity.model", normalization_rule_name="identity")
    T5Tokenizer(str(identity), extra_ids=3).save_pretrained(str(root / "t5_identity"))
    dirs.update(t5_slow=root / "t5_slow", t5_fast=root / "t5_fast", t5_bare=root / "t5_bare",
                t5_nonlegacy=root / "t5_nonlegacy", t5_identity=root / "t5_identity")

    # Configs as transformers wrote them before added_tokens_decoder existed (2023 snapshots).
    old = root / "opt_old"
    shutil.copytree(root / "opt_slow", old)
    config = json.loads((old / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        config[key] = {"__type": "AddedToken", "content": config[key], "lstrip": False, "normalized": True,
                       "rstrip": False, "single_word": False}
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    (old / "added_tokens.json").write_text(json.dumps({"<image>": 800}))
    old = root / "t5_old"
    shutil.copytree(root / "t5_fast", old)
    config = json.loads((old / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    dirs.update(opt_old=root / "opt_old", t5_old=root / "t5_old")

    for family in ("opt", "t5"):
        json_only = root / f"{family}_json"
        json_only.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(root / f"{family}_fast" / name, json_only / name)
        dirs[f"{family}_json"] = json_only
    return dirs


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    return make_layouts(tmp_path_factory.mktemp("tokenizers"))


def reference(folder: Path):
    from transformers import AutoTokenizer, GPT2TokenizerFast, T5TokenizerFast

    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(folder))
    cls = T5TokenizerFast if (folder / "spiece.model").exists() else GPT2TokenizerFast
    return cls.from_pretrained(str(folder))


LAYOUTS = ["opt_fast", "opt_json", "opt_slow", "opt_bare", "opt_old", "t5_fast", "t5_json", "t5_slow", "t5_bare",
           "t5_nonlegacy", "t5_identity", "t5_old"]


def _backend_json(tokenizer) -> dict:
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["added_tokens"] = sorted(data["added_tokens"], key=lambda t: t["id"])
    data.pop("padding"), data.pop("truncation")
    return data


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("layout", LAYOUTS)
def test_backend_equals_reference(layouts, layout):
    """The whole tokenizers pipeline (model, normalizer, pre-tokenizer, added tokens) is the reference's."""
    ours, ref = Tokenizer.from_pretrained(layouts[layout]), reference(layouts[layout])
    assert _backend_json(ours) == _backend_json(ref)
    assert ours.special_tokens_map == ref.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
    assert (len(ours), ours.vocab_size) == (len(ref), ref.vocab_size)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ids_and_text_equal_reference(layouts, layout):
    ours, ref = Tokenizer.from_pretrained(layouts[layout]), reference(layouts[layout])
    assert len(TEXTS) >= 500
    for special in (True, False):
        got = ours(TEXTS, add_special_tokens=special)["input_ids"]
        want = ref(TEXTS, add_special_tokens=special)["input_ids"]
        for text, a, b in zip(TEXTS, got, want):
            assert a == b, f"{layout}: ids differ for {text!r}"
    for text in TEXTS[:: 7]:
        assert ours(text) == dict(ref(text)), f"{layout}: single-string call differs for {text!r}"
        assert ours.encode(text) == ref.encode(text)
        assert ours.tokenize(text) == ref.tokenize(text)
    ids = ours(TEXTS)["input_ids"]
    for options in ({}, {"skip_special_tokens": True}, {"clean_up_tokenization_spaces": False},
                    {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}):
        got, want = ours.batch_decode(ids, **options), ref.batch_decode(ids, **options)
        for text, a, b in zip(TEXTS, got, want):
            assert a == b, f"{layout}: decode({options}) differs for {text!r}"


@pytest.mark.parametrize("layout", ["opt_fast", "opt_slow", "t5_fast", "t5_bare"])
def test_decode_of_arbitrary_ids_equals_reference(layouts, layout):
    """Random id sequences, including byte pieces that are not valid UTF-8 on their own."""
    ours, ref = Tokenizer.from_pretrained(layouts[layout]), reference(layouts[layout])
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(len(ref)) for _ in range(rng.randint(0, 20))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids
    tensor = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert ours.batch_decode(tensor) == ref.batch_decode(tensor)
    assert ours.decode(torch.tensor(5)) == ref.decode(torch.tensor(5))


@pytest.mark.parametrize("layout", ["opt_fast", "opt_slow", "t5_fast", "t5_slow"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_truncation_equal_reference(layouts, layout, side):
    ours, ref = Tokenizer.from_pretrained(layouts[layout]), reference(layouts[layout])
    ours.padding_side = ref.padding_side = side
    ours.truncation_side = ref.truncation_side = side
    cases = [dict(padding=True), dict(padding="longest"), dict(padding=True, truncation=True, max_length=6),
             dict(padding="max_length", max_length=24, truncation=True), dict(max_length=5),
             dict(padding=True, pad_to_multiple_of=8), dict(padding=True, add_special_tokens=False),
             dict(truncation=True, max_length=3, add_special_tokens=True)]
    for start in range(0, 160, 16):
        batch = TEXTS[start:start + 16]
        for options in cases:
            assert dict(ours(batch, **options)) == dict(ref(batch, **options)), (options, batch)
        got = ours(batch, padding=True, return_tensors="pt")
        want = ref(batch, padding=True, return_tensors="pt")
        assert torch.equal(got.input_ids, want["input_ids"]) and torch.equal(got.attention_mask, want["attention_mask"])
        assert got.input_ids.dtype == torch.long
    single = ours("a photo of", return_tensors="np")
    assert single["input_ids"].shape == ref("a photo of", return_tensors="np")["input_ids"].shape


def test_opt_prepends_eos_as_bos(layouts):
    """OPT tokenizers put `</s>` (id 2) in front, as BOS."""
    tok = Tokenizer.from_pretrained(layouts["opt_fast"])
    assert tok.bos_token == "</s>" and tok.bos_token_id == 2
    assert tok("a photo of").input_ids[0] == 2
    assert tok("a photo of", add_special_tokens=False).input_ids[0] != 2


def test_t5_appends_eos(layouts):
    tok = Tokenizer.from_pretrained(layouts["t5_fast"])
    ids = tok("a photo of").input_ids
    assert ids[-1] == tok.eos_token_id == 1
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1


# ---------------------------------------------------------------- save and reload

@pytest.mark.parametrize("layout", ["opt_slow", "opt_json", "t5_slow", "t5_bare"])
def test_save_pretrained_loads_in_reference(layouts, layout, tmp_path):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_pretrained(layouts[layout])
    ours.add_tokens(["<image>"], special_tokens=True)
    ours.padding_side = "left"
    ours.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in tmp_path.iterdir()}
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    again = Tokenizer.from_pretrained(tmp_path)
    assert ref.padding_side == again.padding_side == "left"
    # Both read the same tokenizer.json; `ours` may differ from them in the last bit of a Unigram score,
    # because the JSON float parser of `tokenizers` does not always round correctly.
    assert _backend_json(again) == _backend_json(ref)
    batch = TEXTS[:40]
    assert dict(again(batch, padding=True)) == dict(ref(batch, padding=True)) == dict(ours(batch, padding=True))
    image_id = ours.convert_tokens_to_ids("<image>")
    assert ref.convert_tokens_to_ids("<image>") == image_id == len(ours) - 1
    assert ours.decode([image_id, 5], skip_special_tokens=True) == ref.decode([image_id, 5], skip_special_tokens=True)


def test_added_and_special_tokens_match_reference(layouts):
    ours, ref = Tokenizer.from_pretrained(layouts["opt_fast"]), reference(layouts["opt_fast"])
    counts = []
    for tok in (ours, ref):
        counts.append((tok.add_tokens(["<image>"], special_tokens=True),
                       # Re-adding existing tokens counts them and (in `tokenizers`) resets their flags.
                       tok.add_tokens(["newword", "</s>", "<image>"]),
                       tok.add_special_tokens({"additional_special_tokens": ["<obj>"]})))
    assert counts[0] == counts[1] == (1, 3, 1)
    text = ["<image><image> a newword <obj> photo", "x<image>y"]
    assert dict(ours(text, padding=True)) == dict(ref(text, padding=True))
    ids = ours(text[0]).input_ids
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.convert_tokens_to_ids(["<obj>", "never-seen-token"]) == ref.convert_tokens_to_ids(["<obj>", "never-seen-token"])
    assert ours.all_special_tokens == ref.all_special_tokens


# ---------------------------------------------------------------- the sentencepiece reader

def test_sentencepiece_reader_matches_protobuf(layouts):
    from transformers.utils import sentencepiece_model_pb2_new as pb

    path = layouts["t5_slow"] / "spiece.model"
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    ours = read_sentencepiece_model(path)
    assert [(p, s, t) for p, s, t in ours.pieces] == [(p.piece, p.score, p.type) for p in proto.pieces]
    assert ours.unk_id == proto.trainer_spec.unk_id == 2
    assert ours.model_type == proto.trainer_spec.model_type
    assert ours.precompiled_charsmap == proto.normalizer_spec.precompiled_charsmap != b""


def test_broken_sentencepiece_file_is_a_clear_error(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(ValueError, match="spiece.model is not a valid sentencepiece model"):
        Tokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------- errors

def test_text_that_is_not_a_string(layouts):
    tok = Tokenizer.from_pretrained(layouts["opt_fast"])
    with pytest.raises(TypeError, match=r"text\[1\] is int"):
        tok(["fine", 3])
    with pytest.raises(TypeError, match="text must be a string or a list of strings, got bytes"):
        tok(b"bytes")
    with pytest.raises(TypeError, match="got NoneType"):
        tok(None)
    with pytest.raises(ValueError, match="empty list"):
        tok([])
    with pytest.raises(ValueError, match="never negative"):
        tok.decode([5, -100])
    with pytest.raises(ValueError, match="padding must be"):
        tok("x", padding="sideways")


def test_padding_needs_a_pad_token(layouts):
    tok = Tokenizer.from_pretrained(layouts["opt_bare"])  # GPT-2 defaults: no pad token
    with pytest.raises(ValueError, match="no pad token"):
        tok(["a", "a photo"], padding=True)
    tok.pad_token = tok.eos_token
    assert tok(["a", "a photo"], padding=True)["attention_mask"][0][-1] == 0


def test_ragged_tensors_are_a_clear_error(layouts):
    tok = Tokenizer.from_pretrained(layouts["opt_fast"])
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "a photo of the cat"], return_tensors="pt")


def test_missing_files_name_what_was_looked_for(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*vocab.json.*spiece.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer"}')
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*vocab.json.*spiece.model"):
        Tokenizer.from_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no tokenizer files for 'org/absent'.*HF cache .*offline"):
        Tokenizer.from_pretrained("org/absent", cache_dir=tmp_path)


def test_pickle_round_trip(layouts):
    import pickle

    tok = Tokenizer.from_pretrained(layouts["t5_fast"])
    copy = pickle.loads(pickle.dumps(tok))
    assert copy(TEXTS[:20], padding=True) == tok(TEXTS[:20], padding=True)
