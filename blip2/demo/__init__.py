"""The demo: a synthetic world of coloured shapes, the recipes that train a small BLIP-2 and an
instruction-aware InstructBLIP on it, and the models they produced, shipped here as the package's
default models."""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"  # Blip2ForConditionalGeneration: captions (blip2.demo.recipe)
RETRIEVAL_DIR = DEMO_DIR / "retrieval"  # Blip2ForImageTextRetrieval: ITM and ITC
INSTRUCT_DIR = DEMO_DIR / "instruct"  # InstructBlipForConditionalGeneration: answers (blip2.demo.instruct)
EXAMPLES_DIR = DEMO_DIR / "examples"  # a few images drawn by the world generator

# What the commands and the server use without --model: answers come from the instruction-aware
# model; captions from whichever captioned validation images better, which was the instruction-aware
# one (blip2/demo/REPORT.md).
ANSWER_DIR = INSTRUCT_DIR if (INSTRUCT_DIR / "config.json").is_file() else MODEL_DIR
CAPTION_DIR = ANSWER_DIR
