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
from .tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"


class Blip2Processor:
    """Wraps a `Blip2ImageProcessor` and a `Tokenizer`.

    Args:
        image_processor: prepares pixel_values.
        tokenizer: the OPT or T5 tokenizer of the language model.
        num_query_tokens: when set, `<image>` tokens are put in front of the text (see the module doc).
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor: Blip2ImageProcessor, tokenizer: Tokenizer,
                 num_query_tokens: int | None = None) -> None:
        if num_query_tokens is not None and (not isinstance(num_query_tokens, int) or num_query_tokens < 1):
            raise ValueError(f"num_query_tokens must be a positive int or None, got {num_query_tokens!r}")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        self.image_token = getattr(tokenizer, "extra_special_tokens", {}).get("image_token", IMAGE_TOKEN)
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
                 pad_to_multiple_of: int | None = None, **kwargs: Any) -> BatchFeature:
        """pixel_values for `images` and input_ids / attention_mask for `text` (either may be left out).

        Tokenizer options as in `Tokenizer.__call__`; with image tokens, `max_length` counts them too.
        """
        if images is None and text is None:
            raise ValueError("give images, text or both")
        kwargs.pop("verbose", None)
        if kwargs.pop("stride", 0) or kwargs.pop("return_token_type_ids", None):
            raise ValueError("stride and token_type_ids are not supported by this processor")
        if kwargs:
            raise TypeError(f"unexpected keyword argument(s): {sorted(kwargs)}")
        text_options = dict(add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                            max_length=max_length, return_attention_mask=return_attention_mask,
                            pad_to_multiple_of=pad_to_multiple_of)
        if images is None:
            return self.tokenizer(text, return_tensors=return_tensors, **text_options)
        batch = self.image_processor(images, return_tensors=return_tensors)
        if text is not None:
            if self.num_query_tokens is None:
                batch.update(self.tokenizer(text, return_tensors=return_tensors, **text_options))
            else:
                batch.update(self._with_image_tokens(text, text_options).convert_to_tensors(return_tensors))
        return batch

    def _with_image_tokens(self, text: str | list[str], options: dict) -> BatchEncoding:
        """The text encoded on its own (room kept for the image tokens), then the image tokens in front."""
        count = self.num_query_tokens
        if options["max_length"] is not None:
            if options["max_length"] <= count:
                raise ValueError(f"max_length {options['max_length']} leaves no room for text after the "
                                 f"{count} image tokens")
            options = {**options, "max_length": options["max_length"] - count}
        encoding = self.tokenizer([text] if isinstance(text, str) else text, **options)
        image_ids = [self.image_token_id] * count
        for key in encoding:
            prefix = image_ids if key == "input_ids" else [1] * count
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
        image_processor = Blip2ImageProcessor.from_pretrained(name_or_path, **hub)
        tokenizer = Tokenizer.from_pretrained(name_or_path, **hub)
        return cls(image_processor, tokenizer, num_query_tokens=num_query_tokens)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_processor={self.image_processor.size}, tokenizer={self.tokenizer!r}, "
                f"num_query_tokens={self.num_query_tokens})")
