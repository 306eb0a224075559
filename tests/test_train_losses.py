"""Stage-1 and stage-2 losses and masks, against explicit constructions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip2.modeling.qformer import multimodal_causal_mask
from blip2.train.losses import (
    IGNORE,
    hard_negatives,
    itc_loss,
    itc_similarities,
    itg_labels,
    itm_loss,
    lm_labels,
    next_token_loss_sum,
    token_mean,
)
from blip2.train.stage1 import Blip2ForQFormerPretraining, init_qformer_
from train_helpers import one_thread, stage1_config  # noqa: F401 (one_thread: an autouse fixture)



def explicit_itg_mask(num_queries: int, text_keep: torch.Tensor) -> torch.Tensor:
    """The paper's figure 2 (right), one entry at a time."""
    B, T = text_keep.shape
    S = num_queries + T
    mask = torch.zeros(B, S, S, dtype=torch.long)
    for b in range(B):
        for i in range(S):
            for j in range(S):
                query_row, query_col = i < num_queries, j < num_queries
                if query_row:
                    allowed = query_col  # queries see queries only
                else:
                    allowed = query_col or j <= i  # text sees the queries and earlier text
                padded = not query_col and text_keep[b, j - num_queries] == 0
                mask[b, i, j] = int(allowed and not padded)
    return mask


def test_itg_mask_equals_explicit_construction():
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    for Q in (0, 1, 3):
        built = multimodal_causal_mask(Q, keep)
        assert built.shape == (3, Q + 5, Q + 5)
        assert torch.equal(built, explicit_itg_mask(Q, keep)), f"Q={Q}"


@torch.no_grad()
def test_itg_on_cached_queries_equals_one_masked_pass():
    """The training path (text against the queries' cached keys/values) is the same function as
    one Q-Former pass over [queries; text] under the multimodal causal mask."""
    torch.manual_seed(0)
    model = Blip2ForQFormerPretraining(stage1_config()).eval()
    init_qformer_(model, std=0.2)
    B, T, Q = 3, 6, 4
    image = torch.randn(B, 5, 16)
    ids = torch.randint(5, 26, (B, T))
    keep = torch.ones(B, T, dtype=torch.long)
    keep[1, 4:] = 0
    queries = model.image_queries(image, use_cache=True)
    cached = model.itg_logits(queries.present, ids, keep)

    tokens = model.query_tokens.expand(B, -1, -1)
    embeds = torch.cat([tokens, model.embeddings(ids)], dim=1)
    joint = model.qformer.forward_joint(embeds, Q, multimodal_causal_mask(Q, keep), image).last_hidden_state
    one_pass = model.itg_head(joint[:, Q:], model.embeddings.word.weight)
    assert (cached - one_pass).abs().max() < 1e-5
    # ... and the queries in that pass are the image-only queries: they never see the text.
    assert (joint[:, :Q] - queries.last_hidden_state).abs().max() < 1e-5
    assert cached.abs().max() > 0.1


def test_itc_matches_a_direct_computation():
    torch.manual_seed(0)
    B, Q, E = 4, 3, 8
    image = F.normalize(torch.randn(B, Q, E), dim=-1)
    text = F.normalize(torch.randn(B, E), dim=-1)
    temp = torch.tensor(0.07)
    sim_i2t, sim_t2i = itc_similarities(image, text, image, text, temp)
    for i in range(B):
        for t in range(B):
            best = max(float(image[i, q] @ text[t]) for q in range(Q))
            assert math.isclose(sim_i2t[i, t].item(), best / 0.07, rel_tol=1e-5)
            assert math.isclose(sim_t2i[t, i].item(), best / 0.07, rel_tol=1e-5)
    loss = itc_loss(sim_i2t, sim_t2i, offset=0, label_smoothing=0.1)
    targets = torch.arange(B)
    expected = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                + F.cross_entropy(sim_i2t.t(), targets, label_smoothing=0.1)) / 2
    assert torch.allclose(loss, expected)


def test_itc_rows_of_a_shard_equal_the_rows_of_the_whole_batch():
    """What one process of two computes is the matching half of what one process computes."""
    torch.manual_seed(1)
    N, Q, E = 6, 2, 4
    image = F.normalize(torch.randn(N, Q, E), dim=-1)
    text = F.normalize(torch.randn(N, E), dim=-1)
    temp = torch.tensor(0.1)
    whole = itc_similarities(image, text, image, text, temp)
    half = itc_similarities(image[3:], text[3:], image, text, temp)
    for w, h in zip(whole, half):
        assert torch.equal(w[3:], h)
    per_shard = (itc_loss(*[s[:3] for s in whole], offset=0) + itc_loss(*half, offset=3)) / 2
    assert torch.allclose(per_shard, itc_loss(*whole, offset=0))


def test_hard_negatives_never_pick_the_positive_and_follow_the_softmax():
    sims = torch.tensor([[0.0, 2.0, 1.0, 0.0]])  # (B=1, N=4); the positive is column 0
    counts = torch.zeros(4)
    for seed in range(3000):
        neg_images, neg_texts = hard_negatives(sims, sims, offset=0, seed=seed)
        counts[neg_images[0]] += 1
    assert counts[0] == 0
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), dim=0)
    assert (counts[1:] / counts.sum() - expected).abs().max() < 0.03


def test_hard_negatives_of_a_shard_equal_those_of_the_whole_batch():
    torch.manual_seed(2)
    sim_i2t, sim_t2i = torch.randn(6, 6), torch.randn(6, 6)
    whole = hard_negatives(sim_i2t, sim_t2i, offset=0, seed=7)
    second_half = hard_negatives(sim_i2t[3:], sim_t2i[3:], offset=3, seed=7)
    for w, h in zip(whole, second_half):
        assert torch.equal(w[3:], h)
    with pytest.raises(ValueError, match="at least 2"):
        hard_negatives(sim_i2t[:1, :1], sim_t2i[:1, :1], offset=0, seed=0)


def test_itm_labels_one_positive_then_two_negatives():
    logits = torch.tensor([[0.0, 5.0]] * 2 + [[5.0, 0.0]] * 4)  # confident and right
    assert itm_loss(logits) < 0.01
    assert itm_loss(logits.flip(-1)) > 4


def test_itg_labels_start_with_the_decoder_token_and_skip_padding():
    ids = torch.tensor([[2, 7, 8, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    dec, labels = itg_labels(ids, mask, dec_token_id=4)
    assert dec.tolist() == [[4, 7, 8, 3, 0]]
    assert labels.tolist() == [[4, 7, 8, 3, IGNORE]]


def test_next_token_loss_is_shifted_and_token_mean_divides_by_tokens():
    V = 5
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE]])
    logits = torch.full((1, 4, V), -10.0)
    logits[0, 0, 1] = logits[0, 1, 2] = 10.0  # position t predicts label t + 1
    total, count = next_token_loss_sum(logits, labels)
    assert count.item() == 2 and total.item() < 1e-6
    assert math.isclose(token_mean(torch.tensor(6.0), torch.tensor(3)).item(), 2.0)


def test_lm_labels_mask_prompt_and_padding():
    ids = torch.tensor([[2, 10, 11, 12, 13, 1], [2, 10, 14, 15, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    labels = lm_labels(ids, mask, prompt_lengths=torch.tensor([3, 2]))
    assert labels.tolist() == [[IGNORE, IGNORE, IGNORE, 12, 13, IGNORE], [IGNORE, IGNORE, 14, 15, IGNORE, IGNORE]]
