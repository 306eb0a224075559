"""Model-folder faults: every file the loaders read (weights, config.json, generation_config.json,
tokenizer.json, the shard index) gives an error naming that file when it is damaged or foreign."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig
from blip2.processing import Blip2Processor
from test_server_fixtures import make_captioning_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_captioning_checkpoint(tmp_path_factory.mktemp("files") / "base")


@pytest.fixture
def copy(base, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(base, folder)
    return folder


def test_integer_tensors_where_weights_belong_are_named(copy):
    path = copy / "model.safetensors"
    state = load_file(path)
    state["language_projection.weight"] = state["language_projection.weight"].to(torch.int32)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'language_projection\.weight' is stored as int32"):
        Blip2ForConditionalGeneration.from_pretrained(copy)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_a_config_that_is_not_utf8_is_named(copy, name):
    path = copy / name
    if not path.exists():
        path.write_text("{}")
    data = json.loads(path.read_text(encoding="utf-8"))
    data["note"] = "café"
    path.write_bytes(json.dumps(data, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=f"{name} is not valid JSON"):
        Blip2ForConditionalGeneration.from_pretrained(copy)
    if name == "config.json":
        with pytest.raises(ValueError, match=name):
            Blip2Config.from_pretrained(copy)


@pytest.mark.parametrize("content", [b'{"version": "1.0", "model": {', b"\xff\xfe\x00 not json", b"[1, 2]"])
def test_a_corrupt_tokenizer_json_is_named(copy, content):
    (copy / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match="tokenizer.json"):
        Blip2Processor.from_pretrained(copy)


def test_an_unknown_top_level_model_type_is_named(copy):
    data = json.loads((copy / "config.json").read_text())
    data["model_type"] = "llava"
    (copy / "config.json").write_text(json.dumps(data))
    for load in (Blip2ForConditionalGeneration.from_pretrained, Blip2Config.from_pretrained,
                 Blip2VisionConfig.from_pretrained, Blip2QFormerConfig.from_pretrained):
        with pytest.raises(ValueError, match=r"config\.json: model_type 'llava' is not a"):
            load(copy)


def test_a_whole_checkpoint_still_gives_its_sections(copy):
    assert Blip2VisionConfig.from_pretrained(copy).hidden_size == 32


def test_a_damaged_shard_index_is_named(copy):
    state = load_file(copy / "model.safetensors")
    (copy / "model.safetensors").unlink()
    save_file(state, copy / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    (copy / "model.safetensors.index.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        Blip2ForConditionalGeneration.from_pretrained(copy)


class NotATensor:
    """A Python object a weights file should never hold (torch.load(weights_only=True) refuses it)."""


@pytest.mark.parametrize("content", ["object", "truncated"])
def test_a_bad_bin_file_is_named_without_weights_only_advice(copy, content):
    state = load_file(copy / "model.safetensors")
    (copy / "model.safetensors").unlink()
    path = copy / "pytorch_model.bin"
    torch.save({**state, "extra": NotATensor()} if content == "object" else state, path)
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="pytorch_model.bin") as err:
        Blip2ForConditionalGeneration.from_pretrained(copy)
    assert "weights_only=False" not in str(err.value) and "weights_only" not in str(err.value)


def test_every_reader_of_a_model_folder_names_a_non_utf8_file(copy, tmp_path):
    from blip2.adapters import read_adapter
    from blip2.server.engine import _is_retrieval_checkpoint

    (copy / "config.json").write_bytes(b'{"note": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        _is_retrieval_checkpoint(copy)  # how `blip2 serve` picks the model class
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes(b'{"r": 8, "note": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        read_adapter(adapter)


def test_training_data_that_is_not_utf8_is_named(tmp_path):
    from blip2.train.data import read_records

    path = tmp_path / "captions.jsonl"
    path.write_bytes('{"image": "a.png", "caption": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"captions\.jsonl is not UTF-8"):
        read_records(path)
