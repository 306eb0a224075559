"""Preparing inputs: the BLIP image processor, the language model's tokenizer, and Blip2Processor."""

from .batch import BatchEncoding, BatchFeature
from .image import BlipImageProcessor, Blip2ImageProcessor, ImageInputError, ImageTooLargeError
from .processor import Blip2Processor, InstructBlipProcessor, InstructBlipVideoProcessor
from .tokenizer import Tokenizer
from .video import InstructBlipVideoVideoProcessor

__all__ = [
    "BatchEncoding",
    "BatchFeature",
    "Blip2ImageProcessor",
    "Blip2Processor",
    "InstructBlipProcessor",
    "InstructBlipVideoProcessor",
    "InstructBlipVideoVideoProcessor",
    "BlipImageProcessor",
    "ImageInputError",
    "ImageTooLargeError",
    "Tokenizer",
]
