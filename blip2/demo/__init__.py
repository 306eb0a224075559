"""The demo: a synthetic world of coloured shapes, the recipe that trains a small BLIP-2 on it,
and the model that recipe produced, shipped here as the package's default model."""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"  # Blip2ForConditionalGeneration: captions and answers
RETRIEVAL_DIR = DEMO_DIR / "retrieval"  # Blip2ForImageTextRetrieval: ITM and ITC
EXAMPLES_DIR = DEMO_DIR / "examples"  # a few images drawn by the world generator
