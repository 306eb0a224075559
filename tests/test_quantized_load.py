"""`from_pretrained(..., quantize=...)` quantizes the language model while reading it, a block of
rows at a time (the float weights never exist whole): the same tensors and logits as loading in
float and quantizing afterwards, for OPT (tied head, fused q/k/v), Flan-T5 (untied head) and an
InstructBLIP Vicuna with grouped-query attention (q/k/v of different heights)."""

from __future__ import annotations

import pytest
import torch
import transformers

from blip2 import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration
from blip2.modeling import quant
from blip2.modeling.inference import quantize_model
from conftest import make_inputs, make_ref, ref_config, save_ref
from test_instructblip import ref_config as instruct_config

T5 = dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
          tie_word_embeddings=False)


def _opt():
    return Blip2ForConditionalGeneration, make_ref(transformers.Blip2ForConditionalGeneration, ref_config())


def _t5():
    config = ref_config(text=T5)
    config.text_config = type(config.text_config)(**T5)
    return Blip2ForConditionalGeneration, make_ref(transformers.Blip2ForConditionalGeneration, config, std=0.05)


def _vicuna():
    return InstructBlipForConditionalGeneration, make_ref(transformers.InstructBlipForConditionalGeneration,
                                                          instruct_config("vicuna_gqa_caf2"))


MODELS = {"opt": _opt, "t5": _t5, "vicuna_gqa": _vicuna}


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved(request, tmp_path_factory):
    cls, ref = MODELS[request.param]()
    folder = save_ref(ref.half(), tmp_path_factory.mktemp(request.param))  # float16 files, as published
    return cls, ref.config, folder


def _logits(model, config):
    inputs = make_inputs(config, batch=2, seq=4)
    kwargs = dict(pixel_values=inputs["pixel_values"].bfloat16(), input_ids=inputs["input_ids"],
                  attention_mask=inputs["attention_mask"])
    if model.config.text_config.model_type == "t5":
        kwargs["decoder_input_ids"] = inputs["input_ids"][:, :3]
    if isinstance(model, InstructBlipForConditionalGeneration):
        kwargs["qformer_input_ids"] = inputs["input_ids"] % config.qformer_config.vocab_size
    with torch.no_grad():
        return model(**kwargs).logits


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_while_loading_equals_quantized_after_loading(saved, kind, monkeypatch):
    cls, config, folder = saved
    monkeypatch.setattr(quant, "_QUANT_BLOCK_ELEMENTS", 32 * 5)  # int8: 5-row blocks, across the q/k/v parts
    blocks = []
    fill_rows = quant.QUANTIZERS[kind].fill_rows
    monkeypatch.setattr(quant.QUANTIZERS[kind], "fill_rows",
                        lambda self, start, rows: blocks.append((self, len(rows))) or fill_rows(self, start, rows))

    after = cls.from_pretrained(folder, torch_dtype=torch.bfloat16)
    quantize_model(after, kind)
    blocks.clear()
    early = cls.from_pretrained(folder, torch_dtype=torch.bfloat16, quantize=kind)

    a, b = after.state_dict(), early.state_dict()
    assert a.keys() == b.keys() and any(key.endswith(("weight_int8", "weight_int4")) for key in b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert torch.equal(_logits(after, config), _logits(early, config))
    # The loader handed the weights over in blocks: no layer got more rows at once than it asked for.
    assert blocks and all(n <= layer.block_rows for layer, n in blocks)
    assert any(layer.out_features > n for layer, n in blocks)


def test_quantized_load_from_a_state_dict_equals_quantized_after_loading(tmp_path):
    _, ref = _opt()
    state = {k: v.half() for k, v in ref.state_dict().items()}
    config = Blip2ForConditionalGeneration.config_class.from_dict(ref.config.to_dict())
    args = dict(config=config, state_dict=state, torch_dtype=torch.bfloat16)
    after = quantize_model(Blip2ForConditionalGeneration.from_pretrained(None, **args), "int8")
    early = Blip2ForConditionalGeneration.from_pretrained(None, quantize="int8", **args)
    a, b = after.state_dict(), early.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_int4_rows_filled_by_blocks_equal_the_whole_weight(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 200).to(torch.bfloat16)  # 3 blocks of 64 in the kernel's layout, 8 rows past them
    whole = quant.Int4Linear(linear)
    monkeypatch.setattr(quant, "_QUANT_BLOCK_ELEMENTS", 64 * 64)  # 64 rows a block
    blocks = quant.Int4Linear(linear)
    a, b = whole.state_dict(), blocks.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
