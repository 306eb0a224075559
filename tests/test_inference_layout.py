"""The fast path is the default: a model from `from_pretrained` prepacks its linear layers when used
for inference on CPU and gives plain weights back for training, saving, dtype and device changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from blip2 import Blip2ForConditionalGeneration
from blip2.modeling.packed import PackedLinear, packing_available

from conftest import ATOL, make_inputs, make_ref, ref_config, save_ref

pytestmark = pytest.mark.skipif(not packing_available(), reason="PyTorch built without oneDNN")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, object]:
    from transformers import Blip2ForConditionalGeneration as Ref

    config = ref_config(text={"vocab_size": 99}, num_query_tokens=4)
    directory = save_ref(make_ref(Ref, config), tmp_path_factory.mktemp("layout") / "fp32")
    return directory, config


def _packed(model: nn.Module) -> int:
    return sum(isinstance(m, PackedLinear) for m in model.modules())


def _load(directory, **kwargs):
    return Blip2ForConditionalGeneration.from_pretrained(directory, **kwargs)


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_packs_on_its_own_with_the_same_tokens(saved, beams):
    directory, config = saved
    plain, model = _load(directory), _load(directory)
    plain.auto_pack = False
    inputs = make_inputs(config, batch=2, seq=4)
    kwargs = dict(max_new_tokens=7, num_beams=beams)
    assert _packed(model) == 0  # loading alone packs nothing
    ids = model.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], **kwargs)
    assert _packed(model) > 0 and _packed(plain) == 0
    assert torch.equal(ids, plain.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], **kwargs))


def test_forward_without_grad_is_packed_and_within_parity(saved):
    directory, config = saved
    plain, model = _load(directory), _load(directory)
    plain.auto_pack = False
    inputs = make_inputs(config)
    with torch.no_grad():
        expected = plain(**inputs).logits
    with torch.inference_mode():
        got = model(**inputs).logits
    assert _packed(model) > 0
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)


def test_training_after_inference_gets_plain_weights_and_grads(saved):
    directory, config = saved
    model = _load(directory)
    before = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before any packing
    inputs = make_inputs(config)
    model.generate(inputs["pixel_values"], max_new_tokens=3)
    assert _packed(model) > 0
    model.train()
    assert _packed(model) == 0
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)  # the same Parameters
    loss = model(**inputs).loss
    loss.backward()
    fc1 = model.language_model.layers[0].fc1.weight
    assert fc1.grad is not None and fc1.grad.abs().sum() > 0
    old = fc1.detach().clone()
    optimizer.step()
    assert not torch.equal(fc1, old)


def test_parameters_after_inference_are_all_there(saved):
    directory, config = saved
    model = _load(directory)
    count = model.num_parameters()
    model.generate(make_inputs(config)["pixel_values"], max_new_tokens=2)
    assert model.num_parameters() == count and _packed(model) == 0  # asking for them unpacks


def test_unpacking_frees_each_packed_weight_before_refilling_the_next(saved, monkeypatch):
    # Otherwise the model exists twice (packed and plain) while it unpacks: 2x peak memory on train().
    import weakref

    directory, config = saved
    model = _load(directory).eval()
    model.generate(make_inputs(config)["pixel_values"], max_new_tokens=1)
    done: list[weakref.ref] = []
    still_alive: list[int] = []
    original = PackedLinear.unpacked

    def spy(self):
        still_alive.append(sum(ref() is not None for ref in done))
        done.append(weakref.ref(self.packed))
        return original(self)

    monkeypatch.setattr(PackedLinear, "unpacked", spy)
    model.train()
    assert len(done) > 3 and max(still_alive) <= 1  # at most the layer just unpacked, still being let go


def test_forward_with_grad_in_eval_mode_unpacks(saved):
    directory, config = saved
    model = _load(directory)
    inputs = make_inputs(config)
    model.generate(inputs["pixel_values"], max_new_tokens=2)
    pixels = inputs["pixel_values"].clone().requires_grad_(True)
    model(pixels, inputs["input_ids"]).logits.sum().backward()  # saliency: gradients to the image
    assert _packed(model) == 0 and pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_save_after_inference_equals_the_file_loaded(saved, tmp_path):
    directory, config = saved
    model = _load(directory)
    model.generate(make_inputs(config)["pixel_values"], max_new_tokens=2)
    assert _packed(model) > 0
    model.save_pretrained(tmp_path)
    original, written = load_file(directory / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert written.keys() == original.keys()
    for key in original:
        assert torch.equal(written[key], original[key]), key


def test_dtype_change_after_packing(saved):
    directory, config = saved
    model = _load(directory)
    inputs = make_inputs(config)
    model.generate(inputs["pixel_values"], max_new_tokens=3)
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = model.generate(inputs["pixel_values"].bfloat16(), max_new_tokens=3)
    assert _packed(model) > 0 and all(m.packed.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, PackedLinear))
    reference = _load(directory, torch_dtype=torch.bfloat16)
    reference.auto_pack = False
    assert ids.shape == reference.generate(inputs["pixel_values"].bfloat16(), max_new_tokens=3).shape


def test_part_converted_while_packed_keeps_working(saved):
    directory, config = saved
    model = _load(directory)
    inputs = make_inputs(config)
    model.generate(inputs["pixel_values"], max_new_tokens=2)
    model.vision_model.to(torch.bfloat16)  # a part: its packed layers convert themselves
    with torch.no_grad():
        out = model.vision_model(inputs["pixel_values"].bfloat16()).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.train()
    fc1 = [m for name, m in model.vision_model.named_modules() if name.endswith("fc1")][0]
    assert type(fc1) is nn.Linear and fc1.weight.dtype == torch.bfloat16


def test_load_state_dict_into_a_packed_model(saved):
    directory, config = saved
    model, other = _load(directory), _load(directory)
    inputs = make_inputs(config)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
        model.generate(inputs["pixel_values"], max_new_tokens=2)
        model.load_state_dict(other.state_dict())
        other.auto_pack = False
        torch.testing.assert_close(model(**inputs).logits, other(**inputs).logits, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_weight_only_quantization_opt_in_from_pretrained(saved, kind):
    from blip2.modeling.quant import QUANTIZERS

    directory, config = saved
    model = _load(directory, quantize=kind)
    assert all(not isinstance(m, nn.Linear) for m in model.language_model.modules())
    assert sum(isinstance(m, QUANTIZERS[kind]) for m in model.language_model.modules()) > 0
    inputs = make_inputs(config)
    with torch.no_grad():
        logits = model(**inputs).logits
        exact = _load(directory)(**inputs).logits
    assert (logits - exact).abs().max() < 0.25 * exact.abs().max()
    model.generate(inputs["pixel_values"], max_new_tokens=3)
    assert _packed(model.vision_model) > 0  # the image side still packs
    with pytest.raises(ValueError, match="quantize"):
        _load(directory, quantize="int3")


def test_only_layers_large_enough_to_gain_are_packed(saved, monkeypatch):
    import blip2.modeling.packed as packed

    directory, config = saved
    sizes = []
    for limit in (32 * 40, 1 << 18):  # some of the tiny model's layers; none of them
        monkeypatch.setattr(packed, "PACK_MIN_WEIGHTS", limit)
        model = _load(directory)
        model.generate(make_inputs(config)["pixel_values"], max_new_tokens=2)
        small = [m for m in model.modules() if type(m) is nn.Linear]
        assert all(m.weight.numel() < limit for m in small)
        assert all(m.packed.numel() >= limit for m in model.modules() if isinstance(m, PackedLinear))
        sizes.append(_packed(model))
    assert sizes[0] > 0 and sizes[1] == 0
