"""Pretraining the two frozen halves, in miniature: the image encoder and the language model.

Nothing pretrained is available here, so each is trained on the world's data alone, as the
paper's encoders were trained on theirs before BLIP-2 froze them:
- the image encoder (a ViT) learns to say, for every patch, the colour and the shape of the
  object that covers it, and, from its class token, how many shapes there are, which colours
  and shapes are present and what the background is: supervised, cheap, and it leaves
  object-centred features where the Q-Former will look for them;
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
    """What the image encoder learns to say about a scene.

    patch_colour / patch_shape (P,): the covering object's colour / shape index + 1, 0 for
    background (an object covers a patch when it fills at least a fifth of it);
    count (): shapes - 1; present (colours + shapes,): multi-hot; background (): kind * 2 + dark.
    """
    owners = world.object_map(scene, image_size)  # (S, S)
    grid = image_size // patch
    blocks = owners.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    colours, shapes = list(world.COLOURS), list(world.SHAPES)
    patch_colour = np.zeros(grid * grid, dtype=np.int64)
    patch_shape = np.zeros(grid * grid, dtype=np.int64)
    for k, shape in enumerate(scene.shapes):
        cover = (blocks == k + 1).sum(axis=1)  # (P,)
        best = (cover >= patch * patch / 5) & (cover > _other_cover(blocks, k))
        patch_colour[best] = colours.index(shape.colour) + 1
        patch_shape[best] = shapes.index(shape.shape) + 1
    present = np.zeros(len(colours) + len(shapes), dtype=np.float32)
    for shape in scene.shapes:
        present[colours.index(shape.colour)] = 1
        present[len(colours) + shapes.index(shape.shape)] = 1
    background = world.BACKGROUNDS.index(scene.background) * 2 + int(scene.dark)
    return {
        "patch_colour": patch_colour,
        "patch_shape": patch_shape,
        "count": np.int64(len(scene.shapes) - 1),
        "present": present,
        "background": np.int64(background),
    }


def _other_cover(blocks: np.ndarray, k: int) -> np.ndarray:
    """Per patch, the largest cover of any other object (ties go to neither)."""
    others = [(blocks == j).sum(axis=1) for j in range(1, int(blocks.max()) + 1) if j != k + 1]
    return np.max(others, axis=0) if others else np.zeros(blocks.shape[0], dtype=np.int64)


class VisionPretraining(nn.Module):
    """The image encoder with small heads that are thrown away afterwards."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        D = encoder.config.hidden_size
        n_colours, n_shapes = len(world.COLOURS), len(world.SHAPES)
        self.encoder = encoder
        self.patch_colour = nn.Linear(D, n_colours + 1)
        self.patch_shape = nn.Linear(D, n_shapes + 1)
        self.count = nn.Linear(D, 3)
        self.present = nn.Linear(D, n_colours + n_shapes)
        self.background = nn.Linear(D, 2 * len(world.BACKGROUNDS))

    def forward(self, batch: dict, step: int) -> dict[str, Tensor]:
        states = self.encoder(batch["pixel_values"]).last_hidden_state  # (B, 1 + P, D)
        cls, patches = states[:, 0], states[:, 1:]
        # Shape is asked only where there is a shape, so the many background patches do not drown it.
        shape_labels = batch["patch_shape"].masked_fill(batch["patch_shape"] == 0, IGNORE)
        present = F.binary_cross_entropy_with_logits(self.present(cls), batch["present"], reduction="none")
        known = torch.ones_like(present)
        if "colour_known" in batch:  # gray images: which colours are present is not for telling
            known[:, : len(world.COLOURS)] = batch["colour_known"][:, None].float()
        losses = {
            "colour": F.cross_entropy(self.patch_colour(patches).flatten(0, 1), batch["patch_colour"].flatten(),
                                      ignore_index=IGNORE),
            "shape": F.cross_entropy(self.patch_shape(patches).flatten(0, 1), shape_labels.flatten(),
                                     ignore_index=IGNORE),
            "count": F.cross_entropy(self.count(cls), batch["count"]),
            "present": (present * known).sum() / known.sum(),
            "background": F.cross_entropy(self.background(cls), batch["background"]),
        }
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def patch_accuracy(self, pixel_values: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
        """Per-patch colour and shape accuracy on the patches that show an object."""
        patches = self.encoder(pixel_values).last_hidden_state[:, 1:]
        obj = labels["patch_colour"] > 0
        colour = (self.patch_colour(patches).argmax(-1) == labels["patch_colour"])[obj].float().mean()
        shape = (self.patch_shape(patches).argmax(-1) == labels["patch_shape"])[obj].float().mean()
        return {"patch_colour": colour.item(), "patch_shape": shape.item()}


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
            batch["colour_known"] = torch.from_numpy(~gray)
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
