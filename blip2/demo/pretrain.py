"""Pretraining the two frozen halves, in miniature: the image encoder and the language model.

Nothing pretrained is available here, so each is trained on the world's data alone, as the
paper's encoders were trained on theirs before BLIP-2 froze them:
- the image encoder (a ViT) learns to say, for every patch, the colour and the shape of the
  object that covers it: supervised, cheap, and it leaves object-centred features where the
  Q-Former will look for them;
- the language model (OPT) learns the world's sentences by next-token prediction.

Both are objective modules for `blip2.train.loop.Trainer`: forward(batch, step) -> losses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..train.data import MEAN, STD, pad
from ..train.losses import IGNORE, next_token_loss_sum, token_mean
from . import world

_MEAN = torch.tensor(MEAN)[:, None, None]
_STD = torch.tensor(STD)[:, None, None]


def to_pixels(images: np.ndarray | Tensor) -> Tensor:
    """(B, H, W, 3) uint8, already resized -> (B, 3, H, W) normalised, as the BLIP-2 processor gives."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - _MEAN) / _STD


# ---------------------------------------------------------------- labels for the image encoder
def scene_labels(scene: world.Scene, image_size: int, patch: int) -> dict[str, np.ndarray]:
    """What the image encoder learns to say about a scene: per patch (P,), the colour and the
    shape (index + 1, 0 for background) of the object covering it, which object that is, and
    (P, 2) where that object's centre is (x, y scaled to [-1, 1]; 0 for background).

    An object covers a patch when it fills a fifth of it or a quarter of the object (so that a
    small shape straddling four large patches still gets a label), and more than any other does.
    """
    owners = world.object_map(scene, image_size)  # (S, S)
    grid = image_size // patch
    blocks = owners.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    colours, shapes = list(world.COLOURS), list(world.SHAPES)
    labels = {name: np.zeros(grid * grid, dtype=np.int64) for name in ("patch_colour", "patch_shape", "patch_object")}
    labels["patch_where"] = np.zeros((grid * grid, 2), dtype=np.float32)
    for k, shape in enumerate(scene.shapes):
        cover = (blocks == k + 1).sum(axis=1)  # (P,)
        enough = min(patch * patch / 5, cover.sum() / 4)
        best = (cover >= enough) & (cover > 0) & (cover > _other_cover(blocks, k))
        labels["patch_colour"][best] = colours.index(shape.colour) + 1
        labels["patch_shape"][best] = shapes.index(shape.shape) + 1
        labels["patch_object"][best] = k + 1
        ys, xs = np.nonzero(owners == k + 1)
        if len(xs):  # the centre as drawn (after any rotation of the whole image)
            labels["patch_where"][best] = np.array([xs.mean(), ys.mean()]) * 2 / (image_size - 1) - 1
    return labels


def _other_cover(blocks: np.ndarray, k: int) -> np.ndarray:
    """Per patch, the largest cover of any other object (ties go to neither)."""
    others = [(blocks == j).sum(axis=1) for j in range(1, int(blocks.max()) + 1) if j != k + 1]
    return np.max(others, axis=0) if others else np.zeros(blocks.shape[0], dtype=np.int64)


