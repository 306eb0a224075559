"""Stage 2: vision-to-language generative learning with a frozen language model.

The Q-Former's outputs, projected, are a soft prompt in front of the text; the frozen LM is
asked to continue with the text. For a decoder-only LM (OPT) the loss is on the text after the
prompt; for an encoder-decoder LM (T5) the prompt goes to the encoder and the text is the
decoder's target.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..families import family_of
from ..hf_compat import Blip2ForConditionalGeneration
from ..retrieval import Blip2ForImageTextRetrieval
from .frozen import FeatureCache, freeze, image_features, keep_frozen_in_eval
from .losses import IGNORE, next_token_loss_sum, token_mean


class Stage2Objective(nn.Module):
    """forward(batch, step) -> {"lm", "loss"}: the module DDP wraps.

    batch: pixel_values, input_ids / attention_mask (right-padded), labels (IGNORE on prompt
    and padding); for T5 also decoder_attention_mask. `recompute_lm` keeps none of the frozen
    LM's activations either, recomputing its forward during backward (memory for time).
    """

    def __init__(self, model: Blip2ForConditionalGeneration, feature_cache: FeatureCache | None = None,
                 train_vision_layernorm: bool = True, recompute_lm: bool = False) -> None:
        super().__init__()
        self.model = model
        self.cache = feature_cache
        self.recompute_lm = recompute_lm
        self.frozen = [freeze(model.vision_model), freeze(model.language_model)]
        model.vision_model.post_layernorm.requires_grad_(train_vision_layernorm)

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_in_eval(self.frozen)
        return self

    def shardable(self) -> list[tuple[nn.Module, list[nn.Module]]]:
        """The frozen language model and its blocks, for `TrainConfig.fsdp_frozen`."""
        lm = self.model.language_model
        blocks = [m for m in lm.modules() if type(m).__name__ in type(self.model)._no_split_modules]
        return [(lm, blocks)]

    def forward(self, batch: dict, step: int) -> dict[str, Tensor]:
        loss, _ = self.language_loss(batch)
        return {"lm": loss, "loss": loss}

    def query_output(self, batch: dict, need_weights: bool = False):
        """The Q-Former's output on the batch's images (a QFormerOutput; its attention weights if asked)."""
        m = self.model
        image = image_features(m.vision_model, batch["pixel_values"], batch.get("keys"), self.cache)  # (B, N, Dv)
        # InstructBLIP: the Q-Former also reads the instruction (the prompt), and outputs over it too.
        instruction = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
        return m.query_features(image.to(m.query_tokens.dtype), need_weights=need_weights, **instruction)

    def language_loss(self, batch: dict, query_output=None) -> tuple[Tensor, Tensor]:
        """(the language model's loss on the text, the query outputs (B, Q, D)): what a subclass adding
        a loss of its own on the queries starts from; it may pass the `query_output` it computed."""
        m = self.model
        out = (self.query_output(batch) if query_output is None else query_output).last_hidden_state
        queries = out[:, : m.config.num_query_tokens]  # (B, Q, D)
        soft_prompt = m.language_projection(queries)  # (B, Q, D_lm)
        embeds, mask = m.merge(soft_prompt, batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        if family_of(m.config).decoder_only:
            logits = self._decoder_logits(embeds, mask)[:, -labels.shape[1]:]  # (B, T, V): the text part
            loss_sum, count = next_token_loss_sum(logits, labels)
        else:
            logits = self._seq2seq_logits(embeds, mask, batch["decoder_attention_mask"], labels)  # aligned with labels
            loss_sum, count = _aligned_loss_sum(logits, labels)
        return token_mean(loss_sum, count), queries

    def _decoder_logits(self, embeds: Tensor, mask: Tensor) -> Tensor:
        lm = self.model.language_model
        if self.recompute_lm:
            return checkpoint(lambda e: lm(e, mask).logits, embeds, use_reentrant=False)
        return lm(embeds, mask).logits

    def _seq2seq_logits(self, embeds, mask, decoder_mask, labels) -> Tensor:
        def run(e):
            _, logits, _ = self.model.language_forward(e, mask, decoder_attention_mask=decoder_mask, labels=labels)
            return logits

        return checkpoint(run, embeds, use_reentrant=False) if self.recompute_lm else run(embeds)


def _aligned_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Encoder-decoder logits already predict labels position by position (the decoder input is
    the labels shifted right)."""
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


@torch.no_grad()
def load_stage1_(model: Blip2ForConditionalGeneration, stage1_path) -> None:
    """Starts stage 2 from stage 1: the image encoder, the queries and the Q-Former's query side.

    The text side of the Q-Former (embeddings, text feed-forward, heads) is not used in stage 2,
    except by InstructBLIP, whose Q-Former reads the instruction: it takes them too.
    """
    source = Blip2ForImageTextRetrieval.from_pretrained(stage1_path)
    wanted = {k for k in model.state_dict() if k.split(".")[0] in ("vision_model", "query_tokens", "qformer")}
    # InstructBLIP's Q-Former holds the text embeddings (stage 1 keeps them beside it) and reads them.
    renamed = {("qformer." + k if k.startswith("embeddings.") else k): v for k, v in source.state_dict().items()}
    state = {k: v for k, v in renamed.items() if k in wanted}
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"{stage1_path} does not fill the stage-2 model's {missing[:5]}")
    model.load_state_dict(state, strict=False)
