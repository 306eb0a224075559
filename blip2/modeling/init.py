"""Fresh weights drawn by the reference's rules (transformers 4.37.2's `_init_weights`), so that
training from scratch starts where the reference starts.

BLIP-2's own parts: linear, convolution and embedding weights ~ N(0, initializer_range), biases
0, layer norms 1 and 0; the image encoder's class and position embeddings ~ truncated
N(0, initializer_range). Each part reads its own config's initializer_range (the reference builds
the image encoder and the Q-Former as models of their own, which draw their weights first): the
image encoder the vision config's (1e-10 by default), the Q-Former the Q-Former config's, the rest
(projections, heads, text embeddings) the top config's. The query tokens stay zero (4.37 does not
draw them). The language model draws its own weights by its family's rules (its `init_weights_`
method), as the reference's language models do.

Everything goes through `torch.nn.init`, so a model built on the meta device for loading
(`checkpoint.build_on_meta`, which makes those functions no-ops) draws nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from .vision import VisionEmbeddings


@torch.no_grad()
def init_parts_(module: nn.Module, std: float, embed_std: float) -> None:
    """BLIP-2's rule over every submodule of `module` (embed_std: the image encoder's class and
    position embeddings)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, VisionEmbeddings):
            nn.init.trunc_normal_(m.position_embedding, 0.0, embed_std)
            nn.init.trunc_normal_(m.class_embedding, 0.0, embed_std)


# Child module -> the sub-config whose initializer_range it is drawn with.
PART_CONFIGS = {"vision_model": "vision_config", "qformer": "qformer_config"}


@torch.no_grad()
def init_model_(model: nn.Module, config) -> None:
    """A documented model's fresh weights: `config` is its own config (Blip2Config, or the vision
    or Q-Former config of a standalone part)."""
    for name, child in model.named_children():
        if name == "language_model":
            init = getattr(child, "init_weights_", None)
            if init is not None:
                init()
            continue
        part = getattr(config, PART_CONFIGS.get(name, ""), None) or config
        init_parts_(child, part.initializer_range, part.initializer_range)


@torch.no_grad()
def init_normal_lm_(lm: nn.Module, std: float) -> None:
    """The rule OPT and Llama share: linear and embedding weights ~ N(0, std), biases and the
    padding row 0; a head tied to the embeddings is drawn once, as the embeddings."""
    tied = lm.config.tie_word_embeddings
    for m in lm.modules():
        if isinstance(m, nn.Linear) and not (m is lm.lm_head and tied):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])


@torch.no_grad()
def normal_rows_(weight: torch.Tensor, stds: list[tuple[int, float]]) -> None:
    """Draws consecutive row blocks of a fused weight, each with its own std: [(rows, std), ...]."""
    start = 0
    for rows, std in stds:
        nn.init.normal_(weight[start : start + rows], 0.0, std)
        start += rows