class VisionPretraining(nn.Module):
    """The image encoder with per-patch heads that are thrown away afterwards.

    Per patch: colour, shape, where the shape's centre is, and its rank from the left (first,
    second, third), the order in which captions list the shapes. Without the centre, position
    faded from the output (a linear read-out explained 27% of the variance of the shape's x) and
    captions of several shapes named one of them over and over. Without the rank, a Q-Former
    trained directly to name the k-th shape from the left got 31% of three-shape scenes right after
    3000 steps, with it 57%; its stage-2 captions went from 37% to 61.5% on new images (24.5% to
    37% on held-out pairs). Heads on the class token (count, which colours and shapes are present,
    the background) made the shape head learn several times slower (held-out patches 43% against
    65% after 1000 steps), as the easy tasks took over the shared layers, so there are none.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        D = encoder.config.hidden_size
        self.encoder = encoder
        self.patch_colour = nn.Linear(D, len(world.COLOURS) + 1)
        self.patch_shape = nn.Linear(D, len(world.SHAPES) + 1)
        self.patch_where = nn.Linear(D, 2)
        self.patch_rank = nn.Linear(D, 3)

    def forward(self, batch: dict, step: int) -> dict[str, Tensor]:
        patches = self.encoder(batch["pixel_values"]).last_hidden_state[:, 1:]  # (B, P, D)
        # Shape is asked only where there is a shape, so the many background patches do not drown it.
        shape_labels = batch["patch_shape"].masked_fill(batch["patch_shape"] == 0, IGNORE)
        losses = {
            "colour": F.cross_entropy(self.patch_colour(patches).flatten(0, 1), batch["patch_colour"].flatten(),
                                      ignore_index=IGNORE),
            "shape": F.cross_entropy(self.patch_shape(patches).flatten(0, 1), shape_labels.flatten(),
                                     ignore_index=IGNORE),
            "where": _masked_mse(self.patch_where(patches), batch["patch_where"], batch["patch_object"] > 0),
            "rank": F.cross_entropy(self.patch_rank(patches).flatten(0, 1), (batch["patch_object"] - 1).flatten(),
                                    ignore_index=-1),
        }
        losses["loss"] = losses["colour"] + losses["shape"] + losses["where"] + losses["rank"]
        return losses

    @torch.no_grad()
    def patch_accuracy(self, pixel_values: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
        """Colour and shape accuracy on the patches that show an object, and per object the shape
        its patches vote for (summed log-probabilities), as the Q-Former can pool them."""
        patches = self.encoder(pixel_values).last_hidden_state[:, 1:]
        obj = labels["patch_colour"] > 0
        colour = (self.patch_colour(patches).argmax(-1) == labels["patch_colour"])[obj].float().mean()
        logp = self.patch_shape(patches).log_softmax(-1)  # (B, P, S + 1)
        shape = (logp.argmax(-1) == labels["patch_shape"])[obj].float().mean()
        right = total = 0
        for k in range(1, int(labels["patch_object"].max()) + 1):
            own = labels["patch_object"] == k  # (B, P)
            has = own.any(-1)
            votes = (logp * own[..., None]).sum(1).argmax(-1)  # (B,)
            truth = (labels["patch_shape"] * own).amax(-1)
            right += (votes == truth)[has].sum().item()
            total += has.sum().item()
        where = self.patch_where(patches)[obj] - labels["patch_where"][obj]  # (N, 2)
        rank = (self.patch_rank(patches).argmax(-1) == labels["patch_object"] - 1)[labels["patch_object"] > 0]
        return {"patch_colour": colour.item(), "patch_shape": shape.item(), "object_shape": right / max(1, total),
                "patch_rank": rank.float().mean().item(),
                "where_px": where.norm(dim=-1).mean().item() * 31.5}  # mean error, pixels of 64


def _masked_mse(pred: Tensor, target: Tensor, keep: Tensor) -> Tensor:
    """Mean squared error over the (B, P) positions where keep is true; pred, target (B, P, 2)."""
    return ((pred - target) ** 2).sum(-1)[keep].mean() if keep.any() else pred.sum() * 0


class LabelledImages(Dataset):
    """Rendered images (N, S, S, 3) uint8 and their labels, for the image encoder."""

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> int:
        return i

    def __init__(self, images: np.ndarray, labels: list[dict], grayscale: float = 0.0, seed: int = 0) -> None:
        self.images, self.labels, self.grayscale = images, labels, grayscale
        self.rng = np.random.default_rng(seed)

    def collate(self, index: list[int]) -> dict[str, Tensor]:
        batch = stack_labels([self.labels[i] for i in index])
        images = self.images[index]
        gray = self.rng.random(len(index)) < self.grayscale
        if gray.any():
            images = images.copy()
            images[gray] = as_grayscale(images[gray])
            batch["patch_colour"][torch.from_numpy(gray)] = IGNORE  # no colour to tell
        batch["pixel_values"] = to_pixels(images)
        return batch


def as_grayscale(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the same in gray (ITU-R 601 luma, as Pillow's "L" mode)."""
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat(luma.round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def stack_labels(labels: list[dict]) -> dict[str, Tensor]:
    return {k: torch.as_tensor(np.stack([lab[k] for lab in labels])) for k in labels[0]}


# ---------------------------------------------------------------- the language model
class TextPretraining(nn.Module):
    """Next-token prediction over right-padded text (the first token, BOS, is never predicted)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict, step: int) -> dict[str, Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.lm(self.lm.embed(ids), mask).logits  # (B, T, V)
        loss = token_mean(*next_token_loss_sum(logits, ids.masked_fill(mask == 0, IGNORE)))
        return {"lm": loss, "loss": loss}


def pack(lines: list[list[int]], length: int) -> list[list[int]]:
    """Lines joined end to end and cut into sequences of `length` tokens, as language models are
    pretrained: every position gets trained, and text that follows other text is the normal case
    (in BLIP-2 the text follows the image's query embeddings)."""
    stream = [t for line in lines for t in line]
    return [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]


class TokenLines(Dataset):
    """Token-id lists, padded into batches."""

    def __init__(self, lines: list[list[int]], pad_id: int, max_len: int) -> None:
        self.lines, self.pad_id, self.max_len = lines, pad_id, max_len

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> list[int]:
        return self.lines[i]

    def collate(self, items: list[list[int]]) -> dict[str, Tensor]:
        ids, mask = pad(items, self.pad_id, self.max_len)
        return {"input_ids": ids, "attention_mask": mask}
