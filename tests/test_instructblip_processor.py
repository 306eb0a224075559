"""InstructBlipProcessor against transformers 4.37.2: the same pixel_values, input_ids and
qformer_input_ids (BERT WordPiece, from `qformer_tokenizer/`), bit for bit, for processors the
reference builds and saves; our save is read back by the reference; clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2.processing import InstructBlipProcessor
from test_processor import BLIP2_IMAGES, PHOTOS, TEXTS, WORDS, reference_tokenizer

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), "?", ".", ",", ":", "##s", "##ed",
              "ca", "##f", "ok"]


def reference_processor(tmp_path: Path, kind: str):
    from transformers import BertTokenizerFast, BlipImageProcessor
    from transformers import InstructBlipProcessor as RefProcessor

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(BERT_VOCAB) + "\n")
    qformer_tokenizer = BertTokenizerFast(str(vocab))
    return RefProcessor(BlipImageProcessor(**BLIP2_IMAGES), reference_tokenizer(kind), qformer_tokenizer)


def photos(n: int):
    files = sorted(PHOTOS.glob("*.png"))[:n]
    return [Image.open(f) for f in files]


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_outputs_equal_the_reference(tmp_path, kind):
    ref = reference_processor(tmp_path, kind)
    ref.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "qformer_tokenizer").is_dir()
    ours = InstructBlipProcessor.from_pretrained(tmp_path / "saved")
    images = photos(3)
    cases = [dict(text=TEXTS[:3], padding=True), dict(text=TEXTS[3:], padding="max_length", max_length=12,
                                                      truncation=True), dict(text=TEXTS[1])]
    for case in cases:
        n = len(case["text"]) if isinstance(case["text"], list) else 1
        expected = ref(images=images[:n], return_tensors="pt", **case)
        got = ours(images=images[:n], return_tensors="pt", **case)
        assert list(got.keys()) == list(expected.keys()), case
        for key in expected:
            assert torch.equal(got[key], expected[key]), (key, case)
    text_only = ours(text=TEXTS[:2], padding=True, return_tensors="pt")
    assert torch.equal(text_only["qformer_input_ids"], ref(text=TEXTS[:2], padding=True, return_tensors="pt")["qformer_input_ids"])


def test_reference_reads_what_ours_saves(tmp_path):
    from transformers import InstructBlipProcessor as RefProcessor

    reference_processor(tmp_path, "opt").save_pretrained(str(tmp_path / "a"))
    ours = InstructBlipProcessor.from_pretrained(tmp_path / "a")
    ours.save_pretrained(tmp_path / "b")
    back = RefProcessor.from_pretrained(str(tmp_path / "b"))
    x = back(images=photos(1), text=["how many cats are there?"], return_tensors="pt")
    y = ours(images=photos(1), text=["how many cats are there?"], return_tensors="pt")
    for key in x:
        assert torch.equal(x[key], y[key]), key


def test_folder_without_qformer_tokenizer_is_a_clear_error(tmp_path):
    ref = reference_processor(tmp_path, "opt")  # its parts, saved as a BLIP-2 processor (no qformer_tokenizer/)
    from transformers import Blip2Processor as RefBlip2Processor

    RefBlip2Processor(ref.image_processor, ref.tokenizer).save_pretrained(str(tmp_path / "blip2"))
    with pytest.raises(FileNotFoundError, match="qformer_tokenizer/"):
        InstructBlipProcessor.from_pretrained(tmp_path / "blip2")


def test_image_tokens_go_to_the_language_model_text_only(tmp_path):
    """Newer snapshots (processor_config.json num_query_tokens): image tokens lead the LM's text;
    the Q-Former's instruction is unchanged."""
    ref = reference_processor(tmp_path, "opt")
    ref.save_pretrained(str(tmp_path / "p"))
    plain = InstructBlipProcessor.from_pretrained(tmp_path / "p")
    newer = InstructBlipProcessor.from_pretrained(tmp_path / "p", num_query_tokens=4)
    a = plain(images=photos(1), text="what is in the picture?", return_tensors="pt")
    b = newer(images=photos(1), text="what is in the picture?", return_tensors="pt")
    assert torch.equal(a["qformer_input_ids"], b["qformer_input_ids"])
    assert (b["input_ids"][0, :4] == newer.image_token_id).all()
    assert torch.equal(b["input_ids"][:, 4:], a["input_ids"])
    assert np.array_equal(a["pixel_values"].numpy(), b["pixel_values"].numpy())
