"""The prompts a model family was evaluated with in the paper, from a model's config.

(One function for now; the per-family registry replaces its body when it lands.)
"""

from __future__ import annotations

CAPTION_PROMPT = ""  # the demo and the hub models caption from the image alone; COCO fine-tunes use "a photo of"


def question_template(config) -> str:
    """The paper's VQA prompt: "Question: {} Short answer:" for Flan-T5, "Question: {} Answer:" otherwise."""
    text = getattr(config, "text_config", config)
    return "Question: {} Short answer:" if getattr(text, "model_type", None) == "t5" else "Question: {} Answer:"
