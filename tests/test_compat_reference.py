"""Drop-in behaviour: what code written for transformers' Blip2 classes does, run against ours and
against transformers 4.37.2, compared.

Each table row is a small function of `api` (the `blip2` package or `transformers`) and a scratch
folder; the test runs it with both and asserts the results are equal. Rows are variants of one
behaviour, so a fix for the listed case alone fails the others.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import blip2
from conftest import BASE_OPT, BASE_QFORMER, BASE_VISION

APIS = {"ours": blip2, "reference": transformers}
T5_TINY = dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def both(case, tmp_path: Path):
    """Runs `case(api, folder)` for ours and the reference, each in its own scratch folder."""
    results = {}
    for name, api in APIS.items():
        folder = tmp_path / name
        folder.mkdir()
        results[name] = case(api, folder)
    return results["ours"], results["reference"]


def tiny_config(api, vision=None, text=None, **kwargs):
    return api.Blip2Config(vision_config={**BASE_VISION, **(vision or {})}, qformer_config=dict(BASE_QFORMER),
                           text_config={**BASE_OPT, **(text or {})}, num_query_tokens=4, **kwargs)


def _saved(config, folder: Path, subfolder: str = "") -> Path:
    config.save_pretrained(str(folder / subfolder))
    return folder


# ---------------------------------------------------------------- 1. derived fields
DERIVED = {
    # The Q-Former reads the image: its encoder width follows the vision width, whatever it was given.
    "encoder_hidden_size from a vision width": lambda api, d: tiny_config(api, vision=dict(hidden_size=48)).qformer_config.encoder_hidden_size,
    "encoder_hidden_size over a given one": lambda api, d: api.Blip2Config(
        vision_config=dict(hidden_size=64), qformer_config=dict(encoder_hidden_size=1408)).qformer_config.encoder_hidden_size,
    "encoder_hidden_size via from_vision_qformer_text_configs": lambda api, d: api.Blip2Config.from_vision_qformer_text_configs(
        api.Blip2VisionConfig(**{**BASE_VISION, "hidden_size": 40}), api.Blip2QFormerConfig(**BASE_QFORMER),
        api.OPTConfig(**{k: v for k, v in BASE_OPT.items() if k != "model_type"})).qformer_config.encoder_hidden_size,
    "encoder_hidden_size after a JSON round trip": lambda api, d: api.Blip2Config.from_pretrained(
        _saved(tiny_config(api, vision=dict(hidden_size=24)), d)).qformer_config.encoder_hidden_size,
    "decoder-only for OPT": lambda api, d: tiny_config(api).use_decoder_only_language_model,
    "decoder-only for T5": lambda api, d: api.Blip2Config(text_config=T5_TINY).use_decoder_only_language_model,
    "is_encoder_decoder for T5": lambda api, d: api.Blip2Config(text_config=T5_TINY).is_encoder_decoder,
    "is_encoder_decoder for OPT": lambda api, d: tiny_config(api).is_encoder_decoder,
    "tie_word_embeddings from the text config": lambda api, d: api.Blip2Config(
        text_config={**T5_TINY, "tie_word_embeddings": False}).tie_word_embeddings,
    "derived fields override the file": lambda api, d: api.Blip2Config(
        text_config=T5_TINY, is_encoder_decoder=False, use_decoder_only_language_model=True).is_encoder_decoder,
    "text config chosen by model_type": lambda api, d: type(api.Blip2Config(text_config=T5_TINY).text_config).__name__,
    "num_query_tokens": lambda api, d: tiny_config(api).num_query_tokens,
    "initializer_factor": lambda api, d: tiny_config(api).initializer_factor,
    "initializer_range": lambda api, d: tiny_config(api).initializer_range,
    "written derived fields": lambda api, d: {k: tiny_config(api).to_dict()[k] for k in (
        "use_decoder_only_language_model", "initializer_factor", "initializer_range", "num_query_tokens")},
}


@pytest.mark.parametrize("name", DERIVED)
def test_derived_config_fields(name, tmp_path: Path):
    ours, ref = both(DERIVED[name], tmp_path)
    assert ours == ref, f"{name}: ours {ours!r}, reference {ref!r}"


def test_custom_vision_width_builds_and_runs():
    """The crash the issue reports: a vision width other than 1408 without encoder_hidden_size."""
    config = blip2.Blip2Config(vision_config={**BASE_VISION, "hidden_size": 24},
                               qformer_config={k: v for k, v in BASE_QFORMER.items() if k != "encoder_hidden_size"},
                               text_config=BASE_OPT, num_query_tokens=4)
    model = blip2.Blip2ForConditionalGeneration(config).eval()
    out = model(torch.randn(1, 3, 16, 16), torch.tensor([[5, 6]]))
    assert out.logits.shape == (1, 6, BASE_OPT["vocab_size"])


# ---------------------------------------------------------------- 2. parts read from a whole checkpoint
PARTS = {
    "vision from a BLIP-2 folder": lambda api, d: api.Blip2VisionConfig.from_pretrained(
        _saved(tiny_config(api, vision=dict(hidden_size=48, image_size=32)), d)).to_dict(),
    "Q-Former from a BLIP-2 folder": lambda api, d: api.Blip2QFormerConfig.from_pretrained(
        _saved(tiny_config(api), d)).to_dict(),
    "vision from a BLIP-2 folder, with an override": lambda api, d: api.Blip2VisionConfig.from_pretrained(
        _saved(tiny_config(api), d), image_size=32).image_size,
    "vision from its own folder": lambda api, d: api.Blip2VisionConfig.from_pretrained(
        _saved(api.Blip2VisionConfig(hidden_size=40), d)).hidden_size,
    "Q-Former from a BLIP-2 folder in a subfolder": lambda api, d: api.Blip2QFormerConfig.from_pretrained(
        _saved(tiny_config(api), d, "sub"), subfolder="sub").num_hidden_layers,
}


@pytest.mark.parametrize("name", PARTS)
def test_part_configs_read_their_section(name, tmp_path: Path):
    ours, ref = both(PARTS[name], tmp_path)
    if isinstance(ours, dict):
        shared = (set(ours) & set(ref)) - {"transformers_version", "_name_or_path"}
        assert len(shared) > 20, f"only {sorted(shared)} in common"
        assert {k: ours[k] for k in shared} == {k: ref[k] for k in shared}
    else:
        assert ours == ref


# ---------------------------------------------------------------- 3. the PretrainedConfig surface
def _assign_and_save(api, d, cls_name, attr, value, read):
    """Assigns an attribute, saves, reads the file back with the same API."""
    cls = getattr(api, cls_name)
    config = tiny_config(api) if cls_name == "Blip2Config" else cls()
    setattr(config, attr, value)
    config.save_pretrained(str(d))
    data = json.loads((d / "config.json").read_text())
    again = cls.from_pretrained(str(d))
    return getattr(config, attr), data.get(attr), read(again)


SURFACE = {
    "assign tie_word_embeddings": lambda api, d: _assign_and_save(
        api, d, "Blip2Config", "tie_word_embeddings", False, lambda c: c.text_config.tie_word_embeddings),
    "assign is_encoder_decoder on OPT": lambda api, d: _assign_and_save(
        api, d, "OPTConfig", "is_encoder_decoder", True, lambda c: c.is_encoder_decoder),
    "assign a new attribute": lambda api, d: _assign_and_save(
        api, d, "Blip2VisionConfig", "my_flag", [1, 2], lambda c: c.my_flag),
    "assign a known field": lambda api, d: _assign_and_save(
        api, d, "Blip2QFormerConfig", "hidden_dropout_prob", 0.25, lambda c: c.hidden_dropout_prob),
    "assign torch_dtype as a dtype": lambda api, d: _assign_and_save(
        api, d, "OPTConfig", "torch_dtype", torch.bfloat16, lambda c: c.torch_dtype),
    "assign architectures": lambda api, d: _assign_and_save(
        api, d, "Blip2Config", "architectures", ["Blip2Model"], lambda c: c.architectures),
    "torch_dtype from a name": lambda api, d: (api.OPTConfig(torch_dtype="float16").torch_dtype,
                                               api.OPTConfig(torch_dtype="float16").to_dict()["torch_dtype"]),
    "torch_dtype default": lambda api, d: api.Blip2VisionConfig().torch_dtype,
    "num_labels makes label tables": lambda api, d: (lambda c: (c.num_labels, c.id2label, c.label2id))(
        api.OPTConfig(num_labels=3)),
    "default labels": lambda api, d: (lambda c: (c.num_labels, c.id2label, c.label2id))(api.Blip2QFormerConfig()),
    "num_labels assigned": lambda api, d: (lambda c: (setattr(c, "num_labels", 4), c.id2label, c.label2id)[1:])(
        api.OPTConfig()),
    # (The reference leaves label2id None here; ours gives the inverse table, tested below.)
    "id2label through JSON": lambda api, d: (lambda c: (c.id2label, c.num_labels))(
        api.OPTConfig.from_pretrained(_saved(api.OPTConfig(id2label={0: "no", 1: "yes", 2: "maybe"}), d))),
    "id2label with string keys": lambda api, d: api.OPTConfig(id2label={"0": "a", "1": "b"}).id2label,
    "use_return_dict": lambda api, d: (api.OPTConfig().use_return_dict, api.OPTConfig(return_dict=False).use_return_dict,
                                       api.OPTConfig(torchscript=True).use_return_dict),
    "eos_token_id as a list": lambda api, d: api.OPTConfig.from_pretrained(
        _saved(api.OPTConfig(eos_token_id=[3, 9]), d)).eos_token_id,
    "eos_token_id as a list in a BLIP-2 config": lambda api, d: api.Blip2Config.from_pretrained(
        _saved(tiny_config(api, text=dict(eos_token_id=[3, 9])), d)).text_config.eos_token_id,
    "vision width not divisible by heads": lambda api, d: api.Blip2VisionConfig(hidden_size=30, num_attention_heads=4).hidden_size,
    "Q-Former width not divisible by heads": lambda api, d: api.Blip2QFormerConfig(hidden_size=30).hidden_size,
    "OPT width not divisible by heads": lambda api, d: api.OPTConfig(hidden_size=30, num_attention_heads=4).hidden_size,
    "no query tokens": lambda api, d: api.Blip2Config(num_query_tokens=0).num_query_tokens,
    "subfolder": lambda api, d: api.Blip2Config.from_pretrained(
        str(_saved(tiny_config(api, num_query_tokens_unused=1), d, "cfg")), subfolder="cfg").num_query_tokens,
    "from_pretrained overrides": lambda api, d: (lambda c: (c.num_query_tokens, c.text_config.vocab_size))(
        api.Blip2Config.from_pretrained(str(_saved(tiny_config(api), d)), num_query_tokens=7)),
    "return_unused_kwargs": lambda api, d: api.OPTConfig.from_pretrained(
        str(_saved(api.OPTConfig(), d)), return_unused_kwargs=True, ffn_dim=11, not_a_field=1)[1],
    "to_json_file and from_json_file": lambda api, d: (
        api.OPTConfig(ffn_dim=13).to_json_file(str(d / "c.json")), api.OPTConfig.from_json_file(str(d / "c.json")).ffn_dim)[1],
    "to_json_file keeps the diff": lambda api, d: (
        api.OPTConfig(ffn_dim=13).to_json_file(str(d / "c.json")),
        {k: v for k, v in json.loads((d / "c.json").read_text()).items() if k in ("ffn_dim", "model_type")})[1],
    "to_json_string parses": lambda api, d: json.loads(api.Blip2VisionConfig(image_size=32).to_json_string())["image_size"],
    "to_json_string(use_diff=False) has the surface": lambda api, d: {
        k: json.loads(api.Blip2VisionConfig().to_json_string(use_diff=False))[k]
        for k in ("return_dict", "torchscript", "is_decoder", "pruned_heads", "bos_token_id")},
    "T5 alias attributes": lambda api, d: (lambda c: (c.hidden_size, c.num_attention_heads, c.num_hidden_layers))(
        api.T5Config(d_model=48, num_heads=3, num_layers=5)),
    "T5 alias assignment": lambda api, d: (lambda c: (setattr(c, "hidden_size", 96), c.d_model)[1])(api.T5Config()),
    "common defaults": lambda api, d: (lambda c: (c.is_decoder, c.add_cross_attention, c.pruned_heads, c.torchscript,
                                                  c.chunk_size_feed_forward, c.problem_type, c.architectures))(
        api.Blip2QFormerConfig()),
    "name_or_path after from_pretrained of a model folder": lambda api, d: api.Blip2Config().name_or_path,
    "is_composition": lambda api, d: (api.Blip2Config.is_composition, api.Blip2VisionConfig.is_composition),
    "equality after a round trip": lambda api, d: api.Blip2Config.from_pretrained(
        str(_saved(tiny_config(api), d))).to_dict() == tiny_config(api).to_dict(),
    "model_type": lambda api, d: [cls.model_type for cls in (api.Blip2Config, api.Blip2VisionConfig,
                                                             api.Blip2QFormerConfig, api.OPTConfig, api.T5Config)],
}


@pytest.mark.parametrize("name", SURFACE)
def test_config_surface(name, tmp_path: Path):
    ours, ref = both(SURFACE[name], tmp_path)
    assert ours == ref, f"{name}: ours {ours!r}, reference {ref!r}"


@pytest.mark.parametrize("writer, reader", [("ours", "reference"), ("reference", "ours")])
def test_config_files_cross_read(writer, reader, tmp_path: Path):
    """A config.json written by one reads in the other with the same fields."""
    config = tiny_config(APIS[writer], vision=dict(hidden_size=48), text=dict(eos_token_id=[3, 9]))
    config.torch_dtype = torch.float16
    config.save_pretrained(str(tmp_path))
    again = APIS[reader].Blip2Config.from_pretrained(str(tmp_path))
    assert again.qformer_config.encoder_hidden_size == 48
    assert again.text_config.eos_token_id == [3, 9]
    assert again.torch_dtype == torch.float16
    assert again.vision_config.hidden_size == 48 and again.num_query_tokens == 4


def test_label2id_is_the_inverse_of_a_given_id2label(tmp_path: Path):
    """Where the reference leaves label2id None (id2label given alone), ours fills in the inverse."""
    config = blip2.OPTConfig(id2label={"0": "no", "1": "yes"})
    config.save_pretrained(tmp_path)
    again = blip2.OPTConfig.from_pretrained(tmp_path)
    assert again.id2label == {0: "no", 1: "yes"} and again.label2id == {"no": 0, "yes": 1}


# ---------------------------------------------------------------- 4, 5. from_pretrained's arguments and dtype
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny reference model saved in float32, in float16, and in a subfolder; and its tensors
    (checkpoint names) with the projection doubled, for state_dict=."""
    from conftest import make_ref, ref_config

    root = tmp_path_factory.mktemp("compat-ckpt")
    ref = make_ref(transformers.Blip2ForConditionalGeneration, ref_config())
    ref.save_pretrained(str(root / "fp32"))
    ref.save_pretrained(str(root / "nested" / "inner"))
    ref.half().save_pretrained(str(root / "fp16"))
    # A float16 checkpoint whose config.json records no dtype: "auto" reads the weights' own.
    shutil.copytree(root / "fp16", root / "fp16-unrecorded")
    config_file = root / "fp16-unrecorded" / "config.json"
    data = json.loads(config_file.read_text())
    data.pop("torch_dtype")
    config_file.write_text(json.dumps(data))
    state = {k: v.float().clone() for k, v in ref.state_dict().items()}
    state["language_projection.weight"] *= 2
    return root, state


