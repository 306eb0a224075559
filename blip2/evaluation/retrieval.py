"""Image-text retrieval recall from a similarity matrix, both directions, as the papers report it.

An image may have several captions: image-to-text retrieval counts a hit when any of the image's
captions ranks within the top k; text-to-image when the caption's own image does.
"""

from __future__ import annotations

import torch
from torch import Tensor

KS = (1, 5, 10)


def recall_at_k(similarity: Tensor, text_image: list[int], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """similarity: (images, texts); text_image[t] is the index of text t's image.

    Returns {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "mean_recall"} as fractions.
    """
    images, texts = similarity.shape
    if len(text_image) != texts:
        raise ValueError(f"{len(text_image)} image indices for {texts} texts")
    owner = torch.as_tensor(text_image)
    truth = owner[None, :] == torch.arange(images)[:, None]  # (images, texts): text t describes image i
    if not bool(truth.any(dim=1).all()):
        raise ValueError("every image needs at least one text")
    sim = similarity.float()
    # rank of the best true text for each image: how many texts score higher than it
    best_true = sim.masked_fill(~truth, float("-inf")).max(dim=1).values  # (images,)
    i2t_rank = (sim > best_true[:, None]).sum(dim=1)  # (images,)
    true_score = sim[owner, torch.arange(texts)]  # (texts,)
    t2i_rank = (sim > true_score[None, :]).sum(dim=0)  # (texts,)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out
