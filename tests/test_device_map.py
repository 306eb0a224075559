"""Device maps through accelerate: placement with the reference's meaning (checked on meta models
with fake memory budgets against the reference's own placement), CPU + disk offload giving the
same outputs, and clear errors."""

from __future__ import annotations

import pytest
import torch

accelerate = pytest.importorskip("accelerate", reason="the [accelerate] extra is part of [test]")
from accelerate import init_empty_weights, infer_auto_device_map  # noqa: E402
from accelerate.utils import compute_module_sizes, get_balanced_memory  # noqa: E402
from transformers import Blip2ForConditionalGeneration as RefBlip2  # noqa: E402

from blip2 import Blip2ForConditionalGeneration  # noqa: E402
from blip2 import checkpoint as ckpt  # noqa: E402
from blip2.device_map import infer_device_map, reference_device_map  # noqa: E402
from conftest import make_inputs, make_ref, ref_config, save_ref  # noqa: E402

CONFIG = dict(text=dict(num_hidden_layers=6, hidden_size=64, ffn_dim=128, word_embed_proj_dim=64))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    config = ref_config(**CONFIG)
    return config, save_ref(make_ref(RefBlip2, config), tmp_path_factory.mktemp("dm") / "base")


def _device_of(name: str, placement: dict):
    best = max((k for k in placement if k == "" or name == k or name.startswith(k + ".")), key=len)
    return placement[best]


def _ours_from_reference(model, ref_placement: dict) -> dict[str, object]:
    """Our language model layers' parameters -> the device the reference's placement gives their
    checkpoint tensors. Compared: the decoder layers, the bulk of the model. Not compared: the
    Q-Former (the reference may put one layer's query and key on different devices, which our
    fused layers cannot be) and the small modules that fill a device's last bytes (the reference
    declares its final norm before the layers, so leftovers land differently)."""
    found = {}
    for rule in [r for r in model.key_table().rules if r.ours.startswith("language_model.layers.")]:
        devices = {_device_of(h, ref_placement) for h in rule.hf}
        assert len(devices) == 1, f"the reference splits the tensors of our {rule.ours}: {devices}"
        found[rule.ours] = devices.pop()
    return found


@pytest.mark.parametrize("strategy", ["sequential", "balanced", "balanced_low_0"])
@pytest.mark.parametrize("budget", [{0: 120_000, 1: 150_000, "cpu": 10**9}, {0: 200_000, 1: 60_000, 2: 90_000, "cpu": 10**9},
                                    {0: 350_000, "cpu": 300_000}], ids=["2gpu", "3gpu", "gpu-cpu-disk"])
def test_placement_matches_the_reference_on_fake_budgets(strategy, budget):
    config = ref_config(**CONFIG)
    with init_empty_weights():
        ref = RefBlip2(config)
    ref.tie_weights()
    ours = ckpt.build_on_meta(lambda: Blip2ForConditionalGeneration(Blip2ForConditionalGeneration.config_class.from_dict(config.to_dict())))

    def reference_map():
        mm = dict(budget) if strategy == "sequential" else get_balanced_memory(
            ref, max_memory=dict(budget), no_split_module_classes=ref._no_split_modules,
            low_zero=strategy == "balanced_low_0")
        return infer_auto_device_map(ref, max_memory=mm, no_split_module_classes=ref._no_split_modules)

    mine = infer_device_map(ours, strategy, max_memory=dict(budget))
    theirs = _ours_from_reference(ours, reference_map())
    assert {n: _device_of(n, mine) for n in theirs} == theirs  # the language model is placed as the reference's
    # hf_device_map's names are the reference's, and passing them back places every tensor alike.
    named = reference_device_map(ours, mine)
    assert set(named) <= set(dict(ref.named_modules())) | set(dict(ref.named_parameters())), named
    back = infer_device_map(ours, named)
    assert {n: _device_of(n, back) for n, _ in ours.named_parameters()} == {n: _device_of(n, mine) for n, _ in ours.named_parameters()}
    # Budgets hold and no layer of a no-split class is split.
    sizes = compute_module_sizes(ours)
    used: dict = {}
    for name, device in mine.items():
        used[device] = used.get(device, 0) + sizes[name]
    assert all(used[d] <= budget[d] for d in used if d != "disk"), (used, budget)
    assert len(used) >= (3 if len(budget) == 2 else 2), used  # the budgets force a real split
    for name in mine:
        parts = name.split(".")
        for i in range(1, len(parts)):
            module = ours.get_submodule(".".join(parts[:i]))
            assert type(module).__name__ not in ours._no_split_modules, f"{name} splits a {type(module).__name__}"


def test_cpu_and_disk_offload_give_the_same_outputs(base, tmp_path):
    config, folder = base
    inputs = make_inputs(config)
    plain = Blip2ForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        want, want_ids = plain(**inputs).logits, plain.generate(inputs["pixel_values"], max_new_tokens=6)
    device_map = {"": "cpu", "language_model.layers.1": "disk",
                  "language_model.model.decoder.layers.4": "disk",  # the reference's name for our layers.4
                  "qformer": "disk"}
    model = Blip2ForConditionalGeneration.from_pretrained(folder, device_map=device_map,
                                                          offload_folder=tmp_path / "offload")
    ref_names = {f"language_model.model.decoder.layers.{i}": "disk" for i in (1, 4)}
    assert {k: v for k, v in model.hf_device_map.items() if v == "disk"} == {"qformer": "disk", **ref_names}
    assert model.language_model.layers[4].fc1.weight.device.type == "meta"  # read from disk when used
    assert any((tmp_path / "offload").iterdir())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)
        assert torch.equal(model.generate(inputs["pixel_values"], max_new_tokens=6), want_ids)


def test_auto_with_a_small_cpu_budget_offloads_to_disk(base, tmp_path):
    config, folder = base
    inputs = make_inputs(config)
    with torch.no_grad():
        want = Blip2ForConditionalGeneration.from_pretrained(folder)(**inputs).logits
    budget = {"cpu": 150_000}
    with pytest.raises(ValueError, match=r"max_memory \{'cpu': 150000\} cannot hold the whole model.*offload_folder"):
        Blip2ForConditionalGeneration.from_pretrained(folder, device_map="auto", max_memory=budget)
    model = Blip2ForConditionalGeneration.from_pretrained(folder, device_map="auto", max_memory=budget,
                                                          offload_folder=tmp_path / "off")
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)


def test_bad_device_maps_are_clear_errors(base):
    _, folder = base
    with pytest.raises(ValueError, match="names 'language_model.decoder.layers.0', which is not a module"):
        Blip2ForConditionalGeneration.from_pretrained(folder, device_map={"language_model.decoder.layers.0": "cpu"})
    with pytest.raises(ValueError, match="leaves .* tensors without a device"):
        Blip2ForConditionalGeneration.from_pretrained(folder, device_map={"vision_model": "cpu"})
    with pytest.raises(ValueError, match="'gpu7' is not a device"):
        Blip2ForConditionalGeneration.from_pretrained(folder, device_map={"": "cpu", "qformer": "gpu7"})
    with pytest.raises(ValueError, match="cannot be combined with device"):
        Blip2ForConditionalGeneration.from_pretrained(folder, device_map="auto", device="cpu")
    with pytest.raises(ValueError, match="need a device_map"):
        Blip2ForConditionalGeneration.from_pretrained(folder, max_memory={"cpu": "1GB"})
