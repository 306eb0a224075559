"""Preparing inputs: the BLIP image processor, the language model's tokenizer, and Blip2Processor."""

from .batch import BatchEncoding, BatchFeature
from .image import BlipImageProcessor, Blip2ImageProcessor, ImageInputError, ImageTooLargeError
from .processor import Blip2Processor, InstructBlipProcessor
from .tokenizer import Tokenizer

__all__ = [
    "BatchEncoding",
    "BatchFeature",
    "Blip2ImageProcessor",
    "Blip2Processor",
    "InstructBlipProcessor",
    "BlipImageProcessor",
    "ImageInputError",
    "ImageTooLargeError",
    "Tokenizer",
]
