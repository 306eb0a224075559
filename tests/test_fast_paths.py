"""The speed paths give the same results as the plain ones: the single-query attention, the
in-place beam reorder of the KV cache, one image shared by several prompts, prepacked
weights in generation, and the checkpoint reader's dtype conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blip2 import Blip2ForConditionalGeneration
from blip2.hf_compat import fast_dtype
from blip2.modeling.attention import KVCache, attend
from blip2.modeling.inference import optimize_for_inference
from blip2.modeling.packed import packing_available

from conftest import make_inputs, make_ref, ref_config, save_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_query_attention_matches_the_fused_kernel(dtype):
    torch.manual_seed(0)
    cache = torch.randn(3, 4, 20, 16, dtype=dtype)
    q, k, v = torch.randn(3, 4, 1, 16, dtype=dtype), cache[:, :, :11], cache.flip(0)[:, :, :11]  # strided k, v
    mask = torch.zeros(3, 1, 1, 11, dtype=dtype)
    mask[0, ..., :4] = torch.finfo(dtype).min  # left padding in row 0
    got, _ = attend(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


def test_cache_reorder_in_place_equals_index_select():
    torch.manual_seed(0)
    cache = KVCache(num_layers=2, batch=4, heads=2, max_len=9, head_dim=3, dtype=torch.float32)
    k, v = torch.randn(4, 2, 5, 3), torch.randn(4, 2, 5, 3)
    for layer in range(2):
        cache.write(layer, k, v, torch.arange(5), window=5)
    cache.advance(5)
    index = torch.tensor([2, 2, 0, 3])
    cache.reorder(index)  # same batch size: in place
    for layer in range(2):
        torch.testing.assert_close(cache.k[layer][:, :, :5], k.index_select(0, index), atol=0, rtol=0)
        torch.testing.assert_close(cache.v[layer][:, :, :5], v.index_select(0, index), atol=0, rtol=0)
    cache.reorder(torch.tensor([1, 1, 1, 3, 3, 3]))  # a new batch size: expansion
    assert cache.k[0].shape[0] == 6 and torch.equal(cache.k[0][3, :, :5], k[3])  # current row 3 was old row 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, object]:
    from transformers import Blip2ForConditionalGeneration as Ref

    config = ref_config(text={"vocab_size": 99}, num_query_tokens=4, image_token_index=98)
    directory = save_ref(make_ref(Ref, config), tmp_path_factory.mktemp("fast") / "fp32")
    return directory, config


def test_one_image_with_several_prompts_is_encoded_once(saved):
    directory, config = saved
    model = Blip2ForConditionalGeneration.from_pretrained(directory)
    inputs = make_inputs(config, batch=3, seq=5)
    image = inputs["pixel_values"][:1]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    calls = []
    model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    together = model.generate(image, ids, mask, max_new_tokens=6)
    assert len(calls) == 1
    for row in range(3):
        alone = model.generate(image, ids[row : row + 1, mask[row].bool()], max_new_tokens=6)
        assert torch.equal(together[row, : alone.shape[1]], alone[0])


def test_shared_query_prefix_prefills_like_the_whole_prompt(saved):
    """One image, several prompts: the queries' keys and values are computed for one row and copied;
    the prompts' logits equal those of the image repeated per row (nothing shared)."""
    from blip2.generation import GenerationConfig

    directory, config = saved
    model = Blip2ForConditionalGeneration.from_pretrained(directory)
    inputs = make_inputs(config, batch=3, seq=5)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cfg = GenerationConfig(max_new_tokens=4, bos_token_id=2)
    with torch.inference_mode():
        shared, _ = model.stepper(inputs["pixel_values"][:1], ids, mask, cfg)
        apart, _ = model.stepper(inputs["pixel_values"][:1].expand(3, -1, -1, -1), ids, mask, cfg)
        assert (shared.shared, apart.shared) == (config.num_query_tokens, 0)
        torch.testing.assert_close(shared.prefill(), apart.prefill(), atol=1e-5, rtol=1e-5)
        for layer in range(len(shared.cache.k)):
            torch.testing.assert_close(shared.cache.k[layer], apart.cache.k[layer], atol=1e-5, rtol=1e-5)
    together = model.generate(inputs["pixel_values"][:1], ids, mask, max_new_tokens=6)
    repeated = model.generate(inputs["pixel_values"][:1].expand(3, -1, -1, -1), ids, mask, max_new_tokens=6)
    assert torch.equal(together, repeated)


