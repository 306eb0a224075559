"""Blip2Processor against transformers: 4.37 without image tokens, the newest release with them.

4.37 is run live on processors the tests build and save with it. The newest release's
`<image>`-token behaviour comes from tests/fixtures/processor_newest/, written by
tests/fixtures/make_processor_fixtures.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2.processing import Blip2ImageProcessor, Blip2Processor, ImageInputError, Tokenizer

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = Path(skimage_data.__file__).parent
NEWEST = Path(__file__).parent / "fixtures" / "processor_newest"
WORDS = ("a photo of the cat dog woman man sitting on beach with two people question answer how many are "
         "there what is in picture color red blue green").split()
TEXTS = ["a photo of", "Question: how many cats are there? Answer:", "", "  spaced  out  ", "café 😀 ok",
         "the cat " * 12]
BLIP2_IMAGES = dict(size={"height": 224, "width": 224}, resample=3, do_convert_rgb=True,
                    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def _corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "?", ""])
            for _ in range(500)]


def reference_tokenizer(kind: str):
    """A small OPT-style (BPE, `</s>` as BOS) or T5-style (Unigram, `</s>` appended) 4.37 tokenizer."""
    from tokenizers import Tokenizer as Raw, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    if kind == "opt":
        raw = Raw(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        raw.train_from_iterator(_corpus(), trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        raw.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
        return GPT2TokenizerFast(tokenizer_object=raw, bos_token="</s>", eos_token="</s>", unk_token="</s>",
                                 pad_token="<pad>", padding_side="left")
    raw = Raw(models.Unigram())
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(_corpus(), trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module", params=["opt", "t5"])
def saved(request, tmp_path_factory) -> tuple[Path, object]:
    """A 4.37 Blip2Processor saved by 4.37, and the reference object itself."""
    from transformers import Blip2Processor as RefProcessor, BlipImageProcessor

    ref = RefProcessor(BlipImageProcessor(**BLIP2_IMAGES), reference_tokenizer(request.param))
    folder = tmp_path_factory.mktemp(f"processor_{request.param}")
    ref.save_pretrained(str(folder))
    return folder, ref


def photos() -> list[Image.Image]:
    return [Image.open(PHOTOS / name) for name in ("astronaut.png", "chelsea.png", "camera.png", "logo.png",
                                                   "rocket.jpg", "coffee.png")]


def _same(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref), (list(ours), list(ref))
    for key in ref:
        a, b = ours[key], ref[key]
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert (a.double() - b.double()).abs().max().item() <= 1e-6, key
        elif isinstance(b, np.ndarray):
            assert a.shape == b.shape and np.abs(a.astype(np.float64) - b).max() <= 1e-6, key
        elif key == "pixel_values":
            assert len(a) == len(b) and all(np.abs(x - y).max() <= 1e-6 for x, y in zip(a, b))
        else:
            assert a == b, key


# ---------------------------------------------------------------- transformers 4.37

CALLS = [
    dict(text=TEXTS, padding=True, return_tensors="pt"),
    dict(text=TEXTS, padding=True, truncation=True, max_length=8, return_tensors="pt"),
    dict(text=TEXTS, padding="max_length", truncation=True, max_length=20, return_tensors="np"),
    dict(text=TEXTS),
    dict(text=TEXTS, add_special_tokens=False, padding="longest", return_tensors="pt"),
    dict(text="a photo of", return_tensors="pt"),
]


def test_images_and_text_equal_reference_437(saved):
    folder, ref = saved
    ours = Blip2Processor.from_pretrained(folder)
    assert ours.num_query_tokens is None
    images = photos()
    for options in CALLS:
        count = 1 if isinstance(options["text"], str) else len(options["text"])
        _same(ours(images=images[:count], **options), ref(images=images[:count], **options))
        _same(ours(**options), ref(**options))  # text alone
    _same(ours(images=images, return_tensors="pt"), ref(images=images, return_tensors="pt"))
    _same(ours(images=images[0]), ref(images=images[0]))


def test_decode_equals_reference(saved):
    folder, ref = saved
    ours = Blip2Processor.from_pretrained(folder)
    ids = ref(text=TEXTS, padding=True, return_tensors="pt")["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[1], skip_special_tokens=skip) == ref.decode(ids[1], skip_special_tokens=skip)


def test_save_pretrained_loads_in_reference_437(saved, tmp_path):
    from transformers import Blip2Processor as RefProcessor

    folder, ref = saved
    Blip2Processor.from_pretrained(folder).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text()) == \
        json.loads((folder / "preprocessor_config.json").read_text())
    assert not (tmp_path / "processor_config.json").exists()  # 4.37 could not load one with num_query_tokens
    back = RefProcessor.from_pretrained(str(tmp_path))
    images = photos()[:3]
    options = dict(text=TEXTS[:3], padding=True, return_tensors="pt")
    _same(back(images=images, **options), ref(images=images, **options))


def test_to_casts_only_floating_tensors(saved):
    folder, _ = saved
    batch = Blip2Processor.from_pretrained(folder)(images=photos()[:2], text=TEXTS[:2], padding=True,
                                                   return_tensors="pt")
    moved = batch.to("cpu", torch.float16)
    assert moved is batch and batch.pixel_values.dtype == torch.float16
    assert batch.input_ids.dtype == torch.long and batch["attention_mask"].dtype == torch.long


# ---------------------------------------------------------------- the newest release: <image> tokens

def _newest_images(count: int) -> list[np.ndarray]:
    ramp = np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3).astype(np.uint8)
    return [ramp, ramp[::-1].copy()][:count]


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_image_tokens_equal_newest_reference(kind):
    folder = NEWEST / kind
    expected = json.loads((folder / "expected.json").read_text())
    ours = Blip2Processor.from_pretrained(folder)
    assert ours.num_query_tokens == 4
    assert ours.image_token_id == expected["image_token_id"]
    assert len(ours.tokenizer) == expected["vocab_with_added"]
    for result in expected["results"]:
        call = dict(result["call"])
        name, count = call.pop("name"), call.pop("images")
        out = ours(images=_newest_images(count) or None, **call)
        ids, mask = out["input_ids"], out["attention_mask"]
        if ids and isinstance(ids[0], int):  # a single string without images stays unbatched
            ids, mask = [ids], [mask]
        assert ids == result["input_ids"], name
        assert mask == result["attention_mask"], name
        shape = result["pixel_values_shape"]
        assert (None if "pixel_values" not in out else [len(out["pixel_values"]), *out["pixel_values"][0].shape]) == shape


def test_image_tokens_on_an_older_tokenizer(saved, tmp_path):
    """num_query_tokens adds `<image>` to a tokenizer that lacks it; saving keeps both."""
    folder, ref = saved
    ours = Blip2Processor.from_pretrained(folder, num_query_tokens=3)
    image_id = ours.image_token_id
    assert image_id == len(ref.tokenizer)  # one new token after the reference vocabulary
    out = ours(images=photos()[:2], text=["a photo of", "a cat"], padding=True, return_tensors="pt")
    plain = ref(text=["a photo of", "a cat"], padding=True, return_tensors="pt")
    assert torch.equal(out.input_ids[:, :3], torch.full((2, 3), image_id))
    assert torch.equal(out.input_ids[:, 3:], plain["input_ids"])
    assert torch.equal(out.attention_mask[:, 3:], plain["attention_mask"]) and bool(out.attention_mask[:, :3].all())
    assert ours.batch_decode(out.input_ids, skip_special_tokens=True) == \
        ref.batch_decode(plain["input_ids"], skip_special_tokens=True)
    short = ours(images=photos()[:1], text="the cat " * 12, truncation=True, max_length=7)
    assert len(short["input_ids"][0]) == 7  # max_length counts the image tokens
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["num_query_tokens"] == 3
    again = Blip2Processor.from_pretrained(tmp_path)
    assert again.num_query_tokens == 3 and again.image_token_id == image_id
    assert dict(again(images=photos()[:2], text=["a photo of", "a cat"], padding=True)) .keys() == {
        "pixel_values", "input_ids", "attention_mask"}
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path)).convert_tokens_to_ids("<image>") == image_id


# ---------------------------------------------------------------- errors

def test_bad_input_is_named(saved):
    folder, _ = saved
    ours = Blip2Processor.from_pretrained(folder, num_query_tokens=4)
    with pytest.raises(ValueError, match="give images, text or both"):
        ours()
    with pytest.raises(TypeError, match="text must be a string or a list of strings, got int"):
        ours(images=photos()[0], text=5)
    with pytest.raises(TypeError, match=r"text\[1\] is NoneType"):
        ours(text=["fine", None])
    with pytest.raises(ImageInputError, match="image 1: not a readable image"):
        ours(images=[photos()[0], b"not an image"], text=["a", "b"])
    with pytest.raises(ValueError, match="leaves no room"):
        ours(images=photos()[0], text="a photo", truncation=True, max_length=4)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ours(text="a", paddding=True)
    with pytest.raises(ValueError, match="num_query_tokens must be"):
        Blip2Processor(Blip2ImageProcessor(), ours.tokenizer, num_query_tokens=0)


def test_missing_image_processor_config_is_named(tmp_path):
    Tokenizer.from_pretrained(NEWEST / "opt").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Blip2Processor.from_pretrained(tmp_path)


# ---------------------------------------------------------------- padding side: generation and training
def test_padding_side_defaults_to_generation_for_a_decoder_only_model():
    """The shipped demo model's tokenizer file says padding_side "right"; prompts still pad on the
    left, training calls (text_target) on the right, and an explicit padding_side wins."""
    demo = Path(__file__).parent.parent / "blip2" / "demo" / "model"
    processor = Blip2Processor.from_pretrained(demo)
    assert processor.decoder_only and processor.tokenizer.padding_side == "right"
    prompts = ["Question: what colour is the circle? Answer:", "a photo of"]
    mask = processor(text=prompts, padding=True, return_tensors="pt")["attention_mask"]
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # the short row is padded in front
    assert processor(text=prompts, padding=True, padding_side="right")["attention_mask"][1][-1] == 0
    assert processor.tokenizer.padding_side == "right"  # the call did not change the tokenizer
    retrieval = Blip2Processor.from_pretrained(demo.parent / "retrieval")  # text for the Q-Former, [CLS] first
    assert not retrieval.decoder_only and retrieval(text=prompts, padding=True)["attention_mask"][1][-1] == 0

    train = processor(text=prompts, text_target=[" red\n", " a red circle\n"], padding=True, return_tensors="pt")
    ids, mask, labels = train["input_ids"], train["attention_mask"], train["labels"]
    assert mask[0, -1] == 1 and mask[1, -1] == 0  # right-padded
    for row, target in enumerate([" red\n", " a red circle\n"]):
        learned = labels[row][labels[row] != -100]
        assert processor.decode(learned) == target  # the target alone; prompt and padding ignored
        n = int(mask[row].sum())
        assert torch.equal(ids[row, n - len(learned) : n], learned)  # at the end of the row's text


def test_encoder_decoder_pads_on_the_right_and_labels_are_the_targets(saved):
    folder, _ = saved
    kind = "t5" if "t5" in folder.name else "opt"
    processor = Blip2Processor.from_pretrained(folder)  # no config.json: told by the tokenizer
    assert processor.decoder_only == (kind == "opt")
    texts = ["a photo of the cat", "a"]
    mask = processor(text=texts, padding=True)["attention_mask"]
    assert (mask[1][0], mask[1][-1]) == ((0, 1) if kind == "opt" else (1, 0))
    if kind == "t5":
        out = processor(text=texts, text_target=["two cats", "dog"], padding=True)
        targets = processor.tokenizer(["two cats", "dog"], padding=True)
        assert out["input_ids"] == processor.tokenizer(texts, padding=True)["input_ids"]
        for labels, ids, keep in zip(out["labels"], targets["input_ids"], targets["attention_mask"]):
            assert labels == [t if k else -100 for t, k in zip(ids, keep)]
        assert -100 in out["labels"][1]
    with pytest.raises(ValueError, match="padding_side"):
        processor(text="a", padding_side="middle")
    with pytest.raises(ValueError, match="text_target has 1 entries but text has 2"):
        processor(text=["a", "b"], text_target=["c"])
