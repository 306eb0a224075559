"""Preparing inputs: the BLIP image processor, the language model's tokenizer, and Blip2Processor."""

from .image import (
    BatchFeature,
    BlipImageProcessor,
    Blip2ImageProcessor,
    ImageInputError,
    ImageTooLargeError,
)
from .processor import Blip2Processor
from .tokenizer import BatchEncoding, Tokenizer

__all__ = [
    "BatchEncoding",
    "BatchFeature",
    "Blip2ImageProcessor",
    "Blip2Processor",
    "BlipImageProcessor",
    "ImageInputError",
    "ImageTooLargeError",
    "Tokenizer",
]
