"""Tiny models, data and tokenisers for the training tests (tests/test_train_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip2.config import Blip2Config

WORDS = ["a", "photo", "of", "red", "green", "blue", "yellow", "square", "circle", "stripes", "dots",
         "big", "small", "question", "answer", "what", "colour", "is", "it", "?", ":"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]"]
VOCAB = {w: i for i, w in enumerate(SPECIAL + WORDS)}
PAD, CLS, SEP, DEC = VOCAB["[PAD]"], VOCAB["[CLS]"], VOCAB["[SEP]"], VOCAB["[DEC]"]
CAPTIONS = ["red square", "blue circle", "green stripes", "yellow dots", "big red circle",
            "small blue square", "green dots", "yellow stripes", "big green square", "small red dots",
            "blue stripes", "big yellow circle"]


def word_tokenize(texts: list[str]) -> list[list[int]]:
    """[CLS] words [SEP], BERT's layout, for the Q-Former."""
    return [[CLS] + [VOCAB.get(w, VOCAB["[UNK]"]) for w in t.replace("?", " ?").split()] + [SEP] for t in texts]


def lm_tokenize(texts: list[str]) -> list[list[int]]:
    """A begin token then the words, OPT's layout (id 2 is OPT's bos here too: [CLS])."""
    return [[CLS] + [VOCAB.get(w, VOCAB["[UNK]"]) for w in t.replace("?", " ?").split()] for t in texts]


def stage1_config(dropout: float = 0.0) -> Blip2Config:
    return Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=8, patch_size=4),
        qformer_config=dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, cross_attention_frequency=1, encoder_hidden_size=16,
                            max_position_embeddings=16, use_qformer_text_input=True,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout),
        text_config=dict(model_type="opt", vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=32,
                         pad_token_id=PAD, bos_token_id=CLS, eos_token_id=SEP, dropout=dropout),
        num_query_tokens=4, image_text_hidden_size=16,
    )


def stage2_config(dropout: float = 0.0) -> Blip2Config:
    config = stage1_config(dropout)
    config.qformer_config.use_qformer_text_input = False
    return config


def images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """n distinct random images (n, 3, size, size), already normalised."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def caption_items(n: int = 8) -> list[dict]:
    """In-memory dataset items, as ImageTextDataset yields them."""
    pixels = images(n)
    return [{"key": f"img{i}", "pixel_values": pixels[i], "caption": CAPTIONS[i]} for i in range(n)]


def write_dataset(folder: Path, n: int = 8) -> Path:
    """PNG images and a captions JSONL; returns the JSONL path."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        pixels = torch.randint(0, 256, (8, 8, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "caption": CAPTIONS[i]}))
    path = folder / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json with BERT's [CLS] ... [SEP] template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    tok.save(str(path))
    return path


def write_stage1_config(path: Path, data: Path, tokenizer: Path, out: Path, **train) -> Path:
    spec = {
        "model": {"config": stage1_config().to_dict(), "seed": 0},
        "data": {"train": str(data), "tokenizer": str(tokenizer), "max_len": 8},
        "losses": {"itc": 1.0, "itm": 1.0, "itg": 1.0},
        "train": {"out_dir": str(out), "batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1,
                  "max_steps": 4, "progress": False, **train},
    }
    path.write_text(json.dumps(spec, indent=1))
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and the machine is shared); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
