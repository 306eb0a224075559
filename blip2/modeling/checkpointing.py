"""Activation (gradient) checkpointing for layer stacks: while training, a layer's activations
are recomputed in the backward pass instead of kept, trading compute for memory.

A stack opts in with a class attribute `checkpointing = None`; `gradient_checkpointing_enable`
sets it to the keyword arguments for `torch.utils.checkpoint.checkpoint` on every such stack.
The random state is restored for the recomputation, so dropout masks and gradients are the
same as without checkpointing.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def is_checkpointing(stack) -> bool:
    return stack.checkpointing is not None and stack.training and torch.is_grad_enabled()


def run_layer(stack, layer, *args):
    """layer(*args), through torch's checkpoint when the stack is checkpointing."""
    if is_checkpointing(stack):
        return checkpoint(layer, *args, **{"use_reentrant": False, **stack.checkpointing})
    return layer(*args)
