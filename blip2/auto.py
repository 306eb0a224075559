"""Loading whatever a checkpoint holds: the class comes from config.json's `model_type`.

    model = blip2.load_model("Salesforce/instructblip-vicuna-7b", torch_dtype="auto")
    processor = blip2.load_processor("Salesforce/instructblip-vicuna-7b")
"""

from __future__ import annotations

import os
from typing import Any

# model_type -> (generation class, processor class), by name in `blip2`
CLASSES = {
    "blip-2": ("Blip2ForConditionalGeneration", "Blip2Processor"),
    "instructblip": ("InstructBlipForConditionalGeneration", "InstructBlipProcessor"),
    "instructblipvideo": ("InstructBlipVideoForConditionalGeneration", "InstructBlipVideoProcessor"),
}
_HUB = ("revision", "cache_dir", "local_files_only", "token")


def model_type_of(name_or_path: str | os.PathLike, **hub: Any) -> str:
    """config.json's model_type, checked to be one this package loads."""
    from .hub import read_json, resolve_file

    file = resolve_file(name_or_path, "config.json", **hub)
    model_type = read_json(file).get("model_type")
    if model_type not in CLASSES:
        raise ValueError(
            f"{file} has model_type {model_type!r}; blip2 loads {sorted(CLASSES)} checkpoints"
        )
    return model_type


def _class(name_or_path, kwargs: dict, which: int):
    import blip2

    hub = {k: kwargs[k] for k in _HUB if k in kwargs}
    return getattr(blip2, CLASSES[model_type_of(name_or_path, **hub)][which])


def load_model(name_or_path: str | os.PathLike, **kwargs: Any):
    """`Blip2ForConditionalGeneration`, `InstructBlipForConditionalGeneration` or
    `InstructBlipVideoForConditionalGeneration`, as config.json says (`CLASSES`), loaded with
    `from_pretrained(name_or_path, **kwargs)`."""
    return _class(name_or_path, kwargs, 0).from_pretrained(name_or_path, **kwargs)


def load_processor(name_or_path: str | os.PathLike, **kwargs: Any):
    """The processor class `CLASSES` pairs with the checkpoint's model_type (from its config.json)."""
    return _class(name_or_path, kwargs, 1).from_pretrained(name_or_path, **kwargs)
