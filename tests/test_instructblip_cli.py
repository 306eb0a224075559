"""InstructBLIP checkpoints through the generic loader and `blip2 ask` / `blip2 caption`: the
instruction goes to both the Q-Former and the language model, as the reference does."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers

import blip2
from blip2.cli import main
from blip2.demo import EXAMPLES_DIR
from conftest import BASE_OPT, BASE_QFORMER, BASE_VISION, make_ref
from test_instructblip_processor import BERT_VOCAB, reference_processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny InstructBLIP-OPT saved by the reference, with its processor (image size 16)."""
    folder = tmp_path_factory.mktemp("instructblip")
    processor = reference_processor(folder, "opt")
    processor.image_processor.size = {"height": 16, "width": 16}
    tok = processor.tokenizer
    text = {**BASE_OPT, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "architectures": ["OPTForCausalLM"]}
    config = transformers.InstructBlipConfig(vision_config=BASE_VISION,
                                             qformer_config={**BASE_QFORMER, "vocab_size": len(BERT_VOCAB)},
                                             text_config=text, num_query_tokens=3)
    ref = make_ref(transformers.InstructBlipForConditionalGeneration, config, seed=1)
    ref.save_pretrained(str(folder / "model"))
    processor.save_pretrained(str(folder / "model"))
    return folder / "model", ref


def test_load_model_and_processor_pick_the_class(checkpoint):
    folder, _ = checkpoint
    assert type(blip2.load_model(folder)).__name__ == "InstructBlipForConditionalGeneration"
    assert type(blip2.load_processor(folder)).__name__ == "InstructBlipProcessor"


def test_load_model_refuses_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type 'llava'"):
        blip2.load_model(tmp_path)


def test_ask_sends_the_instruction_to_both(checkpoint, capsys):
    folder, ref = checkpoint
    image = sorted(EXAMPLES_DIR.glob("*.png"))[0]
    question = "what is in the picture?"
    code = main(["ask", str(image), question, "--model", str(folder), "--format", "jsonl", "--max-new-tokens", "6"])
    assert code == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"]
    processor = blip2.load_processor(folder)
    prompt = f"Question: {question} Answer:"
    from PIL import Image

    x = processor(images=Image.open(image), text=prompt, return_tensors="pt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref.generate(**x, max_new_tokens=6)
    assert answer == processor.batch_decode(expected, skip_special_tokens=True)[0].strip()


def test_caption_runs_with_the_default_instruction(checkpoint, capsys):
    folder, _ = checkpoint
    image = sorted(EXAMPLES_DIR.glob("*.png"))[0]
    assert main(["caption", str(image), "--model", str(folder), "--max-new-tokens", "4"]) == 0
    assert image.name in capsys.readouterr().out


def test_server_engine_sends_the_prompt_to_both(checkpoint):
    """`blip2 serve`'s engine: each job's prompt is its instruction; features are cached per (image, prompt)."""
    from PIL import Image

    from blip2.server.engine import Engine, GenerateJob, GenerationSettings
    from blip2.server.limits import ImageData

    folder, ref = checkpoint
    engine = Engine.load(folder)
    images = [Image.open(p).convert("RGB") for p in sorted(EXAMPLES_DIR.glob("*.png"))[:2]]
    prompts = ["what is in the picture?", "how many are there?"]
    settings = GenerationSettings(max_new_tokens=5)
    jobs = [GenerateJob(ImageData(f"sha{i}", image=img), p, settings) for i, (img, p) in enumerate(zip(images, prompts))]
    for attempt in range(2):  # the second time from the cache
        results = engine.run(("generate", settings), jobs)
        for img, prompt, result in zip(images, prompts, results):
            x = engine.processor(images=img, text=prompt, return_tensors="pt")
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = ref.generate(**x, max_new_tokens=5)
            assert result.text == engine.processor.decode(expected[0, 1:], skip_special_tokens=True), prompt
            assert result.cached == (attempt == 1)
