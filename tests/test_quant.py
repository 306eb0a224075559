"""Inference-only linear layers: prepacked (oneDNN) and int8 weight-only, and the model-level
switches that install them. Correctness only; speed is measured in bench/."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from blip2.modeling.inference import optimize_for_inference
from blip2.modeling.packed import PackedLinear, pack_linears, packing_available, unpack_linears
from blip2.modeling.quant import (Int4Linear, Int8Linear, int4_kernel_available, quantize_language_model,
                                  quantize_linears, quantize_weight, quantize_weight_int4)

needs_packing = pytest.mark.skipif(not packing_available(), reason="PyTorch built without oneDNN")


def _linear(k=48, n=40, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def test_quantize_weight_is_symmetric_per_output_channel():
    w = torch.randn(7, 33)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (7,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    # The largest magnitude of each row maps to +-127; every value is within half a step.
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_its_dequantized_weight(rows, dtype, bias):
    linear = _linear(bias=bias, dtype=dtype)
    q = Int8Linear(linear)
    x = torch.randn(2, rows, 48, dtype=dtype)
    y = q(x)
    assert y.shape == (2, rows, 40) and y.dtype == dtype
    expected = nn.functional.linear(x.float(), q.dequantized(), None if linear.bias is None else linear.bias.float())
    # bfloat16 activations inside: error of a few bf16 steps of the output.
    torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=2e-2)
    exact = linear(x).float()
    assert (y.float() - exact).abs().max() < 0.1 * exact.abs().max()


def test_int8_linear_blockwise_path_covers_every_output(monkeypatch):
    import blip2.modeling.quant as quant

    monkeypatch.setattr(quant, "_BLOCK_ELEMENTS", 48 * 7)  # 7 rows per block: 40 outputs in 6 blocks
    linear = _linear()
    q = Int8Linear(linear)
    x = torch.randn(9, 48)
    torch.testing.assert_close(q(x).float(), nn.functional.linear(x, q.dequantized(), linear.bias), atol=3e-2, rtol=2e-2)


def test_quantize_weight_int4_is_within_half_a_step_per_group():
    w = torch.randn(5, 64)
    q, scale, zero = quantize_weight_int4(w, 32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == zero.shape == (5, 2)
    back = (q.view(5, 2, 32).float() - 8) * scale[..., None] + zero[..., None]
    assert torch.all((back.view(5, 64) - w).abs() <= scale.repeat_interleave(32, dim=1) / 2 + 1e-5)


@pytest.mark.parametrize("n, k", [(200, 256), (64, 37), (16, 96)])  # a tail past the kernel's blocks; no group fits; small
@pytest.mark.parametrize("rows", [1, 5, 40])  # the int4 kernel, and bfloat16 blocks of the unpacked weight
def test_int4_linear_matches_its_dequantized_weight(n, k, rows):
    linear = _linear(k, n)
    q = Int4Linear(linear)
    assert q.weight_int4.shape[0] == (n - n % 64 if k % 32 == 0 and int4_kernel_available() else 0)
    x = torch.randn(2, rows, k)
    y = q(x)
    assert y.shape == (2, rows, n) and y.dtype == torch.float32
    expected = nn.functional.linear(x.bfloat16().float(), q.dequantized(), linear.bias)
    torch.testing.assert_close(y, expected, atol=3e-2, rtol=2e-2)
    exact = linear(x)
    assert (y - exact).abs().max() < 0.15 * exact.abs().max()


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_linear_and_keeps_its_state_dict(dtype):
    linear = _linear(dtype=dtype)
    reference = copy.deepcopy(linear)
    weight = linear.weight
    packed = PackedLinear(linear)
    assert weight.numel() == 0  # the plain copy is freed: the packed one replaces it
    for shape in [(1, 48), (8, 48), (2, 5, 48)]:
        x = torch.randn(shape, dtype=dtype)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
        torch.testing.assert_close(packed(x), reference(x), **tol)
    state = packed.state_dict()
    assert set(state) == {"weight", "bias"}
    assert torch.equal(state["weight"], reference.weight.detach()) and torch.equal(state["bias"], reference.bias.detach())
    copied = copy.deepcopy(packed)  # through the plain weight: opaque tensors do not copy
    torch.testing.assert_close(copied(x), packed(x))
    back = packed.unpacked()
    assert type(back) is nn.Linear and back.weight is weight and torch.equal(back.weight, reference.weight)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        # 8 wide (the int8 kernel needs multiples of 16: the fallback runs) and 32 wide (the kernel runs).
        self.language_model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x):
        return self.language_model(self.vision_model(x))


@needs_packing
def test_pack_and_unpack_a_model_round_trip():
    model = _Tiny().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 8)
    assert pack_linears(model) == 4
    assert all(type(m) is not nn.Linear for m in model.modules())
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert unpack_linears(model) == 4
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_quantize_language_model_leaves_the_image_side_alone():
    model = _Tiny().eval()
    quantize_language_model(model)
    assert all(isinstance(m, Int8Linear) for m in model.language_model if not isinstance(m, nn.ReLU))
    assert all(type(m) is nn.Linear for m in model.vision_model if not isinstance(m, nn.GELU))
    with pytest.raises(ValueError, match="no linear layers"):
        quantize_language_model(nn.Module())


@needs_packing
def test_quantize_after_packing_replaces_packed_layers():
    model = _Tiny().eval()
    reference = copy.deepcopy(model)
    optimize_for_inference(model, quantize="int8")
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 2
    x = torch.randn(4, 8)
    assert (model(x) - reference(x)).abs().max() < 0.05
    assert quantize_linears(nn.Sequential(PackedLinear(nn.Linear(4, 4)))) == 1


def test_optimize_for_inference_rejects_unknown_quantization():
    with pytest.raises(ValueError, match="int8"):
        optimize_for_inference(_Tiny(), quantize="int2")


class _FeedForward(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(16, 32), nn.Linear(32, 16), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@needs_packing
@pytest.mark.parametrize("act", [torch.nn.functional.gelu, torch.nn.functional.relu])
def test_feed_forward_activation_is_fused_and_restored(act):
    torch.manual_seed(0)
    block = _FeedForward(act).eval()
    reference = copy.deepcopy(block)
    x = torch.randn(5, 16)
    pack_linears(block)
    assert block.act is not act and block.fc1.activation is act
    torch.testing.assert_close(block(x), reference(x), atol=1e-5, rtol=1e-5)
    unpack_linears(block)
    assert block.act is act
    torch.testing.assert_close(block(x), reference(x), atol=1e-5, rtol=1e-5)
    pack_linears(block)
    quantize_linears(block)  # int8 layers do not fuse: the activation comes back
    assert block.act is act and (block(x) - reference(x)).abs().max() < 0.05


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_flan_t5_runs_with_its_output_projection_quantized(kind, tmp_path):
    """Flan-T5 keeps wo's input in wo's dtype; a quantized wo (no float weight) must still run."""
    from transformers import Blip2ForConditionalGeneration as RefBlip2

    from blip2 import Blip2ForConditionalGeneration
    from conftest import make_inputs, make_ref, ref_config, save_ref

    t5 = dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
              feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
              tie_word_embeddings=False)
    config = ref_config(text=t5)
    config.text_config = type(config.text_config)(**t5)
    folder = save_ref(make_ref(RefBlip2, config, std=0.05), tmp_path)
    plain = Blip2ForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.bfloat16)
    quantized = Blip2ForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.bfloat16, quantize=kind)
    layer = Int8Linear if kind == "int8" else Int4Linear
    assert sum(isinstance(m, layer) for m in quantized.language_model.modules()) > 0
    inputs = make_inputs(config, batch=2, seq=5)
    inputs = dict(pixel_values=inputs["pixel_values"].bfloat16(), input_ids=inputs["input_ids"],
                  attention_mask=inputs["attention_mask"], decoder_input_ids=inputs["input_ids"][:, :3])
    with torch.no_grad():
        a, b = plain(**inputs).logits.float(), quantized(**inputs).logits.float()
        assert (a - b).abs().max() < 0.25 * a.abs().max()
        tokens = quantized.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                                    max_new_tokens=4)
    assert tokens.shape[0] == 2


def test_int8_quantization_by_row_blocks_equals_the_whole_weight_at_once(monkeypatch):
    # Blocks keep the float32 temporaries small (a whole output head would add 1 GB to a load's peak).
    from blip2.modeling import quant

    torch.manual_seed(0)
    linear = nn.Linear(24, 37).to(torch.bfloat16)
    monkeypatch.setattr(quant, "_QUANT_BLOCK_ELEMENTS", 24 * 5)  # 5 rows a block, a short last block
    layer = Int8Linear(linear)
    w = linear.weight.float()
    expected_scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    assert torch.equal(layer.scale, expected_scale.to(torch.bfloat16))
    assert torch.equal(layer.weight_int8, torch.round(w / expected_scale[:, None]).clamp(-127, 127).to(torch.int8))