def fingerprint(loaded):
    """What a load gave, comparable across implementations: class, dtype, device, two tensors' sums."""
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    return (type(model).__name__, model.dtype, model.device.type, round(float(model.query_tokens.detach().double().sum()), 4),
            round(float(model.language_projection.weight.detach().double().sum()), 4))


LOADS = {
    "positional path": lambda cls, root, sd: cls.from_pretrained(str(root / "fp32")),
    "pretrained_model_name_or_path=": lambda cls, root, sd: cls.from_pretrained(pretrained_model_name_or_path=str(root / "fp32")),
    "state_dict=": lambda cls, root, sd: cls.from_pretrained(str(root / "fp32"), state_dict=sd),
    "subfolder=": lambda cls, root, sd: cls.from_pretrained(str(root / "nested"), subfolder="inner"),
    "low_cpu_mem_usage=True": lambda cls, root, sd: cls.from_pretrained(str(root / "fp32"), low_cpu_mem_usage=True),
    "low_cpu_mem_usage=False": lambda cls, root, sd: cls.from_pretrained(str(root / "fp32"), low_cpu_mem_usage=False),
    "float16 file, no torch_dtype": lambda cls, root, sd: cls.from_pretrained(str(root / "fp16")),
    "float16 file, torch_dtype='auto'": lambda cls, root, sd: cls.from_pretrained(str(root / "fp16"), torch_dtype="auto"),
    "float16 file without a recorded dtype, torch_dtype='auto'": lambda cls, root, sd: cls.from_pretrained(
        str(root / "fp16-unrecorded"), torch_dtype="auto"),
    "float32 file, torch_dtype='auto'": lambda cls, root, sd: cls.from_pretrained(str(root / "fp32"), torch_dtype="auto"),
    "float16 file, torch_dtype=float32": lambda cls, root, sd: cls.from_pretrained(str(root / "fp16"), torch_dtype=torch.float32),
    "float32 file, torch_dtype=bfloat16": lambda cls, root, sd: cls.from_pretrained(str(root / "fp32"), torch_dtype=torch.bfloat16),
    "device_map='cpu'": lambda cls, root, sd: cls.from_pretrained(str(root / "fp32"), device_map="cpu"),
    "device_map={'': 'cpu'}": lambda cls, root, sd: cls.from_pretrained(str(root / "fp32"), device_map={"": "cpu"}),
    "use_safetensors=True": lambda cls, root, sd: cls.from_pretrained(str(root / "fp32"), use_safetensors=True),
    "output_loading_info=True": lambda cls, root, sd: (lambda out: (fingerprint(out), {k: list(v) for k, v in out[1].items()}))(
        cls.from_pretrained(str(root / "fp32"), output_loading_info=True)),
    "config field override": lambda cls, root, sd: (lambda m: (m.config.output_hidden_states, m.config.num_query_tokens))(
        cls.from_pretrained(str(root / "fp32"), output_hidden_states=True)),
    "config=": lambda cls, root, sd: (lambda m: m.config.output_attentions)(cls.from_pretrained(
        str(root / "fp32"), config=type(cls.from_pretrained(str(root / "fp32")).config).from_pretrained(
            str(root / "fp32"), output_attentions=True))),
    "unknown keyword": lambda cls, root, sd: _raises(lambda: cls.from_pretrained(str(root / "fp32"), not_an_option=1)),
}


