"""Frozen parts, frozen for real, and a cache of what the frozen image encoder computes.

BLIP-2 trains only the Q-Former (and, as the paper's code does, the image encoder's final
LayerNorm, `ln_vision`, which is our `vision_model.post_layernorm`). The image encoder runs
without autograd, so none of its activations are kept; its output for an image never changes,
so it can be cached across epochs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from ..io import atomic_write


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode (no dropout); `keep_frozen_in_eval` keeps it so under .train()."""
    module.requires_grad_(False)
    module.eval()
    return module


def keep_frozen_in_eval(frozen: list[nn.Module]) -> None:
    """Puts the frozen modules back in eval mode; call after every .train()."""
    for module in frozen:
        module.eval()


class FeatureCache:
    """Image-encoder features by image key, in memory and, given a folder, on disk.

    Only valid when the image transform is deterministic (no random augmentation) and the
    encoder is frozen: both hold for BLIP-2 as trained here.
    """

    def __init__(self, directory: str | Path | None = None, dtype: torch.dtype | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.dtype = dtype
        self.memory: dict[str, Tensor] = {}

    def _file(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"

    def get(self, key: str) -> Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if self.directory is not None and self._file(key).is_file():
            from ..checkpoint import safe_torch_load

            self.memory[key] = safe_torch_load(self._file(key), "feature cache file")
            return self.memory[key]
        return None

    def put(self, key: str, features: Tensor) -> None:
        features = features.detach().to("cpu", self.dtype or features.dtype).clone()
        self.memory[key] = features
        if self.directory is not None:
            atomic_write(self._file(key), lambda tmp: torch.save(features, tmp))

    def __len__(self) -> int:
        return len(self.memory)


@torch.no_grad()
def _encoder_blocks(vision, pixel_values: Tensor) -> Tensor:
    """The ViT up to (not including) its final LayerNorm: (B, 3, H, W) -> (B, N, Dv)."""
    return vision(pixel_values, need_hidden=True).hidden_states[-1]  # the last block's output


def image_features(vision, pixel_values: Tensor, keys: list[str] | None = None,
                   cache: FeatureCache | None = None) -> Tensor:
    """Frozen ViT blocks (cached when possible), then the final LayerNorm, which trains when its
    parameters require grad. (B, 3, H, W) -> (B, N, Dv)."""
    if cache is None or keys is None:
        return vision.post_layernorm(_encoder_blocks(vision, pixel_values))
    found = [cache.get(k) for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        fresh = _encoder_blocks(vision, pixel_values[missing])
        for i, features in zip(missing, fresh):
            cache.put(keys[i], features)
            found[i] = features
    device, dtype = pixel_values.device, vision.post_layernorm.weight.dtype
    blocks = torch.stack([f.to(device, dtype) for f in found])
    return vision.post_layernorm(blocks)
