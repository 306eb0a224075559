"""Image-text retrieval with the Q-Former (newer transformers releases; Salesforce/blip2-itm-vit-g).

Two ways to score an image against a text, both from the paper's stage 1:
- ITC: the queries' outputs and the text's [CLS] output, each projected and L2-normalised;
  the score is the best cosine similarity over the queries (fast: embed once, compare many).
- ITM: queries and text attend to each other in one pass; a linear head on each query,
  averaged, says "match" or "no match" (slower, more precise: used to re-rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Blip2Config
from .hf_compat import PreTrainedModel, qformer_output, vision_output
from .keymap import KeyTable, retrieval_table, text_with_projection_table, vision_with_projection_table
from .modeling.blip2 import check_pixel_values
from .modeling.qformer import QFormer, QFormerOutput, TextEmbeddings
from .modeling.vision import VisionEncoder, VisionOutput
from .outputs import ModelOutput

OptionalTensor = Tensor | None  # output fields (not `T`, which is a sequence length elsewhere)


@dataclass
class Blip2ImageTextMatchingModelOutput(ModelOutput):
    loss: OptionalTensor = None
    logits_per_image: OptionalTensor = None  # ITM: (B, 2); ITC: (B_images, B_texts)
    logits_per_text: OptionalTensor = None
    text_embeds: OptionalTensor = None  # ITM: the joint hidden states; ITC: (B_texts, E)
    image_embeds: OptionalTensor = None  # ITM: the image encoder's output; ITC: (B_images, Q, E)
    text_model_output: Any = None
    vision_model_output: Any = None


@dataclass
class Blip2TextModelOutput(ModelOutput):
    text_embeds: OptionalTensor = None  # (B, T, E), every position projected and normalised
    last_hidden_state: OptionalTensor = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class Blip2VisionModelOutput(ModelOutput):
    image_embeds: OptionalTensor = None  # (B, Q, E)
    last_hidden_state: OptionalTensor = None  # the image encoder's
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def _linear_in_own_dtype(layer: nn.Linear, x: Tensor) -> Tensor:
    """The Q-Former may be float32 in a float16 model; heads take its outputs in their dtype."""
    return layer(x.to(layer.weight.dtype))


def _check_text_input(config: Blip2Config) -> None:
    if not config.qformer_config.use_qformer_text_input:
        raise ValueError(
            "retrieval models need qformer_config.use_qformer_text_input=True "
            "(the Q-Former's text embeddings and text feed-forward)"
        )


class _RetrievalBase(PreTrainedModel):
    """The pieces the retrieval classes share; each subclass builds only the parts it has."""

    config_class = Blip2Config
    # As the reference does: loaded in float16, the Q-Former and its queries stay float32.
    keep_in_fp32 = ("query_tokens", "qformer")
    _keep_in_fp32_modules = list(keep_in_fp32)

    def set_input_embeddings(self, value: nn.Module) -> None:
        if not hasattr(self, "embeddings"):
            super().set_input_embeddings(value)
        self.embeddings.word = value

    def _set_vocab_size(self, n: int) -> None:
        self.config.qformer_config.vocab_size = n

    def _query_tokens(self, config: Blip2Config) -> None:
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))

    def image_queries(self, image_embeds: Tensor, use_cache: bool = False, need_hidden: bool = False,
                      need_weights: bool = False) -> QFormerOutput:
        """(B, N, Dv) image features -> the queries' outputs (B, Q, D)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        image = image_embeds.to(queries.dtype)
        return self.qformer(queries, image, use_cache=use_cache, need_hidden=need_hidden, need_weights=need_weights)

    def text_states(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None,
                    need_hidden: bool = False, need_weights: bool = False) -> QFormerOutput:
        """The text encoder: (B, T) ids -> (B, T, D), bidirectional over the unpadded tokens."""
        embeds = self.embeddings(input_ids, position_ids).to(self.query_tokens.dtype)
        return self.qformer.forward_joint(embeds, 0, attention_mask, need_hidden=need_hidden, need_weights=need_weights)

    def _drop_image_tokens(self, input_ids: Tensor, attention_mask: Tensor | None):
        """Newer processors put Q image tokens before the text; the Q-Former reads only the text."""
        Q = self.config.num_query_tokens
        if self.config.image_token_index is None:
            return input_ids, attention_mask
        return input_ids[:, Q:], attention_mask[:, Q:] if attention_mask is not None else None


