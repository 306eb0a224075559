"""Llama-family language models against transformers 4.37.2: the bare decoder (LlamaForCausalLM)
and BLIP-2 over a Llama, on tiny random configurations (grouped-query attention on and off,
rope_theta, linear and dynamic rope scaling, biases, tied heads), forward and generate."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import Blip2ForConditionalGeneration as RefBlip2ForConditionalGeneration
from transformers import LlamaConfig as RefLlamaConfig
from transformers import LlamaForCausalLM as RefLlamaForCausalLM

from blip2 import Blip2ForConditionalGeneration, LlamaConfig
from blip2 import checkpoint as ckpt
from blip2.keymap import llama_rules
from blip2.modeling.attention import Positions
from blip2.modeling.llama import LlamaLanguageModel
from blip2.modeling.inference import optimize_for_inference
from conftest import BASE_QFORMER, BASE_VISION, assert_close, make_ref, save_ref, scale_of
from test_generate_blip2 import CASES, concrete, favourites

PAD, BOS, EOS = 0, 1, 2
BASE_LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
                  eos_token_id=EOS)

CONFIGS = {
    "mha": dict(),
    "gqa_bias_theta": dict(num_key_value_heads=2, attention_bias=True, rope_theta=500000.0),
    "mqa_tied_gelu": dict(num_key_value_heads=1, tie_word_embeddings=True, hidden_act="gelu", rms_norm_eps=1e-5),
    "linear_scaling_gqa": dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=1000.0,
                               num_key_value_heads=2),
    # Queries + prompt outgrow 8 positions: the dynamic NTK base changes at every step.
    "dynamic_scaling": dict(rope_scaling={"type": "dynamic", "factor": 3.0}, max_position_embeddings=8),
    "three_heads_deep": dict(hidden_size=48, num_attention_heads=3, intermediate_size=20, num_hidden_layers=3),
}


def llama_dict(name: str) -> dict:
    return {**BASE_LLAMA, **CONFIGS[name]}


def fresh(ref):
    """The reference's dynamic rope scaling keeps the longest sequence's tables across calls;
    each comparison gets an untouched copy, as a freshly loaded model would be."""
    return copy.deepcopy(ref)


def quiet(fn, *args, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------- the bare decoder
@pytest.fixture(scope="module", params=sorted(CONFIGS))
def lm_pair(request, tmp_path_factory):
    name = request.param
    ref = make_ref(RefLlamaForCausalLM, RefLlamaConfig(**llama_dict(name)), seed=len(name), std=0.2)
    folder = save_ref(ref, tmp_path_factory.mktemp(name))
    config = LlamaConfig.from_json_file(folder / "config.json")
    ours = ckpt.load_into(lambda: LlamaLanguageModel(config), folder, llama_rules(config, prefix=""), None).eval()
    return ours, ref, name


def padded_batch(vocab: int, lengths=(7, 4, 10), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def test_decoder_forward_matches_reference(lm_pair):
    ours, ref, name = lm_pair
    ids, mask = padded_batch(ours.config.vocab_size)
    full = torch.ones_like(mask)
    arange = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        # Unpadded: every position, every layer's hidden state and attention weights.
        expected = quiet(fresh(ref), input_ids=ids, attention_mask=full, output_hidden_states=True,
                         output_attentions=True)
        got = ours(ours.embed(ids), full, need_hidden=True, need_weights=True)
        assert scale_of(expected.logits) > 0.5
        assert_close(got.logits, expected.logits, "logits", record=f"llama {name}")
        assert_close(got.hidden_states, expected.hidden_states, "hidden_states", record=f"llama {name}")
        assert_close(got.attentions, expected.attentions, "attentions", record=f"llama {name}")
        # Left-padded, positions 0..T-1 as the reference's forward numbers them: the real tokens agree.
        expected = quiet(fresh(ref), input_ids=ids, attention_mask=mask).logits
        numbered = Positions.after(mask, ids.shape[1], torch.float32)._replace(ids=arange)
        got = ours(ours.embed(ids), positions=numbered).logits
        assert_close(got[mask.bool()], expected[mask.bool()], "padded logits", record=f"llama {name}")


def test_decoder_cache_matches_reference_positions(lm_pair):
    """Prefill then single steps through our KV cache equal the reference's generation-time
    forward (positions counted over unmasked tokens, past keys and values reused)."""
    ours, ref, name = lm_pair
    ids, mask = padded_batch(ours.config.vocab_size, seed=1)
    extra = torch.randint(3, ours.config.vocab_size, (3, 4), generator=torch.Generator().manual_seed(2))
    ref = fresh(ref)
    with torch.no_grad():
        cache = ours.new_cache(3, ids.shape[1] + 4)
        ours_steps = [ours(ours.embed(ids), mask, cache, last_logits=1).logits[:, -1]]
        positions = mask.cumsum(1) - 1
        positions = positions.masked_fill(mask == 0, 1)
        out = quiet(ref, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        ref_steps, past = [out.logits[:, -1]], out.past_key_values
        for t in range(4):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            ours_steps.append(ours(ours.embed(extra[:, t:t + 1]), mask, cache).logits[:, -1])
            pos = mask.sum(1, keepdim=True) - 1
            out = quiet(ref, input_ids=extra[:, t:t + 1], attention_mask=mask, position_ids=pos,
                        past_key_values=past, use_cache=True)
            ref_steps.append(out.logits[:, -1])
            past = out.past_key_values
    assert_close(torch.stack(ours_steps, 1), torch.stack(ref_steps, 1), "cached step logits",
                 record=f"llama {name}")


def test_config_is_checked():
    with pytest.raises(ValueError, match="num_key_value_heads"):  # when the model is built, as the reference
        LlamaLanguageModel(LlamaConfig(num_attention_heads=4, num_key_value_heads=3, hidden_size=32,
                                       num_hidden_layers=1, vocab_size=8, intermediate_size=8))
    with pytest.raises(ValueError, match="rope_scaling type"):
        LlamaConfig(rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="factor must be a float > 1"):
        LlamaConfig(rope_scaling={"type": "linear", "factor": 2})
    config = LlamaConfig(num_attention_heads=8)
    assert config.num_key_value_heads == 8
    assert LlamaConfig.from_dict(config.to_dict()) == config


# ---------------------------------------------------------------- BLIP-2 over a Llama
BLIP2_CONFIGS = ["gqa_bias_theta", "mqa_tied_gelu", "linear_scaling_gqa", "dynamic_scaling"]


def blip2_ref_config(name: str, num_query_tokens: int = 3):
    from transformers import Blip2Config as HFBlip2Config

    return HFBlip2Config(vision_config=BASE_VISION, qformer_config=BASE_QFORMER, text_config=llama_dict(name),
                         num_query_tokens=num_query_tokens)


def build_blip2_pair(name, tmp_path_factory):
    ref = make_ref(RefBlip2ForConditionalGeneration, blip2_ref_config(name), seed=len(name), std=0.2)
    folder = save_ref(ref, tmp_path_factory.mktemp(f"blip2_{name}"))
    return Blip2ForConditionalGeneration.from_pretrained(folder), ref, name


@pytest.fixture(scope="module", params=BLIP2_CONFIGS)
def blip2_pair(request, tmp_path_factory):
    return build_blip2_pair(request.param, tmp_path_factory)


def prompts(model, batch=3, seed=0):
    """Images and left-padded prompts that start with BOS, lengths 5, 2, 1."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    ids, mask = padded_batch(model.config.text_config.vocab_size, lengths=[5, 2, 1, 4][:batch], seed=seed)
    ids[mask.cumsum(1) == 1] = BOS  # each row's first real token
    return pixel_values, ids, mask


