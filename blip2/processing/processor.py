"""Blip2Processor: the image processor and the language model's tokenizer behind one call.

Without `num_query_tokens` it behaves as transformers 4.37 does: pixel_values plus the text's
input_ids and attention_mask. With `num_query_tokens` (newer checkpoints carry it in
processor_config.json) it does what newer transformers releases do: the tokenizer gains an
`<image>` token and every text row starts with `num_query_tokens` of them, ahead of the BOS and
of any left padding, so that the model writes the Q-Former outputs into those positions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken

from ..io import atomic_write_text
from .batch import BatchEncoding, BatchFeature
from .config_io import json_text, pop_hub_kwargs
from .image import PROCESSOR_NAME, Blip2ImageProcessor
from .tokenizer import Tokenizer, text_list
from .video import InstructBlipVideoVideoProcessor

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
IGNORE = -100  # the label the loss skips


class Blip2Processor:
    """Wraps a `Blip2ImageProcessor` and a `Tokenizer`.

    Padding side, whatever the tokenizer file says: for a decoder-only language model (OPT)
    text is padded on the left, so that every row's next token follows its own last token,
    unless the call is for training, which is what passing `text_target` (the labels) means:
    then on the right, the layout the loss expects. For an encoder-decoder model (T5) always
    on the right. An explicit `padding_side=` argument wins.

    Args:
        image_processor: prepares pixel_values.
        tokenizer: the OPT or T5 tokenizer of the language model.
        num_query_tokens: when set, `<image>` tokens are put in front of the text (see the module doc).
        decoder_only: whether the text goes to a decoder-only language model; None infers it from
            the tokenizer (T5's and BERT's end every text with a special token, for an encoder).
            `from_pretrained` reads it from the folder's config.json when there is one (a
            retrieval model's text goes to its Q-Former: not decoder-only).
    """

    attributes = ["image_processor", "tokenizer"]
    # The placeholder the language model's text holds for the queries: its key among the tokenizer's
    # extra special tokens, and the token when the tokenizer names none.
    placeholder = ("image_token", IMAGE_TOKEN)

    def __init__(self, image_processor: Blip2ImageProcessor, tokenizer: Tokenizer,
                 num_query_tokens: int | None = None, decoder_only: bool | None = None) -> None:
        if num_query_tokens is not None and (not isinstance(num_query_tokens, int) or num_query_tokens < 1):
            raise ValueError(f"num_query_tokens must be a positive int or None, got {num_query_tokens!r}")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        self.decoder_only = _ends_open(tokenizer) if decoder_only is None else bool(decoder_only)
        self.image_token = getattr(tokenizer, "extra_special_tokens", {}).get(*self.placeholder)
        if num_query_tokens is not None and tokenizer.backend_tokenizer.token_to_id(self.image_token) is None:
            tokenizer.add_tokens([AddedToken(self.image_token, normalized=False, special=True)], special_tokens=True)

    @property
    def image_token_id(self) -> int | None:
        return self.tokenizer.backend_tokenizer.token_to_id(self.image_token)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))

    def __call__(self, images: Any = None, text: str | list[str] | None = None, add_special_tokens: bool = True,
                 padding: bool | str = False, truncation: bool | str | None = None, max_length: int | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool | None = None,
                 pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 text_target: str | list[str] | None = None, **kwargs: Any) -> BatchFeature:
        """pixel_values for `images` and input_ids / attention_mask for `text` (either may be left out).

        Tokenizer options as in `Tokenizer.__call__`; with image tokens, `max_length` counts them too.
        `padding_side`: see the class doc. `text_target`: what the model should learn to write
        after each text (a training call); adds `labels`, -100 wherever there is nothing to learn.
        Decoder-only: each target is appended to its text, labels cover the target alone (end it
        with the model's end of text, "\n" for OPT, to learn to stop). T5: the labels are the
        target's tokens, its eos included.
        """
        if images is None and text is None and text_target is None:
            raise ValueError("give images, text or both")
        kwargs.pop("verbose", None)
        if kwargs.pop("stride", 0) or kwargs.pop("return_token_type_ids", None):
            raise ValueError("stride and token_type_ids are not supported by this processor")
        if kwargs:
            raise TypeError(f"unexpected keyword argument(s): {sorted(kwargs)}")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
        if padding_side is None:
            padding_side = "left" if self.decoder_only and text_target is None else "right"
        text_options = dict(add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                            max_length=max_length, return_attention_mask=return_attention_mask,
                            pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side)
        if text is None and text_target is not None:
            text = "" if isinstance(text_target, str) else [""] * len(text_target)
        batch = None if images is None else self.image_processor(images, return_tensors=return_tensors)
        if text is None:
            return batch
        image_tokens = self._image_token_count(batch) if batch is not None else None  # text alone: none to place
        if text_target is None and image_tokens is None:
            encoding = self.tokenizer(text, return_tensors=return_tensors, **text_options)
        else:
            encoding = self._encode(text, text_target, text_options, image_tokens).convert_to_tensors(return_tensors)
        if batch is None:
            return encoding
        batch.update(encoding)
        return batch

    def _image_token_count(self, batch: BatchFeature) -> int | None:
        """How many placeholders lead each text row (None: the older layout, queries in front)."""
        return self.num_query_tokens

    def _encode(self, text: str | list[str], target: str | list[str] | None, options: dict,
                image_tokens: int | None) -> BatchEncoding:
        """Batched lists: the text (with the target, for training) and any image tokens in front."""
        texts, _ = text_list(text)
        count = image_tokens or 0
        if count and options["max_length"] is not None:
            if options["max_length"] <= count:
                raise ValueError(f"max_length {options['max_length']} leaves no room for text after the "
                                 f"{count} image tokens")
            options = {**options, "max_length": options["max_length"] - count}
        if target is None:
            encoding = self.tokenizer(texts, **options)
        else:
            targets, _ = text_list(target)
            if len(targets) != len(texts):
                raise ValueError(f"text_target has {len(targets)} entries but text has {len(texts)}")
            encoding = self._with_labels(texts, targets, options)
        if count:
            encoding = self._with_image_tokens(encoding, count)
        return encoding

    def _with_labels(self, texts: list[str], targets: list[str], options: dict) -> BatchEncoding:
        if not self.decoder_only:  # T5: the target is the decoder's, not appended to the text
            encoding = self.tokenizer(texts, **options)
            labels = self.tokenizer(targets, **{**options, "return_attention_mask": True})
            encoding["labels"] = [[t if keep else IGNORE for t, keep in zip(ids, mask)]
                                  for ids, mask in zip(labels["input_ids"], labels["attention_mask"])]
            return encoding
        encoding = self.tokenizer([p + t for p, t in zip(texts, targets)], **{**options, "return_attention_mask": True})
        prompts = self.tokenizer(texts, add_special_tokens=options["add_special_tokens"])["input_ids"]
        encoding["labels"] = [_target_labels(ids, mask, len(prompt), options["padding_side"]) for ids, mask, prompt
                              in zip(encoding["input_ids"], encoding["attention_mask"], prompts)]
        if options["return_attention_mask"] is False:
            del encoding["attention_mask"]
        return encoding

    def _with_image_tokens(self, encoding: BatchEncoding, count: int) -> BatchEncoding:
        """`count` image tokens in front of every row (ahead of any left padding); labels ignore them."""
        prefixes = {"input_ids": [self.image_token_id] * count, "labels": [IGNORE] * count}
        for key in encoding:
            if key == "labels" and not self.decoder_only:
                continue  # T5's labels are the decoder's: no image there
            prefix = prefixes.get(key, [1] * count)
            encoding[key] = [prefix + row for row in encoding[key]]
        return encoding

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    # ------------------------------------------------------------ files
    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """preprocessor_config.json, the tokenizer files, and processor_config.json when num_query_tokens is set."""
        directory = Path(directory)
        self.image_processor.extra["processor_class"] = type(self).__name__
        self.tokenizer.config["processor_class"] = type(self).__name__
        written = [self.image_processor.save_pretrained(directory), *self.tokenizer.save_pretrained(directory)]
        if self.num_query_tokens is not None:
            path = directory / PROCESSOR_NAME
            atomic_write_text(path, json_text({"num_query_tokens": self.num_query_tokens,
                                            "processor_class": type(self).__name__}))
            written.append(path)
        return written

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> "Blip2Processor":
        """Loads from a directory, a Hugging Face cache snapshot or the hub (revision, cache_dir,
        local_files_only, token); `num_query_tokens=` overrides processor_config.json."""
        from ..hub import read_json, resolve_file

        hub = pop_hub_kwargs(kwargs)
        settings_file = resolve_file(name_or_path, PROCESSOR_NAME, required=False, **hub)
        settings = read_json(settings_file) if settings_file is not None else {}
        num_query_tokens = kwargs.pop("num_query_tokens", settings.get("num_query_tokens"))
        if kwargs:
            raise TypeError(f"unexpected keyword argument(s): {sorted(kwargs)}")
        parts = cls._load_parts(name_or_path, hub)
        model_file = resolve_file(name_or_path, "config.json", required=False, **hub)
        decoder_only = _is_decoder_only(read_json(model_file)) if model_file is not None else None
        return cls(*parts, num_query_tokens=num_query_tokens, decoder_only=decoder_only)

    @classmethod
    def _load_parts(cls, name_or_path: str | os.PathLike, hub: dict) -> list:
        """The processor's parts, in the order of `attributes`."""
        return [Blip2ImageProcessor.from_pretrained(name_or_path, **hub), Tokenizer.from_pretrained(name_or_path, **hub)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_processor={self.image_processor.size}, tokenizer={self.tokenizer!r}, "
                f"num_query_tokens={self.num_query_tokens})")


def _ends_open(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer leaves a text open for a decoder to continue: OPT's and Llama's put
    their special token in front; T5's (eos) and BERT's ([SEP]) close every text with one."""
    ids = tokenizer("a")["input_ids"]
    return not (ids and ids[-1] in set(tokenizer.all_special_ids))


def _is_decoder_only(model_config: dict) -> bool | None:
    """From a model's config.json: whether its text goes to a decoder-only language model (None:
    the file does not say). A retrieval model's text goes to its Q-Former, BERT-style: not."""
    names = model_config.get("architectures") or []
    if (model_config.get("qformer_config") or {}).get("use_qformer_text_input") and \
            not any("ForConditionalGeneration" in name for name in names):
        return False
    text = model_config.get("text_config")
    if not isinstance(text, dict):
        return None
    return not text.get("is_encoder_decoder", text.get("model_type") == "t5")


def _target_labels(ids: list[int], mask: list[int], prompt_length: int, side: str) -> list[int]:
    """One row's labels: the tokens after the prompt; the prompt and the padding are ignored."""
    start = len(mask) - sum(mask) if side == "left" else 0  # where the row's tokens begin
    return [t if keep and n - start >= prompt_length else IGNORE for n, (t, keep) in enumerate(zip(ids, mask))]


QFORMER_TOKENIZER_FOLDER = "qformer_tokenizer"


class InstructBlipProcessor(Blip2Processor):
    """InstructBLIP's processor: BLIP-2's, plus the Q-Former's BERT WordPiece tokenizer, which
    encodes the same text as `qformer_input_ids` / `qformer_attention_mask` (the instruction the
    Q-Former reads). Its files live in `qformer_tokenizer/` beside the others.

    Args:
        image_processor, tokenizer, num_query_tokens, decoder_only: as for `Blip2Processor`.
        qformer_tokenizer: the Q-Former's tokenizer (a `Tokenizer` over BERT's WordPiece).
    """

    attributes = ["image_processor", "tokenizer", "qformer_tokenizer"]

    def __init__(self, image_processor: Blip2ImageProcessor, tokenizer: Tokenizer, qformer_tokenizer: Tokenizer,
                 num_query_tokens: int | None = None, decoder_only: bool | None = None) -> None:
        super().__init__(image_processor, tokenizer, num_query_tokens=num_query_tokens, decoder_only=decoder_only)
        self.qformer_tokenizer = qformer_tokenizer

    def __call__(self, images: Any = None, text: str | list[str] | None = None, add_special_tokens: bool = True,
                 padding: bool | str = False, truncation: bool | str | None = None, max_length: int | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool | None = None,
                 pad_to_multiple_of: int | None = None, **kwargs: Any) -> BatchFeature:
        """As `Blip2Processor.__call__`, plus qformer_input_ids and qformer_attention_mask for `text`
        (same options; the image tokens, when there are any, go to the language model's text only)."""
        options = dict(add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                       max_length=max_length, pad_to_multiple_of=pad_to_multiple_of)
        batch = super().__call__(images, text, return_tensors=return_tensors,
                                 return_attention_mask=return_attention_mask, **options, **kwargs)
        if text is None:
            return batch
        qformer = self.qformer_tokenizer(text, return_tensors=return_tensors, return_attention_mask=True, **options)
        out = BatchFeature({k: v for k, v in batch.items() if k != "pixel_values"})  # the reference's key order
        out["qformer_input_ids"] = qformer["input_ids"]
        out["qformer_attention_mask"] = qformer["attention_mask"]
        if "pixel_values" in batch:
            out["pixel_values"] = batch["pixel_values"]
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Blip2Processor's files, and the Q-Former tokenizer's in `qformer_tokenizer/`."""
        directory = Path(directory)
        written = self.qformer_tokenizer.save_pretrained(directory / QFORMER_TOKENIZER_FOLDER)
        return [*written, *super().save_pretrained(directory)]

    @classmethod
    def _load_parts(cls, name_or_path: str | os.PathLike, hub: dict) -> list:
        return [*super()._load_parts(name_or_path, hub), _qformer_tokenizer(name_or_path, hub)]


def _qformer_tokenizer(name_or_path: str | os.PathLike, hub: dict) -> Tokenizer:
    """The Q-Former's tokenizer from `qformer_tokenizer/`, or a clear error naming the folder."""
    from ..hub import ModelNotFoundError
    from .tokenizer_files import find_tokenizer_files

    local = Path(name_or_path)
    if local.is_dir() and not (local / QFORMER_TOKENIZER_FOLDER).is_dir():
        raise FileNotFoundError(
            f"{local} has no {QFORMER_TOKENIZER_FOLDER}/ folder: an InstructBLIP processor carries the "
            "Q-Former's BERT tokenizer there (a BLIP-2 processor folder? use Blip2Processor)"
        )
    try:
        files = find_tokenizer_files(name_or_path, subfolder=QFORMER_TOKENIZER_FOLDER, **hub)
    except ModelNotFoundError as err:
        raise FileNotFoundError(f"no Q-Former tokenizer in {QFORMER_TOKENIZER_FOLDER}/ of {name_or_path}: {err}") from None
    where = f"{os.fspath(name_or_path)}/{QFORMER_TOKENIZER_FOLDER}"
    return Tokenizer.from_files(files, where=where)


class InstructBlipVideoProcessor(InstructBlipProcessor):
    """InstructBLIP video's processor (transformers 5.x): the video processor, the language model's
    tokenizer and the Q-Former's. With `num_query_tokens`, each text row starts with frames x
    num_query_tokens `<video>` tokens (the reference always writes 4 x num_query_tokens, the frame
    count its checkpoints use; this counts the videos' frames, so other counts fit the model too).

    Args:
        video_processor: an `InstructBlipVideoVideoProcessor`.
        tokenizer, qformer_tokenizer, num_query_tokens, decoder_only: as for `InstructBlipProcessor`.
    """

    attributes = ["video_processor", "tokenizer", "qformer_tokenizer"]
    placeholder = ("video_token", VIDEO_TOKEN)

    def __init__(self, video_processor: InstructBlipVideoVideoProcessor, tokenizer: Tokenizer,
                 qformer_tokenizer: Tokenizer, num_query_tokens: int | None = None,
                 decoder_only: bool | None = None) -> None:
        super().__init__(video_processor, tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens,
                         decoder_only=decoder_only)

    @property
    def video_processor(self) -> InstructBlipVideoVideoProcessor:
        return self.image_processor

    @property
    def video_token(self) -> str:
        return self.image_token

    def __call__(self, images: Any = None, text: str | list[str] | None = None, *, videos: Any = None,
                 **kwargs: Any) -> BatchFeature:
        """As `InstructBlipProcessor.__call__`, with videos (`images=` as in the reference, or `videos=`):
        pixel_values (batch, frames, 3, H, W), and the reference's key order."""
        if images is not None and videos is not None:
            raise ValueError("pass the videos once, as images= or videos=")
        batch = super().__call__(images if videos is None else videos, text, **kwargs)
        order = ["qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask", "labels", "pixel_values"]
        return BatchFeature({k: batch[k] for k in sorted(batch, key=lambda k: order.index(k) if k in order else 0)})

    def _image_token_count(self, batch: BatchFeature) -> int | None:
        if self.num_query_tokens is None:
            return None
        frames = {len(video) for video in batch["pixel_values"]}
        if len(frames) > 1:
            raise ValueError(f"the videos have different frame counts {sorted(frames)}; one text batch needs one count")
        return frames.pop() * self.num_query_tokens

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """The tokenizers' files, and processor_config.json holding num_query_tokens and the video
        processor's settings (transformers 5.x's layout)."""
        directory = Path(directory)
        name = type(self).__name__
        self.tokenizer.config["processor_class"] = name
        written = [*self.qformer_tokenizer.save_pretrained(directory / QFORMER_TOKENIZER_FOLDER),
                   *self.tokenizer.save_pretrained(directory)]
        settings = {"processor_class": name, "video_processor": self.video_processor.to_dict()}
        if self.num_query_tokens is not None:
            settings["num_query_tokens"] = self.num_query_tokens
        atomic_write_text(directory / PROCESSOR_NAME, json_text(settings))
        return [*written, directory / PROCESSOR_NAME]

    @classmethod
    def _load_parts(cls, name_or_path: str | os.PathLike, hub: dict) -> list:
        return [InstructBlipVideoVideoProcessor.from_pretrained(name_or_path, **hub),
                Tokenizer.from_pretrained(name_or_path, **hub), _qformer_tokenizer(name_or_path, hub)]
