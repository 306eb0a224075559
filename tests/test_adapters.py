"""LoRA adapters against transformers 4.37.2 + peft: adapters peft saved for the reference's
BLIP-2 load onto ours with the same logits, adapters ours saves load onto the reference, and
the transformers adapter API (add / load / set / disable / enable / save) behaves as there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft", reason="the [peft] extra is part of [test]")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import Blip2ForConditionalGeneration as RefBlip2  # noqa: E402

from blip2 import Blip2ForConditionalGeneration  # noqa: E402
from blip2.modeling.lora import LoraLinear  # noqa: E402
from conftest import assert_close, make_inputs, make_ref, ref_config, save_ref  # noqa: E402
from test_t5_blip2 import WEIGHT_STD, ref_t5_config  # noqa: E402

ATOL = 1e-4

# The reference's module names, by part of the model.
TARGETS = {
    "lm": ["q_proj", "v_proj", "fc2"],
    "qformer": ["query", "value", "dense"],  # self- and cross-attention, and every dense layer
    "vision": ["qkv", "projection", "fc1"],
    "everything": "all-linear",
}
T5_TARGETS = {"lm": ["q", "v", "wi_0", "o"], "qformer": ["key"], "vision": ["fc2"]}


@pytest.fixture(scope="module")
def opt_case(tmp_path_factory):
    config = ref_config()
    ref = make_ref(RefBlip2, config)
    return config, ref, save_ref(ref, tmp_path_factory.mktemp("opt") / "base")


@pytest.fixture(scope="module")
def t5_case(tmp_path_factory):
    config = ref_t5_config()
    ref = make_ref(RefBlip2, config, std=WEIGHT_STD)
    return config, ref, save_ref(ref, tmp_path_factory.mktemp("t5") / "base")


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def random_lora(targets, r=4, alpha=8, **kw) -> LoraConfig:
    # init_lora_weights=False: B is not zero, so the adapter changes the outputs.
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)


def peft_adapter(ref, targets, directory: Path, seed: int = 0, **kw) -> tuple[Path, PeftModel]:
    torch.manual_seed(seed)
    wrapped = get_peft_model(ref, random_lora(targets, **kw)).eval()
    wrapped.save_pretrained(str(directory))
    return directory, wrapped


def fresh_ref(base: Path) -> RefBlip2:
    return RefBlip2.from_pretrained(str(base)).eval()


@pytest.mark.parametrize("part", list(TARGETS))
def test_reference_adapter_loads_onto_ours_with_the_same_logits(opt_case, part, tmp_path):
    config, _, base = opt_case
    inputs = make_inputs(config)
    folder, wrapped = peft_adapter(fresh_ref(base), TARGETS[part], tmp_path / "adapter")
    want = logits(wrapped, inputs)
    ours = Blip2ForConditionalGeneration.from_pretrained(base)
    plain = logits(ours, inputs)
    ours.load_adapter(folder)
    assert ours.active_adapters() == ["default"]
    assert_close(logits(ours, inputs), want, f"logits with a reference {part} LoRA", atol=ATOL)
    assert (plain - want).abs().max() > 0.1, "the adapter must change the outputs for the test to mean anything"


@pytest.mark.parametrize("part", list(T5_TARGETS))
def test_reference_t5_adapter_loads_onto_ours(t5_case, part, tmp_path):
    config, _, base = t5_case
    inputs = make_inputs(config)
    folder, wrapped = peft_adapter(fresh_ref(base), T5_TARGETS[part], tmp_path / "adapter")
    ours = Blip2ForConditionalGeneration.from_pretrained(base)
    ours.load_adapter(folder)
    assert_close(logits(ours, inputs), logits(wrapped, inputs), f"T5 logits with a reference {part} LoRA", atol=ATOL)


def _randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "query", "value"], ["qkv", "fc1"], ["attn.qkv", "kv", "out"]],
                         ids=["reference-names", "fused-qkv-everywhere", "our-names"])
def test_adapter_trained_on_ours_loads_onto_the_reference(opt_case, targets, tmp_path):
    config, _, base = opt_case
    inputs = make_inputs(config)
    ours = Blip2ForConditionalGeneration.from_pretrained(base)
    ours.add_adapter(LoraConfig(r=3, lora_alpha=6, target_modules=targets))
    _randomise(ours)
    ours.eval()
    want = logits(ours, inputs)
    ours.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    ref = fresh_ref(base)
    ref.load_adapter(str(tmp_path / "adapter"))  # transformers' own adapter API
    assert_close(logits(ref, inputs), want, "reference logits with our adapter (load_adapter)", atol=ATOL)
    viapeft = PeftModel.from_pretrained(fresh_ref(base), str(tmp_path / "adapter")).eval()
    assert_close(logits(viapeft, inputs), want, "reference logits with our adapter (PeftModel)", atol=ATOL)


def test_t5_adapter_trained_on_ours_loads_onto_the_reference(t5_case, tmp_path):
    config, _, base = t5_case
    inputs = make_inputs(config)
    ours = Blip2ForConditionalGeneration.from_pretrained(base)
    ours.add_adapter(LoraConfig(r=2, target_modules=["q", "v", "wi_1", "value"]))
    _randomise(ours)
    want = logits(ours.eval(), inputs)
    ours.save_pretrained(tmp_path / "adapter")
    ref = fresh_ref(base)
    ref.load_adapter(str(tmp_path / "adapter"))
    assert_close(logits(ref, inputs), want, "reference T5 logits with our adapter", atol=ATOL)


def test_save_load_round_trip_and_adapter_switching(opt_case, tmp_path):
    config, _, base = opt_case
    inputs = make_inputs(config)
    ours = Blip2ForConditionalGeneration.from_pretrained(base).eval()
    plain = logits(ours, inputs)
    ours.add_adapter(LoraConfig(r=2, target_modules=["v_proj", "value"]), adapter_name="a")
    _randomise(ours, seed=1)
    with_a = logits(ours, inputs)
    ours.save_adapter(tmp_path / "a", "a")
    ours.add_adapter(random_lora(["fc1"]), adapter_name="b")
    assert ours.active_adapters() == ["b"]
    with_b = logits(ours, inputs)
    ours.set_adapter("a")
    assert_close(logits(ours, inputs), with_a, "adapter a again", atol=0)
    ours.set_adapter(["a", "b"])
    both = logits(ours, inputs)
    assert (both - with_a).abs().max() > 1e-3 and (both - with_b).abs().max() > 1e-3
    ours.disable_adapters()
    assert_close(logits(ours, inputs), plain, "adapters disabled", atol=0)
    ours.enable_adapters()
    assert_close(logits(ours, inputs), both, "adapters enabled again", atol=0)
    with pytest.raises(ValueError, match="saving several"):
        ours.save_pretrained(tmp_path / "both")
    with pytest.raises(ValueError, match="could not be found: c"):
        ours.set_adapter("c")
    with pytest.raises(ValueError, match="already exists"):
        ours.add_adapter(LoraConfig(target_modules=["q_proj"]), adapter_name="a")

    again = Blip2ForConditionalGeneration.from_pretrained(base).eval()
    again.load_adapter(tmp_path / "a", adapter_name="a")
    assert_close(logits(again, inputs), with_a, "adapter after a save/load round trip", atol=0)
    state = again.get_adapter_state_dict()
    assert set(state) == set(ours.get_adapter_state_dict("a"))
    assert all(torch.equal(state[k], ours.get_adapter_state_dict("a")[k]) for k in state)
    assert "language_model.model.decoder.layers.0.self_attn.v_proj.lora_A.weight" in state
    again.delete_adapter("a")
    assert not any(isinstance(m, LoraLinear) for m in again.modules())
    assert_close(logits(again, inputs), plain, "after deleting the only adapter", atol=0)
    with pytest.raises(ValueError, match="No adapter loaded"):
        again.active_adapters()


def test_merge_and_unload_gives_the_adapted_outputs_with_plain_layers(opt_case, tmp_path):
    config, _, base = opt_case
    inputs = make_inputs(config)
    ours = Blip2ForConditionalGeneration.from_pretrained(base).eval()
    ours.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj", "query", "qkv", "fc2"]))
    _randomise(ours)
    want = logits(ours, inputs)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert_close(logits(merged, inputs), want, "merged logits", atol=ATOL)
    merged.save_pretrained(tmp_path / "merged")  # a full model again, which the reference loads
    assert_close(logits(fresh_ref(tmp_path / "merged"), inputs), want, "reference with merged weights", atol=ATOL)


def test_lora_steps_lower_the_loss_and_change_only_adapter_weights(opt_case):
    config, _, base = opt_case
    inputs = make_inputs(config)
    ours = Blip2ForConditionalGeneration.from_pretrained(base)
    ours.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "query", "value"]))
    ours.train()
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = ours(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable), sorted(changed - set(trainable))[:3]


def test_peft_get_peft_model_works_on_ours(opt_case, tmp_path):
    config, _, base = opt_case
    inputs = make_inputs(config)
    ours = Blip2ForConditionalGeneration.from_pretrained(base)
    torch.manual_seed(0)
    wrapped = get_peft_model(ours, random_lora(["qkv", "fc1"])).eval()  # our module names
    want = logits(wrapped, inputs)
    wrapped.train()
    wrapped(**inputs).loss.backward()
    assert all(p.grad is None for n, p in wrapped.named_parameters() if "lora_" not in n)
    wrapped.save_pretrained(str(tmp_path / "peft"))
    # What peft saved (our names) loads with our API, and ours re-saves it for the reference.
    again = Blip2ForConditionalGeneration.from_pretrained(base)
    again.load_adapter(tmp_path / "peft")
    assert_close(logits(again.eval(), inputs), want, "peft-on-ours adapter via load_adapter", atol=ATOL)
    again.save_pretrained(tmp_path / "for_ref")
    ref = fresh_ref(base)
    ref.load_adapter(str(tmp_path / "for_ref"))
    assert_close(logits(ref, inputs), want, "peft-on-ours adapter on the reference", atol=ATOL)


def test_bad_adapters_are_clear_errors(opt_case, t5_case, tmp_path):
    _, _, base = opt_case
    ours = Blip2ForConditionalGeneration.from_pretrained(base)
    t5_folder, _ = peft_adapter(fresh_ref(t5_case[2]), ["q"], tmp_path / "t5")
    with pytest.raises(ValueError, match=r"targets language_model\.(en|de)coder\.block\.0.*another architecture"):
        ours.load_adapter(t5_folder)
    wide = ref_config(text=dict(hidden_size=48, num_attention_heads=4))
    wide_folder, _ = peft_adapter(make_ref(RefBlip2, wide), ["q_proj"], tmp_path / "wide")
    with pytest.raises(ValueError, match=r"q_proj has lora_A \(4, 48\).*needs \(r, 32\)"):
        ours.load_adapter(wide_folder)
    with pytest.raises(ValueError, match="match no linear layer"):
        ours.add_adapter(LoraConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="patch_embedding is not a linear layer"):
        ours.add_adapter(LoraConfig(target_modules=["patch_embedding"]))
    with pytest.raises(ValueError, match="use_dora"):
        ours.add_adapter(LoraConfig(target_modules=["q_proj"], use_dora=True))
    config = json.loads((wide_folder / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    with pytest.raises(ValueError, match="only LoRA"):
        ours.load_adapter(peft_config=config, adapter_state_dict={})
    assert not hasattr(ours, "peft_config")  # nothing half-added


def test_stage2_cli_trains_a_lora_and_saves_the_adapter(tmp_path):
    from blip2.cli import main
    from blip2.train.recipes import parse_lora, stage2_job
    from train_helpers import stage2_config, write_dataset, write_tokenizer

    data = write_dataset(tmp_path / "data", n=4)
    spec = {
        "model": {"config": stage2_config().to_dict()},
        "data": {"train": str(data), "tokenizer": str(write_tokenizer(tmp_path / "tokenizer.json")),
                 "prompt": "a photo of"},
        "train": {"out_dir": str(tmp_path / "out"), "batch_size": 2, "max_steps": 3, "progress": False, "lr": 1e-2},
    }
    (tmp_path / "stage2.json").write_text(json.dumps(spec))
    lora = "r=4,alpha=8,targets=q_proj+v_proj+query"
    assert main(["train", "stage2", "--config", str(tmp_path / "stage2.json"), "--lora", lora]) == 0
    final = tmp_path / "out" / "final"
    saved = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["target_modules"] == ["q_proj", "v_proj", "query"]

    start = stage2_job({**spec, "losses": {}, "model": {**spec["model"], "lora": parse_lora(lora)}}).model  # same start
    trainable = sorted({n.split(".")[0] for n, p in start.named_parameters() if p.requires_grad})
    assert trainable == ["language_model", "language_projection", "qformer", "query_tokens", "vision_model"]
    assert not any(p.requires_grad for n, p in start.language_model.named_parameters() if "lora_" not in n)
    assert not any(p.requires_grad for n, p in start.qformer.named_parameters() if "lora_" not in n)
    model = Blip2ForConditionalGeneration.from_pretrained(final)
    for name, value in model.language_model.state_dict().items():  # the frozen LM is unchanged
        assert torch.equal(value, start.language_model.state_dict()[name.replace("attn.qkv.", "attn.qkv.base.")]), name
    model.load_adapter(final / "adapter")
    state = model.get_adapter_state_dict()
    assert any(k.endswith("q_proj.lora_B.weight") for k in state)
    assert all(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)  # trained away from zero


def test_lora_option_errors():
    from blip2.train.recipes import parse_lora

    assert parse_lora("r=8,alpha=16,dropout=0.1,targets=q_proj+v_proj") == {
        "r": 8, "lora_alpha": 16.0, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(ValueError, match="needs targets"):
        parse_lora("r=8")
    with pytest.raises(ValueError, match="cannot read 'rank=8'"):
        parse_lora("rank=8,targets=q_proj")
    with pytest.raises(ValueError, match="r must be a number"):
        parse_lora("r=eight,targets=q_proj")
