"""The engine without HTTP: generation from cached image-encoder states gives what the model's
own `generate` gives from pixels (OPT and T5, batched with mixed prompt lengths; an
instruction-aware Q-Former reading each prompt), and the cache skips the image encoder on a
second question."""

from __future__ import annotations

import pytest
import torch
from test_server_fixtures import _redraw, load_processor, make_engine, make_t5_engine, png_bytes

from blip2.server.engine import Engine, GenerateJob, GenerationSettings
from blip2.server.limits import ApiError, ImageData, Settings, decode_image, image_digest


def image_data(seed: int) -> ImageData:
    data = png_bytes(seed)
    return ImageData(image_digest(data), image=decode_image(data, 10**6))


def reference_texts(engine: Engine, images: list[ImageData], prompts: list[str], max_new_tokens: int) -> list[str]:
    """The model's documented generate on pixels, one image at a time, decoded as users do."""
    texts = []
    for img, prompt in zip(images, prompts):
        inputs = engine.processor(images=[img.image], return_tensors="pt")
        input_ids = None
        if prompt:
            input_ids = torch.tensor([engine.processor.tokenizer(prompt)["input_ids"]])
        out = engine.model.generate(inputs["pixel_values"], input_ids, max_new_tokens=max_new_tokens)
        texts.append(engine.processor.batch_decode(out, skip_special_tokens=True)[0].strip())
    return texts


@pytest.fixture(scope="module")
def opt_engine(tmp_path_factory):
    return make_engine(tmp_path_factory.mktemp("engine"), Settings(max_new_tokens=64), retrieval=False)


@pytest.fixture(scope="module")
def t5_engine(tmp_path_factory):
    return make_t5_engine(tmp_path_factory.mktemp("t5"), Settings(max_new_tokens=64))


@pytest.mark.parametrize("which", ["opt_engine", "t5_engine"])
def test_batched_generation_from_cached_features_equals_model_generate(which, request):
    engine = request.getfixturevalue(which)
    images = [image_data(s) for s in (1, 2, 3)]
    prompts = ["", "Question: what colour is the circle ? Answer:", "a photo of"]
    settings = GenerationSettings(max_new_tokens=8)
    expected = reference_texts(engine, images, prompts, 8)
    batched = engine.run(("generate", settings), [GenerateJob(i, p, settings) for i, p in zip(images, prompts)])
    assert [r.text for r in batched] == expected
    assert not any(r.cached for r in batched)
    # a second round reads every image's features from the cache and still agrees
    again = engine.run(("generate", settings), [GenerateJob(i, p, settings) for i, p in zip(images, prompts)])
    assert [r.text for r in again] == expected and all(r.cached for r in again)


def test_a_cached_image_never_reaches_the_image_encoder(opt_engine):
    calls = []
    hook = opt_engine.model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    qhook = opt_engine.model.qformer.register_forward_hook(lambda *a: calls.append(2))
    try:
        img = image_data(50)
        settings = GenerationSettings(max_new_tokens=3)
        opt_engine.run(("generate", settings), [GenerateJob(img, "Question: what ? Answer:", settings)])
        assert calls == [1, 2]
        cached = ImageData(img.sha256)  # as the server sends it: no pixels at all
        result = opt_engine.run(("generate", settings), [GenerateJob(cached, "Question: where ? Answer:", settings)])
        # The Q-Former runs again (an instruction-aware one reads the prompt); the image encoder does not.
        assert calls == [1, 2, 2] and result[0].cached
    finally:
        hook.remove()
        qhook.remove()


def test_one_bad_job_fails_alone(opt_engine):
    settings = GenerationSettings(max_new_tokens=4)
    jobs = [GenerateJob(image_data(60), "red " * 400, settings), GenerateJob(image_data(61), "", settings)]
    bad, good = opt_engine.run(("generate", settings), jobs)
    assert isinstance(bad, ApiError) and bad.status == 400 and "tokens long" in bad.message
    assert good.completion_tokens >= 1


def test_max_new_tokens_must_fit_the_position_table(opt_engine):
    settings = GenerationSettings(max_new_tokens=260)  # 4 queries + 1 + 260 - 1 > 256 positions
    [err] = opt_engine.run(("generate", settings), [GenerateJob(image_data(62), "", settings)])
    assert isinstance(err, ApiError) and "room for 252" in err.message


def test_a_typed_image_token_is_refused_not_a_batch_failure(opt_engine):
    config = opt_engine.model.config
    red = opt_engine.processor.tokenizer("red")["input_ids"][-1]
    settings = GenerationSettings(max_new_tokens=2)
    config.image_token_index = red  # pretend "red" is the <image> token of a newer checkpoint
    try:
        bad, good = opt_engine.run(("generate", settings), [GenerateJob(image_data(70), "a red circle", settings),
                                                            GenerateJob(image_data(71), "a blue circle", settings)])
    finally:
        config.image_token_index = None
    assert isinstance(bad, ApiError) and "image token" in bad.message
    assert good.completion_tokens >= 1


