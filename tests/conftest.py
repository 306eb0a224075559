"""Shared test helpers: tiny random reference (transformers 4.37.2) BLIP-2 models, saved with the
reference's own save_pretrained, and a max-abs-diff assertion that says what differed and by how much.

transformers is imported lazily inside the helpers, so test files that never touch the
reference do not pay for importing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

ATOL = 1e-5  # fp32 parity bound the issue asks for

# The test models are tiny: with several threads per process on a shared machine, thread
# hand-offs cost far more than the arithmetic (a tenfold slowdown measured). OMP_NUM_THREADS overrides.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

@pytest.fixture(autouse=True)
def pack_tiny_layers(monkeypatch):
    """Models pack only large layers by themselves; the tests' tiny layers pack too, so every parity
    test also covers the prepacked path."""
    import blip2.modeling.packed as packed

    monkeypatch.setattr(packed, "PACK_MIN_WEIGHTS", 1)


# ---------------------------------------------------------------- tiny configurations
# One small base; each parity configuration overrides parts of it.
BASE_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   image_size=16, patch_size=4, qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-6)
BASE_QFORMER = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=40, cross_attention_frequency=1, encoder_hidden_size=32,
                    max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
BASE_OPT = dict(model_type="opt", vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=37,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                pad_token_id=1, bos_token_id=2, eos_token_id=3, dropout=0.1)


def ref_config(vision: dict | None = None, qformer: dict | None = None, text: dict | None = None,
               num_query_tokens: int = 4, **kwargs):
    """A transformers Blip2Config from overrides of the tiny base; encoder_hidden_size follows the vision width."""
    from transformers import Blip2Config as HFBlip2Config

    v = {**BASE_VISION, **(vision or {})}
    q = {**BASE_QFORMER, "encoder_hidden_size": v["hidden_size"], **(qformer or {})}
    t = {**BASE_OPT, **(text or {})}
    if "hidden_size" in (text or {}) and "word_embed_proj_dim" not in (text or {}):
        t["word_embed_proj_dim"] = t["hidden_size"]
    return HFBlip2Config(vision_config=v, qformer_config=q, text_config=t,
                         num_query_tokens=num_query_tokens, **kwargs)


@torch.no_grad()
def redraw_(module: nn.Module, std: float = 0.2, seed: int = 0) -> nn.Module:
    """Re-draws every parameter so that outputs are far from trivially small.

    The reference initialises BLIP-2 with tiny values (vision initializer_range 1e-10), which
    would let a wrong model pass a 1e-5 bound. Norm weights are drawn around 1.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
        is_norm_weight = name.endswith("weight") and param.dim() == 1
        param.copy_((1.0 + noise) if is_norm_weight else noise)
    return module


def make_ref(cls, config, seed: int = 0, std: float = 0.2):
    """A reference model of class `cls` with re-drawn weights, in eval mode."""
    torch.manual_seed(seed)
    model = cls(config)
    redraw_(model, std, seed)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def save_ref(model, directory: Path, **kwargs) -> Path:
    """Saves with the reference's own save_pretrained (safetensors unless told otherwise)."""
    model.save_pretrained(str(directory), **kwargs)
    return Path(directory)


def make_inputs(config, batch: int = 2, seq: int = 5, seed: int = 1, image_size: int | None = None) -> dict:
    """pixel_values, input_ids (no pad id inside the text), a left-padded attention_mask, and labels."""
    gen = torch.Generator().manual_seed(seed)
    vc, tc = config.vision_config, config.text_config
    size = image_size or vc.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=gen)
    input_ids = torch.randint(4, tc.vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and seq > 2:
        attention_mask[0, :2] = 0  # left padding in the first row
        input_ids[0, :2] = tc.pad_token_id
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)


# ---------------------------------------------------------------- comparisons
# Largest difference seen per (configuration, what), printed at the end of the run.
MAX_DIFFS: dict[tuple[str, str], float] = {}


def _flatten(value, prefix: str):
    if value is None:
        yield prefix, None
    elif isinstance(value, Tensor):
        yield prefix, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{i}]")
    else:
        raise TypeError(f"{prefix}: cannot compare a {type(value).__name__}")


def max_abs_diff(actual, expected, what: str = "output") -> float:
    """Largest |actual - expected| over tensors or nested tuples of them; raises on structure or shape mismatch."""
    a_items, e_items = list(_flatten(actual, what)), list(_flatten(expected, what))
    if len(a_items) != len(e_items):
        raise AssertionError(f"{what}: ours has {len(a_items)} tensors, the reference {len(e_items)}")
    worst = 0.0
    for (name, a), (_, e) in zip(a_items, e_items):
        if a is None or e is None:
            if a is not e:
                raise AssertionError(f"{name}: ours is {'None' if a is None else 'set'}, "
                                     f"the reference is {'None' if e is None else 'set'}")
            continue
        if tuple(a.shape) != tuple(e.shape):
            raise AssertionError(f"{name}: shape {tuple(a.shape)} (ours) vs {tuple(e.shape)} (reference)")
        if a.numel():
            diff = (a.detach().double() - e.detach().double()).abs()
            if torch.isnan(diff).any():
                raise AssertionError(f"{name}: NaN in the difference")
            worst = max(worst, diff.max().item())
    return worst


def assert_close(actual, expected, what: str, atol: float = ATOL, record: str | None = None) -> float:
    """Asserts max |actual - expected| <= atol; the message names `what`, the difference and the bound."""
    worst = max_abs_diff(actual, expected, what)
    if record is not None:
        key = (record, what.split("[")[0])
        MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), worst)
    assert worst <= atol, f"{what}: max abs diff {worst:.3e} exceeds {atol:.0e}"
    return worst


def scale_of(value) -> float:
    """Largest |x| in a tensor or nested tuple: proof that a comparison was not of near-zeros."""
    return max((t.detach().abs().max().item() for _, t in _flatten(value, "") if t is not None and t.numel()),
               default=0.0)


# Rows of batched generation equal to their solo run, per "model dtype": [equal, rows] (test_row_independence).
AGREEMENT: dict[str, list[int]] = {}


def pytest_terminal_summary(terminalreporter):
    if AGREEMENT:
        terminalreporter.section("batched rows equal to their solo run")
        for name, (equal, total) in sorted(AGREEMENT.items()):
            terminalreporter.write_line(f"{name:20s} {equal}/{total} ({equal / total:.1%})")
    if not MAX_DIFFS:
        return
    per_config: dict[str, float] = {}
    for (config, _), diff in MAX_DIFFS.items():
        per_config[config] = max(per_config.get(config, 0.0), diff)
    terminalreporter.section("largest |ours - reference| per configuration")
    for config, diff in sorted(per_config.items()):
        terminalreporter.write_line(f"{config:32s} {diff:.3e}")