def image_token_prompts(config, lengths, lead=0, seed=3):
    """Left-padded prompts holding the image tokens the newer processors write: [pad, (lead text),
    image x Q, BOS, text], one row per length."""
    gen = torch.Generator().manual_seed(seed)
    Q, image, bos = config.num_query_tokens, config.image_token_index, config.text_config.bos_token_id
    rows = [torch.randint(4, image, (lead,), generator=gen).tolist() + [image] * Q + [bos]
            + torch.randint(4, image, (n,), generator=gen).tolist() for n in lengths]
    T = max(len(r) for r in rows)
    ids = torch.tensor([[config.text_config.pad_token_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("beams", [1, 2])
def test_prompts_with_image_tokens_share_the_query_prefix(saved, beams):
    """Newer prompts carry the image tokens themselves, behind each row's padding: one image with
    several such prompts still computes the queries' keys and values once, and every row gives
    what it gives alone and what the image repeated per row (nothing shared) gives."""
    from blip2.generation import GenerationConfig

    directory, config = saved
    model = Blip2ForConditionalGeneration.from_pretrained(directory)
    image = make_inputs(config, batch=1)["pixel_values"]
    ids, mask = image_token_prompts(config, lengths=[1, 5, 3])
    cfg = GenerationConfig(max_new_tokens=4, bos_token_id=2)
    with torch.inference_mode():
        shared, _ = model.stepper(image, ids, mask, cfg)
        apart, _ = model.stepper(image.expand(3, -1, -1, -1), ids, mask, cfg)
        assert (shared.shared, apart.shared) == (config.num_query_tokens, 0)
        torch.testing.assert_close(shared.prefill(), apart.prefill(), atol=1e-5, rtol=1e-5)
    kwargs = dict(max_new_tokens=6, num_beams=beams)
    together = model.generate(image, ids, mask, **kwargs)
    assert torch.equal(together, model.generate(image.expand(3, -1, -1, -1), ids, mask, **kwargs))
    for row in range(3):
        alone = model.generate(image, ids[row : row + 1, mask[row].bool()], **kwargs)
        assert torch.equal(together[row, : alone.shape[1]], alone[0])


def test_image_tokens_after_text_are_not_shared(saved):
    """A prompt whose image block does not open the row (text before it) keeps its layout and shares
    nothing; the answers are those of the image repeated per row."""
    from blip2.generation import GenerationConfig

    directory, config = saved
    model = Blip2ForConditionalGeneration.from_pretrained(directory)
    image = make_inputs(config, batch=1)["pixel_values"]
    ids, mask = image_token_prompts(config, lengths=[2, 4], lead=2)
    with torch.inference_mode():
        stepper, _ = model.stepper(image, ids, mask, GenerationConfig(max_new_tokens=4, bos_token_id=2))
    assert stepper.shared == 0
    assert torch.equal(model.generate(image, ids, mask, max_new_tokens=5),
                       model.generate(image.expand(2, -1, -1, -1), ids, mask, max_new_tokens=5))


@pytest.mark.skipif(not packing_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("beams", [1, 3])
def test_packed_model_generates_the_same_tokens(saved, beams):
    directory, config = saved
    plain = Blip2ForConditionalGeneration.from_pretrained(directory)
    packed = optimize_for_inference(Blip2ForConditionalGeneration.from_pretrained(directory))
    inputs = make_inputs(config, batch=2, seq=4)
    kwargs = dict(max_new_tokens=7, num_beams=beams)
    assert torch.equal(plain.generate(inputs["pixel_values"], **kwargs), packed.generate(inputs["pixel_values"], **kwargs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_half_checkpoint_converts_like_tensor_to(saved, tmp_path, dtype):
    directory, _ = saved
    half = Blip2ForConditionalGeneration.from_pretrained(directory, torch_dtype=torch.float16)
    half.save_pretrained(tmp_path)
    loaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path, torch_dtype=dtype)
    expected = half.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, expected[name].to(dtype)), name


def test_fast_dtype_is_bfloat16_only_where_it_is_native():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert fast_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