class Blip2ForImageTextRetrieval(_RetrievalBase):
    """BLIP-2 for image-text retrieval: ITM logits or ITC similarities (no language model)."""

    main_input_name = "pixel_values"

    def __init__(self, config: Blip2Config) -> None:
        super().__init__()
        _check_text_input(config)
        self.config = config
        qf = config.qformer_config
        self.vision_model = VisionEncoder(config.vision_config)
        self._query_tokens(config)
        self.embeddings = TextEmbeddings(qf)
        self.qformer = QFormer(qf)
        self.vision_projection = nn.Linear(qf.hidden_size, config.image_text_hidden_size)
        self.text_projection = nn.Linear(qf.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(qf.hidden_size, 2)
        self.init_weights()

    def key_table(self) -> KeyTable:
        return retrieval_table(self.config)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word

    # ---- the two scores, as tensors (training uses these too) ----
    def image_embeds(self, query_states: Tensor) -> Tensor:
        """(B, Q, D) query outputs -> (B, Q, E) normalised ITC image embeddings."""
        return F.normalize(_linear_in_own_dtype(self.vision_projection, query_states), dim=-1)

    def text_embeds(self, text_states: Tensor) -> Tensor:
        """(B, T, D) text outputs -> (B, E): the [CLS] position, projected and normalised."""
        return F.normalize(_linear_in_own_dtype(self.text_projection, text_states[:, 0, :]), dim=-1)

    def itm_states(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor,
                   need_hidden: bool = False, need_weights: bool = False) -> QFormerOutput:
        """Queries and text in one pass over [queries; text] (B, Q + T, D).

        attention_mask covers the queries too: (B, Q + T).
        """
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, D)
        embeds = torch.cat([queries, self.embeddings(input_ids).to(queries.dtype)], dim=1)
        image = image_embeds.to(queries.dtype)
        return self.qformer.forward_joint(embeds, queries.shape[1], attention_mask, image,
                                          need_hidden=need_hidden, need_weights=need_weights)

    def itm_logits(self, joint_states: Tensor) -> Tensor:
        """(B, Q + T, D) -> (B, 2): the head on each query output, averaged over the queries."""
        Q = self.config.num_query_tokens
        return _linear_in_own_dtype(self.itm_head, joint_states[:, :Q, :]).mean(dim=1)

    # ---- the reference's calling convention ----
    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                use_image_text_matching_head: bool = False, output_attentions=None,
                output_hidden_states=None, return_dict=None, interpolate_pos_encoding: bool = False):
        """ITM (`use_image_text_matching_head=True`): image i against text i, logits (B, 2).
        ITC (default): every image against every text, cosine similarities (B_images, B_texts)."""
        attn, hidden, as_dict = self._flags(output_attentions, output_hidden_states, return_dict)
        check_pixel_values(pixel_values, self.config.vision_config, interpolate_pos_encoding)
        self.fit_layout()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vis: VisionOutput = self.vision_model(pixel_values, interpolate_pos_encoding, hidden, attn)
        image = vis.last_hidden_state
        if use_image_text_matching_head:
            result = self._itm(image, input_ids, attention_mask, hidden, attn)
        else:
            result = self._itc(image, input_ids, attention_mask, hidden, attn)
        result.vision_model_output = vision_output(vis, True)
        return result if as_dict else result.to_tuple()

    def _itm(self, image, input_ids, attention_mask, hidden, attn) -> Blip2ImageTextMatchingModelOutput:
        if input_ids.shape[0] != image.shape[0]:
            raise ValueError(f"ITM scores image i with text i: {image.shape[0]} images, {input_ids.shape[0]} texts")
        Q = self.config.num_query_tokens
        if self.config.image_token_index is not None:
            input_ids = input_ids[:, Q:]  # the image tokens' mask entries stand for the queries
        else:
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], Q), attention_mask], dim=1)
        out = self.itm_states(image, input_ids, attention_mask, hidden, attn)
        logits = self.itm_logits(out.last_hidden_state)
        return Blip2ImageTextMatchingModelOutput(
            logits_per_image=logits, logits_per_text=logits.t(), text_embeds=out.last_hidden_state,
            image_embeds=image, text_model_output=qformer_output(out, True),
        )

    def _itc(self, image, input_ids, attention_mask, hidden, attn) -> Blip2ImageTextMatchingModelOutput:
        query_states = self.image_queries(image).last_hidden_state
        input_ids, attention_mask = self._drop_image_tokens(input_ids, attention_mask)
        out = self.text_states(input_ids, attention_mask, need_hidden=hidden, need_weights=attn)
        image_embeds = self.image_embeds(query_states)  # (Bi, Q, E)
        text_embeds = self.text_embeds(out.last_hidden_state)  # (Bt, E)
        sims = torch.einsum("iqe,te->iqt", image_embeds, text_embeds)  # (Bi, Q, Bt)
        logits = sims.max(dim=1).values  # (Bi, Bt): the best query for each pair
        return Blip2ImageTextMatchingModelOutput(
            logits_per_image=logits, logits_per_text=logits.t(), text_embeds=text_embeds,
            image_embeds=image_embeds, text_model_output=qformer_output(out, True),
        )


