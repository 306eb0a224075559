"""BLIP-2 in plain PyTorch: the transformers Blip2 API and checkpoint format, leaner and faster."""

from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config
from .hf_compat import (
    Blip2ForConditionalGeneration,
    Blip2Model,
    Blip2QFormerModel,
    Blip2VisionModel,
)
from .retrieval import (
    Blip2ForImageTextRetrieval,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)

__version__ = "0.1.0"

__all__ = [
    "Blip2Config",
    "Blip2VisionConfig",
    "Blip2QFormerConfig",
    "OPTConfig",
    "T5Config",
    "Blip2VisionModel",
    "Blip2QFormerModel",
    "Blip2Model",
    "Blip2ForConditionalGeneration",
    "Blip2ForImageTextRetrieval",
    "Blip2TextModelWithProjection",
    "Blip2VisionModelWithProjection",
]
