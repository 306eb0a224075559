"""The fast path is the model's own behaviour: prepacked weights whenever it is used for inference.

A model with `InferenceLayout` prepacks its linear layers (`blip2.modeling.packed`) the first
time it runs for inference on CPU (eval mode and no autograd, or any `generate` outside
train mode) and gives them back as the same plain `Parameter`s as soon as it is trained:
`train()`, a forward with gradients, `parameters()`, `.to()`. Nothing to call. The opt-in
choices (int8 / int4 weight-only) are `from_pretrained(..., quantize=...)` (`quantize_model`).
"""

from __future__ import annotations

import torch
from torch import nn

from .packed import pack_linears, packing_available, unpack_linears
from .quant import QUANTIZERS, quantize_language_model


def _autocast_on() -> bool:
    # torch.autocast does not cover the packed op: under autocast the plain layers run.
    return torch.is_autocast_enabled("cpu")


class InferenceLayout(nn.Module):
    """Mixin for the top-level models: packs for inference, unpacks for training, on its own."""

    _packed_layout = False  # whether pack_linears ran since the last unpack
    auto_pack = True  # False keeps plain weights (e.g. to compare against the packed path)
    compiled_parts: tuple[str, ...] = ()  # parts run through torch.compile (inductor cannot take packed weights)

    def fit_layout(self, generating: bool = False) -> None:
        """Packs the linear layers when the model is used for inference on CPU, unpacks them otherwise.

        Called at the start of every forward / generate; `generating` says autograd is off anyway.
        """
        inference = (not self.training and (generating or not torch.is_grad_enabled()) and not _autocast_on()
                     and self.auto_pack and packing_available()
                     and not getattr(self, "hf_device_map", None))  # accelerate's hooks sit on the layers
        if inference and not self._packed_layout:
            pack_linears(self, skip=self.compiled_parts)
            self._packed_layout = True
        elif not inference and self._packed_layout:
            self.plain_layout()

    def plain_layout(self) -> None:
        """Gives every packed layer back as an nn.Linear holding its original Parameters."""
        unpack_linears(self)
        self._packed_layout = False

    def train(self, mode: bool = True):
        if mode and self._packed_layout:
            self.plain_layout()
        return super().train(mode)

    def named_parameters(self, *args, **kwargs):
        # Anyone asking for the parameters (an optimizer, peft, a count) gets all of them, plain.
        if self._packed_layout:
            self.plain_layout()
        return super().named_parameters(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        if self._packed_layout:  # .to() / .cuda() / .half(): convert plain weights; the next use repacks
            self.plain_layout()
        return super()._apply(fn, recurse)

    def first_parameter(self) -> torch.Tensor:
        """A parameter, for the model's dtype and device, without unpacking anything."""
        for module in self.modules():
            for p in module._parameters.values():
                if p is not None:
                    return p
        raise ValueError(f"{type(self).__name__} has no parameters")


def fit_layouts(module: nn.Module, generating: bool = False) -> None:
    """`fit_layout` on every model under `module` (a training objective holding one, say)."""
    for m in module.modules():
        if isinstance(m, InferenceLayout):
            m.fit_layout(generating)


def quantize_model(model: nn.Module, kind: str | None) -> nn.Module:
    """Weight-only quantization of the language model's linear layers: None, "int8" or "int4"."""
    if kind is None:
        return model
    if kind not in QUANTIZERS:
        raise ValueError(f"quantize must be None or one of {sorted(QUANTIZERS)}, got {kind!r}")
    if isinstance(model, InferenceLayout):
        model.plain_layout()
    return quantize_language_model(model, kind)


def optimize_for_inference(model: nn.Module, *, pack: bool = True, quantize: str | None = None,
                           compile: bool = False, batch_hint: int = 8) -> nn.Module:
    """Readies a model for inference on CPU now, in place; returns it.

    Models loaded by `from_pretrained` pack on their own; this remains for plain modules and for
    the opt-in choices.

    Args:
        pack: prepack every linear layer's weight for oneDNN (see `pack_linears`).
        batch_hint: the rows a decoding step mostly has (batch x beams); it picks the packed
            layout, and matters for float32 only, where 1 suits single-sequence decoding best.
        quantize: "int8" or "int4" weight-only language model (`quantize_model`).
        compile: runs the image encoder and the Q-Former through `torch.compile` instead of
            packing them. Each new batch size compiles first; on CPU it gains little over packing.
    """
    model.eval()
    quantize_model(model, quantize)
    compiled = tuple(name for name in ("vision_model", "qformer") if compile and getattr(model, name, None) is not None)
    if isinstance(model, InferenceLayout):
        model.compiled_parts = compiled
        model.auto_pack = pack
    if pack:
        pack_linears(model, batch_hint, skip=compiled)
        if isinstance(model, InferenceLayout):
            model._packed_layout = True
    for name in compiled:
        part = getattr(model, name)
        part.forward = torch.compile(part.forward)
    return model


__all__ = ["InferenceLayout", "fit_layouts", "quantize_model", "optimize_for_inference"]