class Blip2TextModelWithProjection(_RetrievalBase):
    """The Q-Former as a text encoder: normalised ITC embeddings for every text position."""

    main_input_name = "input_ids"

    def __init__(self, config: Blip2Config) -> None:
        super().__init__()
        _check_text_input(config)
        self.config = config
        self._query_tokens(config)
        self.embeddings = TextEmbeddings(config.qformer_config)
        self.qformer = QFormer(config.qformer_config)
        self.text_projection = nn.Linear(config.qformer_config.hidden_size, config.image_text_hidden_size)
        self.init_weights()

    def key_table(self) -> KeyTable:
        return text_with_projection_table(self.config)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        attn, hidden, as_dict = self._flags(output_attentions, output_hidden_states, return_dict)
        self.fit_layout()
        out = self.text_states(input_ids, attention_mask, position_ids, hidden, attn)
        embeds = F.normalize(_linear_in_own_dtype(self.text_projection, out.last_hidden_state), dim=-1)  # (B, T, E)
        result = Blip2TextModelOutput(embeds, out.last_hidden_state, out.hidden_states, out.attentions)
        return result if as_dict else result.to_tuple()


class Blip2VisionModelWithProjection(_RetrievalBase):
    """Image encoder and queries: normalised ITC embeddings, one per query."""

    main_input_name = "pixel_values"

    def __init__(self, config: Blip2Config) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionEncoder(config.vision_config)
        self._query_tokens(config)
        self.qformer = QFormer(config.qformer_config)
        self.vision_projection = nn.Linear(config.qformer_config.hidden_size, config.image_text_hidden_size)
        self.init_weights()

    def key_table(self) -> KeyTable:
        return vision_with_projection_table(self.config)

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def forward(self, pixel_values: Tensor, output_attentions=None, output_hidden_states=None, return_dict=None,
                interpolate_pos_encoding: bool = False):
        attn, hidden, as_dict = self._flags(output_attentions, output_hidden_states, return_dict)
        check_pixel_values(pixel_values, self.config.vision_config, interpolate_pos_encoding)
        self.fit_layout()
        vis = self.vision_model(pixel_values, interpolate_pos_encoding, hidden, attn)
        queries = self.image_queries(vis.last_hidden_state).last_hidden_state
        embeds = F.normalize(_linear_in_own_dtype(self.vision_projection, queries), dim=-1)  # (B, Q, E)
        result = Blip2VisionModelOutput(embeds, vis.last_hidden_state, vis.hidden_states, vis.attentions)
        return result if as_dict else result.to_tuple()


__all__ = [
    "Blip2ForImageTextRetrieval",
    "Blip2TextModelWithProjection",
    "Blip2VisionModelWithProjection",
    "Blip2ImageTextMatchingModelOutput",
    "Blip2TextModelOutput",
    "Blip2VisionModelOutput",
]
