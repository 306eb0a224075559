"""InstructBLIP (Dai et al., 2023): BLIP-2 whose Q-Former also reads the instruction.

The only new part is the Q-Former's text input: BERT word and position embeddings for the
instruction tokens, which sit beside the learned queries in every self-attention. Queries
alone cross-attend to the image and use the query feed-forward; instruction tokens use the
text feed-forward (`QFormer.forward_joint`). Everything else is BLIP-2's composition.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blip2 import Blip2, pack_padding
from .qformer import QFormer, QFormerOutput, TextEmbeddings


class InstructQFormer(QFormer):
    """The BLIP-2 Q-Former stack plus the instruction's embeddings (a composed part).

    Its config must build the text feed-forwards (`use_qformer_text_input`, always on for
    InstructBlipQFormerConfig).
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.embeddings = TextEmbeddings(cfg)

    def forward(self, queries: Tensor | None, input_ids: Tensor | None, attention_mask: Tensor | None = None,
                image: Tensor | None = None, image_mask: Tensor | None = None,
                need_hidden: bool = False, need_weights: bool = False,
                position_ids: Tensor | None = None) -> QFormerOutput:
        """queries (B, Q, D) and instruction ids (B, T), either may be None -> outputs over Q + T tokens.

        attention_mask (B, Q + T) is a 1/0 keep-mask over both; image (B, N, Dv) for cross-attention.
        """
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            text = self.embeddings(input_ids, position_ids)  # (B, T, D): positions 0..T-1 (instructions are right-padded)
            parts.append(text.to(queries.dtype) if queries is not None else text)
        if not parts:
            raise ValueError("the Q-Former needs query embeddings, instruction ids, or both")
        embeds = torch.cat(parts, dim=1)  # (B, Q + T, D)
        num_queries = 0 if queries is None else queries.shape[1]
        return self.forward_joint(embeds, num_queries, attention_mask, image, image_mask,
                                  need_hidden=need_hidden, need_weights=need_weights)


class InstructBlip(Blip2):
    """BLIP-2's composition with the instruction-reading Q-Former."""

    qformer_class = InstructQFormer

    def check_instruction(self, qformer_input_ids, qformer_attention_mask, images: int) -> tuple[Tensor, Tensor]:
        """The instruction's ids and keep-mask, checked against the images; a missing mask is all ones."""
        if qformer_input_ids is None:
            raise ValueError(
                "InstructBLIP's Q-Former reads the instruction: pass qformer_input_ids "
                "(InstructBlipProcessor makes them from the text, with qformer_attention_mask)"
            )
        ids = qformer_input_ids
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.dim() != 2:
            raise ValueError(
                f"qformer_input_ids must be an integer tensor of shape (batch, length), got "
                f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}"
            )
        if ids.shape[0] != images:
            raise ValueError(
                f"the instruction batch does not match the images: {ids.shape[0]} rows of qformer_input_ids "
                f"for {images} images (one instruction per image)"
            )
        vocab = self.config.qformer_config.vocab_size
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            bad = ids[(ids < 0) | (ids >= vocab)][0].item()
            raise ValueError(f"qformer_input_ids contain token id {bad}, outside the Q-Former's vocabulary [0, {vocab})")
        mask = torch.ones_like(ids) if qformer_attention_mask is None else qformer_attention_mask
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(
                f"qformer_attention_mask has shape {tuple(mask.shape)} but qformer_input_ids {tuple(ids.shape)}"
            )
        return ids, mask

    def query_features(self, image_embeds: Tensor, need_hidden: bool = False, need_weights: bool = False, *,
                       qformer_input_ids: Tensor | None = None,
                       qformer_attention_mask: Tensor | None = None) -> QFormerOutput:
        """image (B, N, Dv) and the instruction (B, T) -> Q-Former outputs over Q + T tokens
        (the first Q are the queries the language model reads)."""
        B = image_embeds.shape[0]
        ids, mask = self.check_instruction(qformer_input_ids, qformer_attention_mask, B)
        # Instruction positions count from 0 over every column: padding goes at the end, where it
        # shifts no instruction token (a left-padded instruction gives what it gives alone).
        ids, mask = pack_padding(ids, mask, pad_first=False)
        queries = self.query_tokens.expand(B, -1, -1)  # (B, Q, Dq)
        mask = torch.cat([mask.new_ones(B, queries.shape[1]), mask], dim=1)  # (B, Q + T)
        return self.qformer(queries, ids, mask, image_embeds, need_hidden=need_hidden, need_weights=need_weights)


class InstructBlipVideo(InstructBlip):
    """InstructBLIP over videos: each frame goes through the image path (the image encoder, then
    the Q-Former with the instruction) on its own, and the frames' query outputs are joined in
    order, frames x Q soft tokens for the language model. No weights of its own."""

    def check_pixel_values(self, pixel_values, interpolate_pos_encoding: bool = False) -> None:
        if isinstance(pixel_values, Tensor) and pixel_values.dim() == 5:
            pixel_values = pixel_values.flatten(0, 1)  # (B * F, 3, H, W): each frame is an image
        super().check_pixel_values(pixel_values, interpolate_pos_encoding)

    def language_inputs(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False, **query_inputs) -> Tensor:
        """(B, F, 3, H, W) frames and the instruction (B, T) -> (B, F * Q, D_lm)."""
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 5:
            raise ValueError(
                "video pixel_values must have shape (batch, frames, 3, height, width), got "
                f"{tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__}"
            )
        B, F = pixel_values.shape[:2]
        # Every frame reads its video's instruction; rows b*F .. b*F+F-1 are video b's frames.
        instruction = {k: v.repeat_interleave(F, dim=0) if isinstance(v, Tensor) and v.shape[0] == B else v
                       for k, v in query_inputs.items()}
        per_frame = super().language_inputs(pixel_values.flatten(0, 1), interpolate_pos_encoding, **instruction)
        return per_frame.reshape(B, F * per_frame.shape[1], per_frame.shape[2])  # (B, F * Q, D): frames in order
