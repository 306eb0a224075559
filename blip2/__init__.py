"""BLIP-2 in plain PyTorch: the transformers Blip2 API and checkpoint format, leaner and faster."""

from .auto import load_model, load_processor
from .config import (
    Blip2Config,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    InstructBlipConfig,
    InstructBlipQFormerConfig,
    InstructBlipVideoConfig,
    InstructBlipVideoQFormerConfig,
    InstructBlipVideoVisionConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    OPTConfig,
    T5Config,
)
from .hf_compat import (
    Blip2ForConditionalGeneration,
    Blip2Model,
    Blip2QFormerModel,
    Blip2VisionModel,
)
from .instructblip import (
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerModel,
    InstructBlipVideoForConditionalGeneration,
    InstructBlipVisionModel,
)
from .retrieval import (
    Blip2ForImageTextRetrieval,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)

__version__ = "0.1.0"

# Processing pulls in Pillow and tokenizers; load it only when asked for.
_PROCESSING = ("Blip2Processor", "InstructBlipProcessor", "InstructBlipVideoProcessor", "InstructBlipVideoVideoProcessor",
               "Blip2ImageProcessor", "BlipImageProcessor", "Tokenizer")


def __getattr__(name: str):
    if name in _PROCESSING:
        from . import processing

        return getattr(processing, name)
    raise AttributeError(f"module 'blip2' has no attribute {name!r}")


__all__ = [
    "load_model",
    "load_processor",
    "Blip2Config",
    "Blip2VisionConfig",
    "Blip2QFormerConfig",
    "OPTConfig",
    "T5Config",
    "LlamaConfig",
    "InstructBlipConfig",
    "InstructBlipVisionConfig",
    "InstructBlipQFormerConfig",
    "InstructBlipVisionModel",
    "InstructBlipQFormerModel",
    "InstructBlipForConditionalGeneration",
    "InstructBlipVideoConfig",
    "InstructBlipVideoVisionConfig",
    "InstructBlipVideoQFormerConfig",
    "InstructBlipVideoForConditionalGeneration",
    "Blip2VisionModel",
    "Blip2QFormerModel",
    "Blip2Model",
    "Blip2ForConditionalGeneration",
    "Blip2ForImageTextRetrieval",
    "Blip2TextModelWithProjection",
    "Blip2VisionModelWithProjection",
    *_PROCESSING,
]
