"""Text generation as small functions over a step interface.

A model supplies a `Stepper` (prefill once, then one token at a time, rows selectable for
beams); `generate` runs greedy search, sampling or beam search over it with the semantics of
transformers 4.37, reading its settings from a `GenerationConfig`.
"""

from .base import Stepper, Streamer
from .config import GENERATION_CONFIG_NAME, GenerationConfig, resolve_config
from .search import BeamHypotheses, beam_search, generate, greedy, sample
from .streaming import CallbackStreamer, TextIteratorStreamer, run_in_thread

__all__ = [
    "GENERATION_CONFIG_NAME",
    "BeamHypotheses",
    "CallbackStreamer",
    "GenerationConfig",
    "Stepper",
    "Streamer",
    "TextIteratorStreamer",
    "beam_search",
    "generate",
    "greedy",
    "resolve_config",
    "run_in_thread",
    "sample",
]
