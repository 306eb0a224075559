"""Stage 1: vision-language representation learning with a frozen image encoder.

The Q-Former learns three objectives at once (the paper's section 3.2), each with its own
attention mask over [queries; text]:
- ITC: queries and text apart (unimodal): contrast each image's best query with the text's [CLS].
- ITM: queries and text see each other (bidirectional): binary match on hard negatives.
- ITG: queries see queries, text sees the queries and earlier text (multimodal causal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..config import Blip2Config
from ..hf_compat import HUB_KWARGS, checkpoint_dir
from ..keymap import KeyTable, Rule, itg_head_rules, retrieval_table, training_only_keys
from ..modeling.qformer import TextLMHead, multimodal_causal_mask
from ..retrieval import Blip2ForImageTextRetrieval
from . import distributed as dist
from .frozen import FeatureCache, freeze, image_features, keep_frozen_in_eval
from .losses import (
    hard_negatives,
    itc_loss,
    itc_similarities,
    itg_labels,
    itm_loss,
    next_token_loss_sum,
    token_mean,
)

INITIAL_TEMPERATURE = 0.07
TEMPERATURE_RANGE = (0.001, 0.5)  # the paper's code clamps the learned temperature to this


class Blip2ForQFormerPretraining(Blip2ForImageTextRetrieval):
    """The retrieval model plus what only stage-1 training needs: the ITG head (BERT's LM
    head on the Q-Former's text side, tied to its word embeddings) and the ITC temperature.

    Saved checkpoints are retrieval checkpoints with `itg_head.*` and `temp` added; the
    retrieval classes (ours and the reference) load them and leave those out. Loading a
    reference retrieval checkpoint here starts a fresh head and temperature.
    """

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        self.itg_head = TextLMHead(config.qformer_config)
        self.temp = nn.Parameter(torch.tensor(INITIAL_TEMPERATURE))

    def key_table(self) -> KeyTable:
        return KeyTable([*retrieval_table(self.config).rules, *itg_head_rules(), Rule("temp", ("temp",))], {})

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """Any retrieval checkpoint: with the stage-1 extras (ours) or without (the reference's)."""
        hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        folder = checkpoint_dir(name_or_path, **hub)
        keys = set(ckpt.read_state_dict(ckpt.find_weights(folder)))
        if keys & set(training_only_keys()):
            return super().from_pretrained(name_or_path, **kwargs)  # strict over everything
        base = Blip2ForImageTextRetrieval.from_pretrained(name_or_path, **kwargs)
        model = cls(base.config)
        init_stage1_extras_(model, base.config.qformer_config.initializer_range)
        model.to(base.device, base.dtype)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        fresh = set(training_only_keys().values())
        if set(missing) != fresh or unexpected:
            raise ckpt.CheckpointError(f"{folder}: missing {sorted(set(missing) - fresh)}, unexpected {unexpected}")
        return model.eval()

    def itg_logits(self, query_cache: tuple, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The text decoded against the queries' cached keys and values -> logits (B, T, V).

        The same numbers as one pass over [queries; text] under `multimodal_causal_mask`: the
        queries never see the text, so their keys and values are those of the image pass.
        """
        Q = self.config.num_query_tokens
        keep = multimodal_causal_mask(Q, attention_mask)[:, Q:]  # (B, T, Q + T): the text rows
        out = self.qformer.forward_joint(self.embeddings(input_ids), 0, keep, past=query_cache)
        return self.itg_head(out.last_hidden_state, self.embeddings.word.weight)


@torch.no_grad()
def init_stage1_extras_(model: Blip2ForQFormerPretraining, std: float = 0.02) -> None:
    init_bert_(model.itg_head, std)
    model.temp.fill_(INITIAL_TEMPERATURE)


@torch.no_grad()
def init_bert_(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
    if isinstance(module, TextLMHead):
        module.bias.zero_()


@torch.no_grad()
def init_qformer_(model: Blip2ForQFormerPretraining, std: float | None = None) -> None:
    """Fresh trainable parts for a run from scratch (the image encoder is left as loaded)."""
    std = model.config.qformer_config.initializer_range if std is None else std
    for part in (model.embeddings, model.qformer, model.vision_projection, model.text_projection, model.itm_head):
        init_bert_(part, std)
    model.query_tokens.normal_(0.0, std)  # zeros would make every query the same forever
    init_stage1_extras_(model, std)


@dataclass
class Stage1Weights:
    """How much each loss counts; 0 switches a loss off (and freezes what only it trains)."""

    itc: float = 1.0
    itm: float = 1.0
    itg: float = 1.0


class Stage1Objective(nn.Module):
    """forward(batch, step) -> {"itc", "itm", "itg", "loss"}: the module DDP wraps.

    batch: pixel_values (B, 3, H, W), input_ids / attention_mask (B, T) starting with [CLS],
    and optionally keys (B image keys, for the feature cache).
    """

    def __init__(self, model: Blip2ForQFormerPretraining, weights: Stage1Weights | None = None,
                 dec_token_id: int = 1, label_smoothing: float = 0.1, seed: int = 0,
                 feature_cache: FeatureCache | None = None, train_vision_layernorm: bool = True) -> None:
        super().__init__()
        self.model = model
        self.weights = weights or Stage1Weights()
        self.dec_token_id = dec_token_id
        self.label_smoothing = label_smoothing
        self.seed = seed
        self.cache = feature_cache
        self.frozen = [freeze(model.vision_model)]
        model.vision_model.post_layernorm.requires_grad_(train_vision_layernorm)
        self._freeze_unused()

    def _freeze_unused(self) -> None:
        """Parameters no enabled loss trains get no gradient (and DDP expects none)."""
        m, w = self.model, self.weights
        if not w.itc:  # hard negatives still read the projections, without gradient
            for p in (*m.vision_projection.parameters(), *m.text_projection.parameters(), m.temp):
                p.requires_grad_(False)
        if not w.itm:
            m.itm_head.requires_grad_(False)
        if not w.itg:
            m.itg_head.requires_grad_(False)
        if not (w.itc or w.itm or w.itg):
            raise ValueError("stage 1 needs at least one of the ITC, ITM and ITG losses")

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_in_eval(self.frozen)
        return self

    def forward(self, batch: dict, step: int) -> dict[str, Tensor]:
        m, w = self.model, self.weights
        ids, mask = batch["input_ids"], batch["attention_mask"]
        B = ids.shape[0]
        offset = dist.rank() * B
        image = image_features(m.vision_model, batch["pixel_values"], batch.get("keys"), self.cache)  # (B, N, Dv)
        with torch.no_grad():
            m.temp.clamp_(*TEMPERATURE_RANGE)
        queries = m.image_queries(image, use_cache=bool(w.itg))  # (B, Q, D) and each layer's keys / values
        losses: dict[str, Tensor] = {}
        if w.itc or w.itm:
            image_feats = m.image_embeds(queries.last_hidden_state)  # (B, Q, E)
            text_feat = m.text_embeds(m.text_states(ids, mask).last_hidden_state)  # (B, E)
            sim_i2t, sim_t2i = itc_similarities(
                image_feats, text_feat, dist.gather_with_grad(image_feats), dist.gather_with_grad(text_feat), m.temp
            )  # (B, N) each
            if w.itc:
                losses["itc"] = itc_loss(sim_i2t, sim_t2i, offset, self.label_smoothing)
            if w.itm:
                losses["itm"] = self._itm(image, ids, mask, sim_i2t, sim_t2i, offset, step)
        if w.itg:
            dec_ids, labels = itg_labels(ids, mask, self.dec_token_id)
            logits = m.itg_logits(queries.present, dec_ids, mask)  # (B, T, V)
            losses["itg"] = token_mean(*next_token_loss_sum(logits, labels, self.label_smoothing))
        losses["loss"] = sum(getattr(w, name) * value for name, value in losses.items())
        return losses

    def _itm(self, image, ids, mask, sim_i2t, sim_t2i, offset: int, step: int) -> Tensor:
        """Each pair, its text with a hard-negative image, its image with a hard-negative text."""
        m = self.model
        seed = (self.seed * 1_000_003 + step) % (1 << 62)
        neg_images, neg_texts = hard_negatives(sim_i2t, sim_t2i, offset, seed)  # (B,) global indices
        images_all = dist.gather_with_grad(image)  # (N, N_img, Dv): the final LayerNorm may train
        ids_all, mask_all = dist.gather(ids), dist.gather(mask)
        images = torch.cat([image, images_all[neg_images], image])  # (3B, N_img, Dv)
        texts = torch.cat([ids, ids, ids_all[neg_texts]])  # (3B, T)
        text_mask = torch.cat([mask, mask, mask_all[neg_texts]])
        Q = m.config.num_query_tokens
        joint_mask = torch.cat([text_mask.new_ones(3 * ids.shape[0], Q), text_mask], dim=1)  # (3B, Q + T)
        logits = m.itm_logits(m.itm_states(images, texts, joint_mask).last_hidden_state)  # (3B, 2)
        return itm_loss(logits)