def test_match_and_embed_equal_the_retrieval_model_forward(tmp_path):
    from blip2.server.engine import EmbedJob, MatchJob

    engine = make_engine(tmp_path, Settings())
    r, proc = engine.retriever, engine.retrieval_processor
    images = [image_data(80), image_data(81)]
    texts = [["a red circle", "two blue squares"], ["a star"]]
    rows = engine.run(("match", "both"), [MatchJob(i, t, "both") for i, t in zip(images, texts)])
    for img, its, got in zip(images, texts, rows):
        pixels = proc(images=[img.image], return_tensors="pt")["pixel_values"]
        for text, row in zip(its, got):
            tok = proc.tokenizer([text], return_tensors="pt")
            itm = r(pixels, tok["input_ids"], tok["attention_mask"], use_image_text_matching_head=True)
            itc = r(pixels, tok["input_ids"], tok["attention_mask"])
            assert row["itm_probability"] == pytest.approx(itm.logits_per_image.softmax(-1)[0, 1].item(), abs=1e-5)
            assert row["itc_score"] == pytest.approx(itc.logits_per_image[0, 0].item(), abs=1e-5)
    [items] = engine.run(("embed",), [EmbedJob(["a red circle"], images[0])])
    tok = proc.tokenizer(["a red circle"], return_tensors="pt")
    itc = r(proc(images=[images[0].image], return_tensors="pt")["pixel_values"], tok["input_ids"], tok["attention_mask"])
    assert items[0]["embedding"] == pytest.approx(itc.text_embeds[0].tolist(), abs=1e-5)
    torch.testing.assert_close(torch.tensor(items[1]["query_embeddings"]), itc.image_embeds[0].detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["opt_engine", "t5_engine"])
def test_requests_with_different_prompts_and_lengths_share_a_batch(which, request):
    """Different prompts, prompt lengths and max_new_tokens in one batch: each row's text is the
    one its request gets alone."""
    engine = request.getfixturevalue(which)
    images = [image_data(s) for s in (70, 71, 72, 73)]
    prompts = ["a photo of", "", "Question: what colour is the big circle on the left ? Answer:", "a"]
    lengths = [2, 9, 5, 7]
    jobs = [GenerateJob(i, p, GenerationSettings(max_new_tokens=n)) for i, p, n in zip(images, prompts, lengths)]
    keys = {engine.generate_key(job.settings) for job in jobs}
    assert len(keys) == 1
    batched = engine.run(keys.pop(), jobs)
    for result, image, prompt, n in zip(batched, images, prompts, lengths):
        assert result.text == reference_texts(engine, [image], [prompt], n)[0]
        assert result.completion_tokens <= n
    beams = [GenerationSettings(max_new_tokens=n, num_beams=2) for n in (3, 4)]
    assert engine.generate_key(beams[0]) != engine.generate_key(beams[1])  # beams rank by the whole length


def test_an_instruction_aware_qformer_reads_each_prompt(tmp_path):
    """InstructBLIP's Q-Former reads the prompt, so the cache holds only the image encoder's states:
    two questions about one image (the second from the cache) each get what generate gives them."""
    from blip2 import InstructBlipConfig, InstructBlipForConditionalGeneration
    from test_server_fixtures import _tiny_config, make_captioning_checkpoint, make_retrieval_checkpoint

    processor = load_processor(make_captioning_checkpoint(tmp_path / "captioning"))
    instructions = load_processor(make_retrieval_checkpoint(tmp_path / "retrieval")).tokenizer  # BERT-style
    blip2 = _tiny_config(processor.tokenizer.vocab_size, instructions.vocab_size, retrieval=False).to_dict()
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(InstructBlipConfig.from_dict(blip2)).eval()
    _redraw(model, 5)
    engine = Engine(model, InstructProcessor(processor, instructions), settings=Settings(max_new_tokens=16))
    settings = GenerationSettings(max_new_tokens=6)
    prompts = ["what colour is the circle", "where is the square"]
    results = [engine.run(("generate", settings), [GenerateJob(image_data(70), p, settings)])[0] for p in prompts]
    assert [r.cached for r in results] == [False, True]

    pixel_values = processor(images=[image_data(70).image], return_tensors="pt")["pixel_values"]
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([processor.tokenizer(prompt)["input_ids"]])
        q = torch.tensor([instructions(prompt)["input_ids"]])
        out = model.generate(pixel_values, qformer_input_ids=q, input_ids=ids, max_new_tokens=6)
        assert result.text == processor.batch_decode(out, skip_special_tokens=True)[0].strip()


class InstructProcessor:
    """A BLIP-2 processor plus a Q-Former tokenizer, as the reference's InstructBLIP processor has."""

    def __init__(self, processor, qformer_tokenizer) -> None:
        self.processor, self.tokenizer, self.qformer_tokenizer = processor, processor.tokenizer, qformer_tokenizer

    def __call__(self, **kwargs):
        return self.processor(**kwargs)

    def decode(self, *args, **kwargs):
        return self.processor.decode(*args, **kwargs)
