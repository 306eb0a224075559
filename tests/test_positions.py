"""Cache positions as tensors: rows of one batch at different lengths, through the one forward."""

from __future__ import annotations

import torch

from blip2.config import OPTConfig
from blip2.modeling.attention import Positions
from blip2.modeling.opt import OPTLanguageModel
from conftest import BASE_OPT, redraw_

NEG = torch.finfo(torch.float32).min


def test_rows_at_different_lengths_decode_as_if_alone():
    torch.manual_seed(0)
    lm = redraw_(OPTLanguageModel(OPTConfig(**{**BASE_OPT, "vocab_size": 40})), std=0.3).eval()
    long, short = torch.randint(3, 40, (6,)), torch.randint(3, 40, (4,))  # 5 and 3 tokens filled, then one more

    # Prefill both rows together, the short one right-padded (its padding slots are overwritten or hidden).
    prompt = torch.stack([long[:5], torch.cat([short[:3], short.new_zeros(2)])])  # (2, 5)
    cache = lm.new_cache(2, 8)
    causal = torch.full((5, 5), NEG).triu(1).expand(2, 1, 5, 5)
    at = Positions(ids=torch.arange(5).expand(2, 5), slots=torch.arange(5), mask=causal)
    lm(lm.embed(prompt), cache=cache, positions=at)

    # One step, each row at its own slot and position: row 0 writes slot 5, row 1 slot 3.
    slots = torch.tensor([[5], [3]])
    mask = torch.zeros(2, 1, 1, 6)
    mask[1, ..., 4:] = NEG  # row 1 sees its 3 tokens and the new one
    step = Positions(ids=slots, slots=slots, mask=mask)
    tokens = torch.stack([long[5], short[3]])[:, None]  # (2, 1)
    got = lm(lm.embed(tokens), cache=cache, positions=step).logits[:, -1]

    for row, seq in enumerate((long, short)):
        alone = lm(lm.embed(seq[None])).logits[0, -1]  # the whole row, no cache
        torch.testing.assert_close(got[row], alone, atol=1e-5, rtol=1e-5)
    assert cache.length == 0  # forwards given positions leave the count to their caller


def test_eager_positions_count_only_unmasked_tokens():
    keep = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    at = Positions.after(keep, 2, torch.float32)
    assert at.ids.tolist() == [[1, 2], [3, 4]] and at.slots.tolist() == [3, 4]
    assert at.mask.shape == (2, 1, 2, 5) and at.mask[0, 0, 0, 0] == NEG and at.mask[0, 0, 0, 4] == NEG
