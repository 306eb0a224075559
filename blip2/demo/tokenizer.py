"""The demo language model's tokenizer: byte-level BPE laid out as OPT's, trained with `tokenizers`.

Like OPT's: ids 0-3 are <s>, <pad>, </s>, <unk>; every text starts with </s> (the BOS); text
ends with a newline, the language model's end of sequence (OPT's id 50118). The files written
are those of an OPT checkpoint, so transformers' GPT2Tokenizer(Fast) reads them as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
PAD_ID, BOS_ID = 1, 2
DEC_ID = 0  # <s>: OPT never uses it, so the Q-Former's ITG decoder takes it as its start token
NEWLINE = "\u010a"  # "Ċ": the byte-level spelling of "\n"


def train_tokenizer(lines: list[str], vocab_size: int = 512) -> Tokenizer:
    """Byte-level BPE over `lines`: any text still encodes (bytes), the world's words are whole tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s>:0 $A:0", pair="</s>:0 $A:0 $B:1", special_tokens=[("</s>", BOS_ID)]
    )
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != [0, 1, 2, 3]:
        raise RuntimeError("the special tokens did not get ids 0-3")
    return tok


def eos_id(tok: Tokenizer) -> int:
    """The newline token: where a caption or an answer ends."""
    return tok.token_to_id(NEWLINE)


def save_tokenizer(tok: Tokenizer, folder: str | Path, model_max_length: int) -> None:
    """tokenizer.json (fast), vocab.json + merges.txt (slow) and the configs, as an OPT checkpoint has them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))  # vocab.json, merges.txt
    special = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {
        **special,
        "add_bos_token": True,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "padding_side": "right",
        "tokenizer_class": "GPT2Tokenizer",
        "processor_class": "Blip2Processor",
        "clean_up_tokenization_spaces": True,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