def test_blip2_forward_and_loss_match_reference(blip2_pair):
    ours, ref, name = blip2_pair
    pixel_values, ids, mask = prompts(ours)
    labels = ids.masked_fill(mask == 0, -100)
    flags = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        expected = quiet(fresh(ref), pixel_values=pixel_values, input_ids=ids, attention_mask=mask, **flags)
        got = ours(pixel_values, ids, mask, **flags)
        assert_close(got.logits, expected.logits, "blip2 logits", record=f"blip2-llama {name}")
        lm, ref_lm = got.language_model_outputs, expected.language_model_outputs
        # Rows of all-padding positions that see nothing differ by convention (the reference's
        # SDPA path unmasks them); here the queries come first, so every row sees something.
        for field in ("hidden_states", "attentions", "past_key_values"):
            assert_close(getattr(lm, field), getattr(ref_lm, field), f"language_model_outputs.{field}",
                         record=f"blip2-llama {name}")
        expected = quiet(fresh(ref), pixel_values=pixel_values, input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(pixel_values, ids, mask, labels=labels)
        assert_close(got.loss, expected.loss, "loss", record=f"blip2-llama {name}")


def test_blip2_generate_matches_reference(blip2_pair):
    ours, ref, name = blip2_pair
    pixel_values, ids, mask = prompts(ours)
    favs = favourites(ours, pixel_values, ids, mask)
    for prompt in ((ids, mask), (None, None)):
        for case in CASES:
            kwargs = concrete(case, favs)
            expected = quiet(fresh(ref).generate, pixel_values=pixel_values, input_ids=prompt[0],
                             attention_mask=prompt[1], **kwargs)
            got = ours.generate(pixel_values, *prompt, **kwargs)
            assert torch.equal(got, expected), f"{name} {kwargs}\nours\n{got}\nreference\n{expected}"
    for kwargs in (dict(do_sample=True, max_new_tokens=8, top_k=10, temperature=0.8, num_return_sequences=2),
                   dict(do_sample=True, max_new_tokens=8, top_p=0.9, repetition_penalty=1.2)):
        torch.manual_seed(3)
        expected = quiet(fresh(ref).generate, pixel_values=pixel_values, input_ids=ids, attention_mask=mask, **kwargs)
        torch.manual_seed(3)
        assert torch.equal(ours.generate(pixel_values, ids, mask, **kwargs), expected), kwargs


def test_blip2_round_trip_and_fast_paths(tmp_path_factory, tmp_path):
    """Grouped-query q/k/v split back to their own sizes (sharded), the reference loads them; packed and int8 run."""
    ours, ref, name = build_blip2_pair("gqa_bias_theta", tmp_path_factory)
    ours.save_pretrained(tmp_path, max_shard_size="100KB")
    back = RefBlip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    for (key, a), (_, b) in zip(sorted(back.state_dict().items()), sorted(ref.state_dict().items())):
        assert torch.equal(a, b), key
    pixel_values, ids, mask = prompts(ours, batch=2)
    greedy = ours.generate(pixel_values, ids, mask, max_new_tokens=6)
    fast = Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    optimize_for_inference(fast)  # packed weights: the same tokens
    assert torch.equal(fast.generate(pixel_values, ids, mask, max_new_tokens=6), greedy)
    int8 = Blip2ForConditionalGeneration.from_pretrained(tmp_path, quantize="int8")
    assert int8.generate(pixel_values, ids, mask, max_new_tokens=6).shape == greedy.shape