def _raises(call):
    try:
        call()
    except Exception as err:  # the type is compared; the message is checked separately
        return type(err).__name__
    return "no error"


@pytest.mark.parametrize("cls_name", ["Blip2ForConditionalGeneration", "Blip2Model"])
@pytest.mark.parametrize("name", LOADS)
def test_from_pretrained_arguments(name, cls_name, checkpoints):
    root, state = checkpoints
    results = {}
    for api_name, api in APIS.items():
        out = LOADS[name](getattr(api, cls_name), root, state)
        results[api_name] = fingerprint(out) if hasattr(out, "parameters") or (
            isinstance(out, tuple) and hasattr(out[0], "parameters")) else out
    assert results["ours"] == results["reference"], f"{name}: ours {results['ours']}, reference {results['reference']}"


def test_unknown_from_pretrained_keyword_names_it_and_the_valid_ones(checkpoints):
    root, _ = checkpoints
    with pytest.raises(TypeError) as err:
        blip2.Blip2ForConditionalGeneration.from_pretrained(root / "fp32", torch_dtpye=torch.float16)
    assert "torch_dtpye" in str(err.value) and "torch_dtype" in str(err.value) and "device_map" in str(err.value)


@pytest.mark.parametrize("device_map", [{"vision_model": "cpu", "language_model": 0}, {"": "cpu", "lm": "cpu"}])
def test_device_maps_that_cannot_be_followed_are_refused_clearly(device_map, checkpoints):
    """(Maps over several devices go through accelerate: tests/test_device_map.py.)"""
    root, _ = checkpoints
    with pytest.raises(ValueError, match="device_map"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(root / "fp32", device_map=device_map)


def test_state_dict_without_a_folder(checkpoints):
    """config= and state_dict= alone build the model (no files), with the tensors given."""
    root, state = checkpoints
    config = blip2.Blip2Config.from_pretrained(root / "fp32")
    model = blip2.Blip2ForConditionalGeneration.from_pretrained(None, config=config, state_dict=state)
    assert torch.equal(model.language_projection.weight, state["language_projection.weight"])
    with pytest.raises(Exception, match="language_model"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(
            None, config=config, state_dict={k: v for k, v in state.items() if not k.startswith("language_model")})


def test_training_from_a_float16_file_starts_in_float32(checkpoints):
    """The default dtype is float32 whatever the file holds, so an optimiser step stays finite."""
    root, _ = checkpoints
    model = blip2.Blip2ForConditionalGeneration.from_pretrained(root / "fp16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---------------------------------------------------------------- 6, 7, 8. fresh models: init, attributes, checkpointing
T5_TEXT = {k: v for k, v in T5_TINY.items()}
MODELS = {
    "generation-opt": ("Blip2ForConditionalGeneration", lambda api: tiny_config(api)),
    "generation-t5": ("Blip2ForConditionalGeneration", lambda api: api.Blip2Config(
        vision_config=BASE_VISION, qformer_config=BASE_QFORMER, text_config=T5_TEXT, num_query_tokens=4)),
    "generation-t5-untied": ("Blip2ForConditionalGeneration", lambda api: api.Blip2Config(
        vision_config=BASE_VISION, qformer_config=BASE_QFORMER, text_config={**T5_TEXT, "tie_word_embeddings": False},
        num_query_tokens=4)),
    "model-opt": ("Blip2Model", lambda api: tiny_config(api)),
    "model-t5": ("Blip2Model", lambda api: api.Blip2Config(
        vision_config=BASE_VISION, qformer_config=BASE_QFORMER, text_config=T5_TEXT, num_query_tokens=4)),
    "vision": ("Blip2VisionModel", lambda api: api.Blip2VisionConfig(**BASE_VISION)),
    "qformer": ("Blip2QFormerModel", lambda api: api.Blip2QFormerConfig(**BASE_QFORMER)),
    "qformer-wide-init": ("Blip2QFormerModel", lambda api: api.Blip2QFormerConfig(**BASE_QFORMER, initializer_range=0.5)),
    "opt-untied-init-std": ("Blip2ForConditionalGeneration", lambda api: tiny_config(
        api, text=dict(tie_word_embeddings=False, init_std=0.1))),
    "instructblip-opt": ("InstructBlipForConditionalGeneration", lambda api: api.InstructBlipConfig(
        vision_config=BASE_VISION, qformer_config=BASE_QFORMER, text_config=BASE_OPT, num_query_tokens=4)),
    "instructblip-t5": ("InstructBlipForConditionalGeneration", lambda api: api.InstructBlipConfig(
        vision_config=BASE_VISION, qformer_config=BASE_QFORMER, text_config=T5_TEXT, num_query_tokens=4)),
    "instructblip-vision": ("InstructBlipVisionModel", lambda api: api.InstructBlipVisionConfig(**BASE_VISION)),
    "instructblip-qformer": ("InstructBlipQFormerModel", lambda api: api.InstructBlipQFormerConfig(**BASE_QFORMER)),
}


def fresh(api, key: str, seed: int = 0):
    cls_name, make_config = MODELS[key]
    torch.manual_seed(seed)
    return getattr(api, cls_name)(make_config(api))


def _weight_shape(module):
    return None if module is None else tuple(module.weight.shape) if hasattr(module, "weight") else "a module"


def _no_split_present(m):
    return bool({type(x).__name__ for x in m.modules()} & set(m._no_split_modules))


def _resize(m, extra: int = 5, multiple: int | None = None):
    emb = m.get_input_embeddings()
    n, before = emb.weight.shape[0], emb.weight.detach().clone()
    new = m.resize_token_embeddings(n + extra, pad_to_multiple_of=multiple)
    head = m.get_output_embeddings()
    added = new.weight.detach()[n:]
    return (tuple(new.weight.shape), tuple(head.weight.shape), torch.equal(new.weight.detach()[:n], before),
            head.weight is new.weight, 0.01 < float(added.std()) < 0.03)


def _forward_after_resize(m):
    m.resize_token_embeddings(m.get_input_embeddings().weight.shape[0] + 3)
    ids = torch.tensor([[4, m.get_input_embeddings().weight.shape[0] - 1]])  # a new token
    kwargs = {"decoder_input_ids": ids} if m.config.is_encoder_decoder else {}
    if "InstructBlip" in type(m).__name__:
        kwargs["qformer_input_ids"] = torch.tensor([[5, 6]])
    return tuple(m.eval()(torch.randn(1, 3, 16, 16), input_ids=ids, **kwargs).logits.shape)


def _frozen_count(m):
    m.vision_model.requires_grad_(False)
    return m.num_parameters(only_trainable=True)


COMPOSITE = [k for k in MODELS if MODELS[k][0] in ("Blip2ForConditionalGeneration", "Blip2Model",
                                                     "InstructBlipForConditionalGeneration")]
ATTRIBUTES = {
    "base_model_prefix": (list(MODELS), lambda m: m.base_model_prefix),
    "main_input_name": ([k for k in MODELS if not k.startswith("qformer")], lambda m: m.main_input_name),
    "supports_gradient_checkpointing": (list(MODELS), lambda m: m.supports_gradient_checkpointing),
    "_keep_in_fp32_modules": (list(MODELS), lambda m: m._keep_in_fp32_modules),
    "_skip_keys_device_placement": (list(MODELS), lambda m: m._skip_keys_device_placement),
    "_no_split_modules name blocks of the model": ([k for k in MODELS if not k.startswith("qformer")], _no_split_present),
    # (4.37.2's InstructBLIP leaves _tied_weights_keys None although its head is tied; ours names it.)
    "_tied_weights_keys hold the head": ([k for k in MODELS if not k.startswith("instructblip")], lambda m: (m._tied_weights_keys is None,
                                                                  "language_model.lm_head.weight" in (m._tied_weights_keys or []))),
    "can_generate()": (list(MODELS), lambda m: (m.can_generate(), type(m).can_generate())),
    "config.is_encoder_decoder": (list(MODELS), lambda m: m.config.is_encoder_decoder),
    "num_parameters()": (list(MODELS), lambda m: m.num_parameters()),
    "num_parameters(exclude_embeddings=True)": (list(MODELS), lambda m: m.num_parameters(exclude_embeddings=True)),
    "num_parameters(only_trainable=True), image encoder frozen": (COMPOSITE, _frozen_count),
    "dtype and device": (list(MODELS), lambda m: (m.dtype, m.device.type)),
    "dtype after .to(bfloat16)": (list(MODELS), lambda m: m.to(torch.bfloat16).dtype),
    "get_input_embeddings": ([k for k in MODELS if not k.startswith("qformer")], lambda m: _weight_shape(m.get_input_embeddings())),
    "get_output_embeddings": (list(MODELS), lambda m: _weight_shape(m.get_output_embeddings())),
    "output tied to input": (COMPOSITE, lambda m: m.get_output_embeddings().weight is m.get_input_embeddings().weight),
    "resize_token_embeddings(+5)": (COMPOSITE, _resize),
    "resize_token_embeddings(pad_to_multiple_of=64)": (COMPOSITE, lambda m: _resize(m, 1, 64)),
    "resize_token_embeddings() alone": (COMPOSITE, lambda m: tuple(m.resize_token_embeddings().weight.shape)),
    "forward with a token added by resize": (COMPOSITE, _forward_after_resize),
    "gradient checkpointing switches": (list(MODELS), lambda m: (
        m.is_gradient_checkpointing, m.gradient_checkpointing_enable(), m.is_gradient_checkpointing,
        m.gradient_checkpointing_disable(), m.is_gradient_checkpointing)),
}
ATTRIBUTE_CASES = [(name, key) for name, (keys, _) in ATTRIBUTES.items() for key in keys]


@pytest.mark.parametrize("name, key", ATTRIBUTE_CASES, ids=[f"{n}-{k}" for n, k in ATTRIBUTE_CASES])
def test_model_attributes(name, key):
    read = ATTRIBUTES[name][1]
    ours, ref = read(fresh(blip2, key)), read(fresh(transformers, key))
    assert ours == ref, f"{name} on {key}: ours {ours!r}, reference {ref!r}"


def test_deliberate_attribute_differences():
    """Where ours differs on purpose: the Q-Former's main input is query_embeds (the reference says
    input_ids, which its forward does not take), it has no input embeddings (the reference raises an
    AttributeError), and _no_split_modules names our block classes, the Q-Former's layers among them
    (the reference's list names none of its Q-Former's modules)."""
    qformer = fresh(blip2, "qformer")
    assert qformer.main_input_name == "query_embeds"
    with pytest.raises(NotImplementedError, match="no input embedding"):
        qformer.get_input_embeddings()
    names = {type(m).__name__ for m in fresh(blip2, "generation-t5").modules()}
    assert {"VisionBlock", "QFormerLayer", "EncoderLayer", "DecoderLayer"} <= names & set(qformer._no_split_modules)


@pytest.mark.parametrize("cls_name", ["Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection",
                                      "Blip2VisionModelWithProjection"])
def test_retrieval_classes_have_the_model_surface(cls_name):
    """Not in 4.37.2: checked against what the newer releases set."""
    config = blip2.Blip2Config(vision_config=BASE_VISION, qformer_config={**BASE_QFORMER, "use_qformer_text_input": True},
                               text_config=BASE_OPT, num_query_tokens=4)
    model = getattr(blip2, cls_name)(config)
    assert model.base_model_prefix == "blip" and model.supports_gradient_checkpointing
    assert model._keep_in_fp32_modules == ["query_tokens", "qformer"] and not model.can_generate()
    assert model.main_input_name == ("input_ids" if cls_name.startswith("Blip2Text") else "pixel_values")
    assert model.get_input_embeddings() is not None and model.get_output_embeddings() is None
    assert model.num_parameters() > model.num_parameters(exclude_embeddings=True) or cls_name.startswith("Blip2Vision")
    assert _no_split_present(model)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing


# ---- 6. initialisation: the distribution of every tensor kind matches the reference's fresh model
def _groups(state: dict) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors pooled by kind (layer numbers dropped)."""
    import re

    pooled: dict[str, list] = {}
    for name, tensor in state.items():
        pooled.setdefault(re.sub(r"\.\d+\.", ".N.", name), []).append(tensor.detach().double().flatten())
    return {k: torch.cat(v) for k, v in pooled.items()}


@pytest.mark.parametrize("key", list(MODELS))
def test_initialisation_matches_the_reference(key):
    from blip2.checkpoint import ours_to_hf

    ours_model, ref_model = fresh(blip2, key), fresh(transformers, key)
    ours = _groups(ours_to_hf(ours_model.state_dict(), ours_model.key_table()))
    ref = _groups(ref_model.state_dict())
    assert set(ours) <= set(ref) and len(ours) >= len(ref) - 3, sorted(set(ref) - set(ours))
    for name, values in ours.items():
        want = ref[name]
        assert values.numel() == want.numel(), name
        if want.std() == 0:
            assert torch.all(values == want[0]), f"{name}: ours is not constant {want[0].item()}"
            continue
        ratio = float(values.std() / want.std())
        slack = max(0.2, 4 / values.numel() ** 0.5)
        assert abs(ratio - 1) < slack, f"{name}: std {values.std():.3g} vs reference {want.std():.3g}"
        assert abs(float(values.mean())) < 0.3 * float(want.std()) + 4 * float(want.std()) / values.numel() ** 0.5, name


# ---- 8. gradient checkpointing gives the same gradients
def _gradients(model, inputs: dict, checkpointing: bool) -> tuple[float, dict]:
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    model.train().zero_grad()
    torch.manual_seed(7)  # the same dropout masks
    loss = model(**inputs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("key", ["generation-opt", "generation-t5"])
def test_gradient_checkpointing_same_gradients(key):
    from conftest import make_inputs

    model = fresh(blip2, key)
    inputs = make_inputs(model.config, batch=2, seq=5)
    inputs.pop("attention_mask") if model.config.is_encoder_decoder else None
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = inputs["input_ids"]
    calls = []
    # A pre-hook: torch may stop a recomputation early, before a forward hook would run.
    hook = model.qformer.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    loss, plain = _gradients(model, inputs, checkpointing=False)
    runs_plain = len(calls)
    loss_ck, checked = _gradients(model, inputs, checkpointing=True)
    hook.remove()
    assert len(calls) - runs_plain == 2 * runs_plain, "with checkpointing each layer should run again in backward"
    assert loss_ck == pytest.approx(loss, abs=1e-6)
    assert plain.keys() == checked.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("key", ["vision", "qformer"])
def test_gradient_checkpointing_on_the_parts(key):
    model = fresh(blip2, key)
    torch.nn.init.normal_(next(model.parameters()), 0, 0.02)
    if key == "vision":
        run = lambda: model(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))).last_hidden_state
    else:
        image = torch.randn(2, 7, BASE_QFORMER["encoder_hidden_size"], generator=torch.Generator().manual_seed(0))
        queries = torch.randn(2, 4, BASE_QFORMER["hidden_size"], generator=torch.Generator().manual_seed(1))
        run = lambda: model(queries, encoder_hidden_states=image).last_hidden_state
    grads = []
    for on in (False, True):
        model.gradient_checkpointing_enable() if on else model.gradient_checkpointing_disable()
        model.train().zero_grad()
        torch.manual_seed(3)
        run().pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-9, rtol=1e-5, msg=name)


def test_a_list_of_eos_ids_in_the_config_stops_generation_on_either(tmp_path: Path):
    """text_config.eos_token_id = [a, b]: each row stops at the first of either, as in the reference."""
    from conftest import make_inputs, make_ref, ref_config

    probe = make_ref(transformers.Blip2ForConditionalGeneration, ref_config(text=dict(eos_token_id=97)))
    inputs = make_inputs(probe.config, batch=2, seq=4)
    free = probe.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], max_new_tokens=8)
    # A token each row generates early, different for the two rows.
    first = int(free[0, 2])
    eos = [first, next(int(t) for t in free[1, 1:] if int(t) != first)]
    ref = make_ref(transformers.Blip2ForConditionalGeneration, ref_config(text=dict(eos_token_id=eos)))
    ref.save_pretrained(str(tmp_path))
    want = ref.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], max_new_tokens=8)
    ours = blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    assert ours.config.text_config.eos_token_id == eos
    got = ours.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], max_new_tokens=8)
    assert got.tolist() == want.tolist()
    for row in got.tolist():
        stop = next(i for i, t in enumerate(row[1:], 1) if t in eos)  # each row reached one of them
        assert all(t == BASE_OPT["pad_token_id"] for t in row[stop + 1:]), row


def test_a_given_initializer_range_is_kept_and_used():
    """4.37.2 resets Blip2Config.initializer_range to 0.02 whatever it is given; ours keeps it."""
    config = tiny_config(blip2, initializer_range=0.1)
    assert blip2.Blip2Config.from_dict(config.to_dict()).initializer_range == 0.1
    torch.manual_seed(0)
    model = blip2.Blip2ForConditionalGeneration(config)
    assert 0.08 < float(model.language_projection.weight.std()) < 0.12
