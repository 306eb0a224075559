"""Checkpoint files: every format the reference writes, strict loading with errors that name keys,
shapes and files, damaged directories, atomic saving, the reference loading what ours writes,
and float16 / bfloat16 loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from transformers import Blip2ForConditionalGeneration as RefBlip2ForConditionalGeneration

from blip2 import Blip2ForConditionalGeneration, Blip2Model, Blip2QFormerModel, Blip2VisionModel
from blip2.checkpoint import CheckpointError, ours_to_hf
from conftest import assert_close, make_inputs, make_ref, max_abs_diff, ref_config, save_ref

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

FORMATS = {
    "safetensors": dict(),
    "safetensors-sharded": dict(max_shard_size="50KB"),
    "bin": dict(safe_serialization=False),
    "bin-sharded": dict(safe_serialization=False, max_shard_size="50KB"),
}


class Setup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = ref_config(text=dict(ffn_dim=37))
        self.ref = make_ref(RefBlip2ForConditionalGeneration, self.config, seed=11)
        self.inputs = make_inputs(self.config)
        with torch.no_grad():
            self.logits = self.ref(**self.inputs).logits
        self.dirs = {name: save_ref(self.ref, root / name, **kw) for name, kw in FORMATS.items()}

    def copy(self, name: str, to: Path) -> Path:
        to.mkdir(parents=True)
        for file in self.dirs[name].iterdir():
            (to / file.name).write_bytes(file.read_bytes())
        return to


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return Setup(tmp_path_factory.mktemp("checkpoints"))


def weight_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".safetensors", ".bin", ".index.json")))


def leftovers(directory: Path) -> list[str]:
    """Temporary files of an interrupted write."""
    return [p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


# ---------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@torch.no_grad()
def test_every_reference_format_loads(setup: Setup, fmt: str):
    files = weight_files(setup.dirs[fmt])
    if "sharded" in fmt:
        assert sum(".index.json" not in f for f in files) > 1, f"expected several shards, got {files}"
    model = Blip2ForConditionalGeneration.from_pretrained(setup.dirs[fmt])
    assert not model.training
    assert_close(model(**setup.inputs).logits, setup.logits, f"logits from {fmt}", record=f"checkpoint {fmt}")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@torch.no_grad()
def test_reference_loads_every_format_ours_writes(setup: Setup, fmt: str, tmp_path: Path):
    ours = Blip2ForConditionalGeneration.from_pretrained(setup.dirs["safetensors"])
    ours.save_pretrained(tmp_path, **FORMATS[fmt])
    files = weight_files(tmp_path)
    single, index = (SAFE, SAFE_INDEX) if "bin" not in fmt else (BIN, BIN_INDEX)
    if "sharded" in fmt:
        assert index in files and len(files) > 2
        weight_map = json.loads((tmp_path / index).read_text())["weight_map"]
        assert set(weight_map.values()) == set(files) - {index}
    else:
        assert files == [single]
    assert not leftovers(tmp_path)
    back = RefBlip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    assert max_abs_diff(back(**setup.inputs).logits, setup.logits) == 0.0
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    assert max_abs_diff(again(**setup.inputs).logits, ours(**setup.inputs).logits) == 0.0


def test_saved_names_are_the_references(setup: Setup, tmp_path: Path):
    ours = Blip2ForConditionalGeneration.from_pretrained(setup.dirs["safetensors"])
    ours.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / SAFE))
    written_by_ref = load_file(str(setup.dirs["safetensors"] / SAFE))
    assert sorted(saved) == sorted(written_by_ref)  # the tied lm_head is not written, as by the reference
    assert "language_model.lm_head.weight" not in saved
    for key, tensor in written_by_ref.items():
        assert torch.equal(saved[key], tensor), key
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForConditionalGeneration"] and config["torch_dtype"] == "float32"


def test_tied_lm_head_copy_is_accepted_and_untied_is_required(setup: Setup, tmp_path: Path):
    # pytorch_model.bin from the reference carries the tied copy of the embeddings.
    assert "language_model.lm_head.weight" in torch.load(setup.dirs["bin"] / BIN, weights_only=True)
    model = Blip2ForConditionalGeneration.from_pretrained(setup.dirs["bin"])
    assert model.language_model.lm_head.weight is model.language_model.embed_tokens.weight
    # Untied: lm_head is its own tensor and must be in the file.
    config = ref_config(text=dict(tie_word_embeddings=False))
    ref = make_ref(RefBlip2ForConditionalGeneration, config, seed=2)
    save_ref(ref, tmp_path / "untied")
    state = load_file(str(tmp_path / "untied" / SAFE))
    assert "language_model.lm_head.weight" in state
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "untied")
    assert model.language_model.lm_head.weight is not model.language_model.embed_tokens.weight
    del state["language_model.lm_head.weight"]
    save_file(state, str(tmp_path / "untied" / SAFE), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="language_model.lm_head.weight"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path / "untied")


# ---------------------------------------------------------------- strictness
def _edit_weights(setup: Setup, tmp_path: Path, edit) -> Path:
    directory = setup.copy("safetensors", tmp_path / "edited")
    state = load_file(str(directory / SAFE))
    edit(state)
    save_file(state, str(directory / SAFE), metadata={"format": "pt"})
    return directory


def test_missing_key_is_named_with_the_file(setup: Setup, tmp_path: Path):
    directory = _edit_weights(setup, tmp_path, lambda s: s.pop("qformer.layernorm.weight"))
    with pytest.raises(CheckpointError) as err:
        Blip2ForConditionalGeneration.from_pretrained(directory)
    message = str(err.value)
    assert "missing" in message and "qformer.layernorm.weight" in message and str(directory / SAFE) in message


def test_unexpected_key_is_named(setup: Setup, tmp_path: Path):
    def add(state):
        state["vision_model.encoder.layers.9.mlp.fc1.weight"] = torch.zeros(2, 2)
    directory = _edit_weights(setup, tmp_path, add)
    with pytest.raises(CheckpointError) as err:
        Blip2ForConditionalGeneration.from_pretrained(directory)
    assert "unexpected" in str(err.value) and "vision_model.encoder.layers.9.mlp.fc1.weight" in str(err.value)


def test_many_missing_keys_are_summarised(setup: Setup, tmp_path: Path):
    def drop_vision(state):
        for key in [k for k in state if k.startswith("vision_model.")]:
            del state[key]
    directory = _edit_weights(setup, tmp_path, drop_vision)
    with pytest.raises(CheckpointError, match=r"vision_model\..* and \d+ more"):
        Blip2ForConditionalGeneration.from_pretrained(directory)


def test_shape_mismatch_names_key_shapes_and_file(setup: Setup, tmp_path: Path):
    directory = setup.copy("safetensors", tmp_path / "wider")
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["ffn_dim"] = 38
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        Blip2ForConditionalGeneration.from_pretrained(directory)
    message = str(err.value)
    assert "shape mismatch" in message and "language_model.model.decoder.layers.0.fc1." in message
    assert "(37, 32)" in message or "(37,)" in message
    assert "(38, 32)" in message or "(38,)" in message
    assert str(directory / SAFE) in message


def test_fused_shape_mismatch_names_every_part(setup: Setup, tmp_path: Path):
    def shrink(state):
        key = "qformer.encoder.layer.0.attention.attention.key.weight"
        state[key] = state[key][:-1].clone()
    directory = _edit_weights(setup, tmp_path, shrink)
    with pytest.raises(CheckpointError) as err:
        Blip2ForConditionalGeneration.from_pretrained(directory)
    assert "attention.attention.key.weight (31, 32)" in str(err.value)
    assert "attention.attention.query.weight (32, 32)" in str(err.value)


def test_wrong_model_class_for_the_checkpoint(setup: Setup, tmp_path: Path):
    # A whole BLIP-2 checkpoint is not a vision model: the error lists the unexpected keys.
    directory = setup.copy("safetensors", tmp_path / "whole")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config["vision_config"]))
    with pytest.raises(CheckpointError, match="missing keys: .*embeddings"):
        Blip2VisionModel.from_pretrained(directory)


# ---------------------------------------------------------------- damaged directories
@pytest.mark.parametrize("fmt", ["safetensors-sharded", "bin-sharded"])
def test_missing_shard_is_named(setup: Setup, fmt: str, tmp_path: Path):
    directory = setup.copy(fmt, tmp_path / "shards")
    shard = sorted(p for p in directory.iterdir() if "-of-" in p.name)[1]
    shard.unlink()
    with pytest.raises(CheckpointError) as err:
        Blip2ForConditionalGeneration.from_pretrained(directory)
    assert shard.name in str(err.value) and "missing" in str(err.value)


@pytest.mark.parametrize("fmt, keep", [
    ("safetensors", 0.5), ("safetensors", 0.999), ("safetensors", 5),
    ("bin", 0.5), ("bin", 0.999), ("safetensors-sharded", 0.5), ("bin-sharded", 0.5),
])
def test_truncated_file_is_named(setup: Setup, fmt: str, keep: float, tmp_path: Path):
    directory = setup.copy(fmt, tmp_path / "cut")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    victim = files[len(files) // 2]
    data = victim.read_bytes()
    victim.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError) as err:
        Blip2ForConditionalGeneration.from_pretrained(directory)
    assert str(victim) in str(err.value)
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)


def test_broken_index_and_no_weights(setup: Setup, tmp_path: Path):
    directory = setup.copy("safetensors-sharded", tmp_path / "index")
    (directory / SAFE_INDEX).write_text("{\"metadata\": {}}")
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        Blip2ForConditionalGeneration.from_pretrained(directory)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((setup.dirs["safetensors"] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights"):
        Blip2ForConditionalGeneration.from_pretrained(empty)


# ---------------------------------------------------------------- saving
@pytest.mark.parametrize("safe", [True, False])
def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(setup: Setup, safe: bool,
                                                                  tmp_path: Path, monkeypatch):
    model = Blip2ForConditionalGeneration.from_pretrained(setup.dirs["safetensors"])
    model.save_pretrained(tmp_path, safe_serialization=safe)
    name = SAFE if safe else BIN
    before = (tmp_path / name).read_bytes()

    def half_then_fail(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"\0" * 100)  # a partial file, then the disk "fills up"
        raise OSError("No space left on device")

    if safe:
        monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    else:
        monkeypatch.setattr(torch, "save", half_then_fail)
    with torch.no_grad():
        model.query_tokens.add_(1.0)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(tmp_path, safe_serialization=safe)
    monkeypatch.undo()
    assert weight_files(tmp_path) == [name] and not leftovers(tmp_path)
    assert (tmp_path / name).read_bytes() == before
    Blip2ForConditionalGeneration.from_pretrained(tmp_path)  # still loads

    # A failure in a fresh directory leaves nothing behind but the directory.
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        model.save_pretrained(fresh, safe_serialization=safe)
    assert weight_files(fresh) == [] and not leftovers(fresh)


def test_resaving_in_another_layout_replaces_the_old_files(setup: Setup, tmp_path: Path):
    model = Blip2ForConditionalGeneration.from_pretrained(setup.dirs["safetensors"])
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert SAFE_INDEX in weight_files(tmp_path)
    with torch.no_grad():
        model.language_projection.bias.add_(1.0)
    model.save_pretrained(tmp_path)  # one file now: the shards and their index must go
    assert weight_files(tmp_path) == [SAFE]
    loaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(loaded.language_projection.bias, model.language_projection.bias)
    model.save_pretrained(tmp_path, max_shard_size="50KB")  # and back to shards
    assert SAFE not in weight_files(tmp_path)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert weight_files(tmp_path) == [BIN]
    loaded = RefBlip2ForConditionalGeneration.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.language_projection.bias, model.language_projection.bias)


# ---------------------------------------------------------------- float16 / bfloat16
@pytest.mark.parametrize("dtype, how", [
    (torch.float16, torch.float16), (torch.float16, "float16"), (torch.float16, "torch.float16"),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, "bfloat16"),
])
@torch.no_grad()
def test_half_precision_loading(setup: Setup, dtype, how):
    ours = Blip2ForConditionalGeneration.from_pretrained(setup.dirs["safetensors"], torch_dtype=how)
    ref = RefBlip2ForConditionalGeneration.from_pretrained(str(setup.dirs["safetensors"]), torch_dtype=dtype).eval()
    assert {p.dtype for p in ours.parameters()} == {dtype} and ours.dtype == dtype
    ref_state = ref.state_dict()
    for key, tensor in ours_to_hf(ours.state_dict(), ours.key_table()).items():
        assert tensor.dtype == ref_state[key].dtype and torch.equal(tensor, ref_state[key]), key
    got, expected = ours(**setup.inputs), ref(**setup.inputs)
    assert got.logits.dtype == dtype
    # Ours in low precision is as close to the fp32 result as the reference in low precision is.
    ours_err = max_abs_diff(got.logits.float(), setup.logits)
    ref_err = max_abs_diff(expected.logits.float(), setup.logits)
    assert ours_err <= max(2 * ref_err, 1e-2), f"{dtype}: ours {ours_err:.3e}, reference {ref_err:.3e}"
    assert max_abs_diff(got.logits.float(), expected.logits.float()) <= (2e-2 if dtype == torch.float16 else 2e-1)


@torch.no_grad()
def test_half_precision_checkpoint_round_trip(setup: Setup, tmp_path: Path):
    ours = Blip2ForConditionalGeneration.from_pretrained(setup.dirs["safetensors"], torch_dtype=torch.float16)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float16"
    assert {t.dtype for t in load_file(str(tmp_path / SAFE)).values()} == {torch.float16}
    auto = Blip2ForConditionalGeneration.from_pretrained(tmp_path, torch_dtype="auto")
    assert auto.dtype == torch.float16
    ref = RefBlip2ForConditionalGeneration.from_pretrained(str(tmp_path), torch_dtype="auto")
    assert ref.dtype == torch.float16
    # Without torch_dtype both load float32, whatever the file holds.
    assert Blip2ForConditionalGeneration.from_pretrained(tmp_path).dtype == torch.float32
    assert RefBlip2ForConditionalGeneration.from_pretrained(str(tmp_path)).dtype == torch.float32
    # float16 weights up-cast to float32 on request.
    up = Blip2ForConditionalGeneration.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert up.dtype == torch.float32 and torch.equal(up.query_tokens, ours.query_tokens.float())


def test_bad_dtype_is_rejected(setup: Setup):
    with pytest.raises(ValueError, match="torch_dtype"):
        Blip2ForConditionalGeneration.from_pretrained(setup.dirs["safetensors"], torch_dtype="float17")


# ---------------------------------------------------------------- standalone models
def test_standalone_models_through_our_own_save(setup: Setup, tmp_path: Path):
    model = Blip2Model.from_pretrained(setup.dirs["bin-sharded"])
    vision = Blip2VisionModel(model.config.vision_config)
    vision.load_state_dict(model.vision_model.state_dict())
    vision.save_pretrained(tmp_path / "vision", max_shard_size="20KB")
    assert SAFE_INDEX in os.listdir(tmp_path / "vision")
    again = Blip2VisionModel.from_pretrained(tmp_path / "vision")
    pixels = setup.inputs["pixel_values"]
    with torch.no_grad():
        assert torch.equal(again(pixels).last_hidden_state, model.get_image_features(pixels).last_hidden_state)
    qformer = Blip2QFormerModel(model.config.qformer_config)
    qformer.load_state_dict(model.qformer.state_dict())
    qformer.save_pretrained(tmp_path / "qformer", safe_serialization=False)
    again = Blip2QFormerModel.from_pretrained(tmp_path / "qformer")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), qformer.state_dict().values()))


# ---------------------------------------------------------------- no side effects
def test_saving_leaves_the_models_config_as_it_was(setup: Setup, tmp_path: Path):
    ours = Blip2ForConditionalGeneration.from_pretrained(setup.dirs["safetensors"], torch_dtype=torch.bfloat16)
    before = ours.config.to_dict()
    ours.save_pretrained(tmp_path)
    assert ours.config.to_dict() == before
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["torch_dtype"] == "bfloat16" and written["architectures"]


def test_loading_does_not_switch_off_initialisers_elsewhere(setup: Setup):
    """Building on the meta device must not make torch.nn.init a no-op for the rest of the process
    (another thread initialising its own weights at that moment)."""
    drawn = []

    def factory():
        x = torch.zeros(64, device="cpu")
        torch.nn.init.normal_(x)  # a CPU tensor, as another thread's would be
        drawn.append(x.abs().sum().item())
        return Blip2ForConditionalGeneration(Blip2ForConditionalGeneration.config_class.from_pretrained(
            setup.dirs["safetensors"]))

    from blip2 import checkpoint as ckpt

    assert ckpt.build_on_meta(factory).query_tokens.is_meta
    assert drawn[0] > 0


def test_build_on_meta_skips_initialisers_only_for_meta_tensors_and_only_inside():
    from torch import nn

    from blip2.checkpoint import build_on_meta

    drawn = {}

    def factory():
        cpu = torch.zeros(1000, device="cpu")
        nn.init.normal_(cpu)  # a CPU tensor made inside the build is still initialised
        drawn["cpu"] = cpu
        return nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8), nn.LayerNorm(8))

    model = build_on_meta(factory)
    assert all(p.is_meta for p in model.parameters())
    assert drawn["cpu"].std() > 0.5
    after = torch.zeros(1000)
    nn.init.normal_(after)  # and nothing stays changed once the build is over
    assert after.std() > 0.5
    assert not torch.overrides._get_current_function_mode_stack()


@pytest.mark.parametrize("stored, wanted", [(torch.float16, torch.float32), (torch.float16, torch.bfloat16),
                                            (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_reader_converts_across_its_buffer_and_never_maps_the_file(tmp_path: Path, monkeypatch, stored, wanted):
    # A tiny read buffer: every tensor crosses several buffer fills, odd-sized tails included.
    from blip2 import checkpoint

    monkeypatch.setattr(checkpoint, "_BOUNCE_BYTES", 96)
    tensors = {"a": torch.randn(37, 13).to(stored), "b": torch.randn(5).to(stored), "c": torch.randn(0, 4).to(stored)}
    save_file(tensors, str(tmp_path / SAFE))
    reader = checkpoint.SafetensorsReader(tmp_path / SAFE)
    for key, tensor in tensors.items():
        out = torch.full(tensor.shape, float("nan"), dtype=wanted)
        reader.read_into(key, out)
        assert torch.equal(out, tensor.to(wanted)), key
        assert torch.equal(reader[key], tensor), key
    if os.path.exists("/proc/self/maps"):  # Linux: the file is read, not mapped
        with open("/proc/self/maps") as maps:
            assert str(tmp_path / SAFE) not in maps.read()
    reader.close()
