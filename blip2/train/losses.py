"""The paper's losses as plain functions of tensors.

Stage 1: image-text contrastive (ITC), image-text matching with hard negatives (ITM),
image-grounded text generation (ITG). Stage 2: language modelling (LM).

Shapes: B examples on this process, N = world_size * B in the global batch, Q queries,
E the contrastive width. `offset` is where this process's examples start in the global
batch (rank * B), so that one process holding all N computes the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed as dist

IGNORE = -100


# ---------------------------------------------------------------- ITC
def itc_similarities(image_feats: Tensor, text_feat: Tensor, image_feats_all: Tensor, text_feat_all: Tensor,
                     temp: Tensor) -> tuple[Tensor, Tensor]:
    """Every query against each text's [CLS]; the best query scores the pair.

    image_feats (B, Q, E), text_feat (B, E) local; *_all the same over the global batch (N, ...).
    Returns sim_i2t (B, N) (local images vs all texts) and sim_t2i (B, N) (local texts vs all
    images), divided by the temperature.
    """
    sim_i2t = torch.einsum("bqe,ne->bqn", image_feats, text_feat_all).max(dim=1).values  # (B, N)
    sim_t2i = torch.einsum("be,nqe->bnq", text_feat, image_feats_all).max(dim=2).values  # (B, N)
    return sim_i2t / temp, sim_t2i / temp


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, offset: int, label_smoothing: float = 0.1) -> Tensor:
    """Symmetric cross-entropy; example b's positive is global column offset + b."""
    targets = torch.arange(sim_i2t.shape[0], device=sim_i2t.device) + offset
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2


# ---------------------------------------------------------------- ITM
def gumbel_noise(rows: int, cols: int, seed: int, device) -> Tensor:
    """Noise from its own generator: every process draws the same global matrix, so one
    process and many pick the same negatives, and a resumed run picks what the first would."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=gen).clamp_(1e-9, 1 - 1e-9)
    return (-torch.log(-torch.log(u))).to(device)


@torch.no_grad()
def hard_negatives(sim_i2t: Tensor, sim_t2i: Tensor, offset: int, seed: int) -> tuple[Tensor, Tensor]:
    """Samples, for each local pair, a negative image for its text and a negative text for its
    image, with probability softmax(similarity) over the global batch, positives excluded.

    Sampling is Gumbel-max (argmax of logits + Gumbel noise), which draws from the same
    softmax as torch.multinomial. Returns global indices (B,), (B,): images, texts.
    """
    B, N = sim_t2i.shape
    if N < 2:
        raise ValueError("ITM needs a global batch of at least 2 to draw negatives")
    positive = torch.zeros(B, N, dtype=torch.bool, device=sim_t2i.device)
    positive[torch.arange(B), torch.arange(B) + offset] = True
    rows = slice(offset, offset + B)
    g_t2i = gumbel_noise(N, N, 2 * seed, sim_t2i.device)[rows]
    g_i2t = gumbel_noise(N, N, 2 * seed + 1, sim_i2t.device)[rows]
    neg_images = (sim_t2i.float().masked_fill(positive, float("-inf")) + g_t2i).argmax(dim=1)
    neg_texts = (sim_i2t.float().masked_fill(positive, float("-inf")) + g_i2t).argmax(dim=1)
    return neg_images, neg_texts


def itm_loss(logits: Tensor) -> Tensor:
    """logits (3B, 2) for [B positives; B with a negative image; B with a negative text]."""
    B = logits.shape[0] // 3
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
    return F.cross_entropy(logits.float(), labels)


# ---------------------------------------------------------------- ITG and LM
def next_token_loss_sum(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Position t predicts label t + 1. logits (B, T, V), labels (B, T) with IGNORE where no
    loss is wanted -> (summed loss, number of predicted tokens)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum", label_smoothing=label_smoothing)
    return loss, (labels != IGNORE).sum()


def token_mean(loss_sum: Tensor, count: Tensor) -> Tensor:
    """Mean over the global batch's tokens, scaled so that DDP's average of the per-process
    gradients is the gradient of that mean (processes hold different numbers of tokens)."""
    total = dist.all_sum(count.float()).clamp(min=1)
    return loss_sum * dist.world_size() / total


def itg_labels(input_ids: Tensor, attention_mask: Tensor, dec_token_id: int) -> tuple[Tensor, Tensor]:
    """ITG decodes the caption with its first token ([CLS]) replaced by the decoder's start
    token; padding is not predicted. Returns decoder ids and labels, both (B, T)."""
    dec = input_ids.clone()
    dec[:, 0] = dec_token_id
    return dec, dec.masked_fill(attention_mask == 0, IGNORE)


def lm_labels(input_ids: Tensor, attention_mask: Tensor, prompt_lengths: Tensor) -> Tensor:
    """Stage 2: the language model learns the text after the prompt; prompt and padding are masked."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
    hide = (attention_mask == 0) | (positions < prompt_lengths[:, None].to(input_ids.device))
    return input_ids.masked_fill(hide, IGNORE)
