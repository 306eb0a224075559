"""BLIP-2: image encoder -> Q-Former -> projection -> language model."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..families import family_of
from .qformer import QFormer, QFormerOutput
from .vision import VisionEncoder, VisionOutput


def language_model_for(text_config) -> nn.Module:
    """The core language model of `text_config`'s family (see `blip2.families`)."""
    return family_of(text_config).module_class(text_config)


class GenerationStart(NamedTuple):
    """What generation starts from, checked before any model work."""

    input_ids: Tensor  # (B, T) prompts (the BOS token alone when none were given)
    start_ids: Tensor  # (B, L0) the history generation returns first (BOS, or T5's decoder start)
    new_tokens: int  # the most tokens generation may add


def check_pixel_values(pixel_values, vc, interpolate_pos_encoding: bool = False) -> None:
    """Raises a clear TypeError / ValueError for pixel_values the vision encoder (config `vc`) cannot take."""
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}"
        )
    if pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must have 3 channels (RGB), got {pixel_values.shape[1]}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a floating tensor, got {pixel_values.dtype}")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds no images (batch size 0): give at least one")
    # A float32 sum is finite when every value is (NaN and inf carry through it); it is 4-200x cheaper than
    # isfinite().all(), which has no fast bfloat16 path. Only a sum that is not finite looks at each value.
    if not bool(torch.isfinite(pixel_values.sum(dtype=torch.float32))):
        bad = sorted({int(i) for i in (~torch.isfinite(pixel_values)).flatten(1).any(dim=1).nonzero()[:, 0]})
        if bad:  # else huge finite values overflowed the sum
            raise ValueError(f"pixel_values of image(s) {bad[:10]} hold NaN or infinite values; check how they were made")
    h, w = pixel_values.shape[2:]
    if interpolate_pos_encoding:
        if h < vc.patch_size or w < vc.patch_size:
            raise ValueError(f"images of {h}x{w} are smaller than one {vc.patch_size}-pixel patch")
    elif (h, w) != (vc.image_size, vc.image_size):
        raise ValueError(
            f"pixel_values are {h}x{w} but the model expects {vc.image_size}x{vc.image_size}; "
            "resize them (the processor does) or pass interpolate_pos_encoding=True"
        )


class Blip2(nn.Module):
    """The composed model. Attribute names are those of the reference so user code that
    freezes or inspects parts (`model.vision_model.requires_grad_(False)`) keeps working."""

    qformer_class: type[nn.Module] = QFormer  # InstructBLIP composes its own (see modeling/instructblip.py)

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        text = config.text_config
        if getattr(text, "word_embed_proj_dim", text.hidden_size) != text.hidden_size:  # OPT-350m's kind
            raise ValueError(
                "BLIP-2 needs text_config.word_embed_proj_dim == hidden_size "
                f"(got {text.word_embed_proj_dim} and {text.hidden_size}): the projected queries "
                "are concatenated with the token embeddings"
            )
        if config.num_query_tokens < 1:
            raise ValueError(f"Blip2Config.num_query_tokens must be >= 1, got {config.num_query_tokens}")
        qf = config.qformer_config
        self.vision_model = VisionEncoder(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qf.hidden_size))
        self.qformer = self.qformer_class(qf)
        self.language_projection = nn.Linear(qf.hidden_size, text.hidden_size)
        self.language_model = language_model_for(text)

    # ---- the image side ----
    def check_pixel_values(self, pixel_values, interpolate_pos_encoding: bool = False) -> None:
        check_pixel_values(pixel_values, self.config.vision_config, interpolate_pos_encoding)

    def image_features(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False,
                       need_hidden: bool = False, need_weights: bool = False) -> VisionOutput:
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        return self.vision_model(pixel_values, interpolate_pos_encoding, need_hidden, need_weights)

    def query_features(self, image_embeds: Tensor, need_hidden: bool = False,
                       need_weights: bool = False) -> QFormerOutput:
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, Dq)
        return self.qformer(queries, image_embeds, need_hidden=need_hidden, need_weights=need_weights)

    def language_inputs(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False, **query_inputs) -> Tensor:
        """(B, 3, H, W) -> (B, Q, D_lm): what the language model sees of each image.

        `query_inputs` go to `query_features` (InstructBLIP's instruction); BLIP-2 takes none."""
        image = self.image_features(pixel_values, interpolate_pos_encoding).last_hidden_state
        return self.language_inputs_from_image(image, **query_inputs)

    def language_inputs_from_image(self, image_embeds: Tensor, **query_inputs) -> Tensor:
        """(B, N, Dv) image-encoder states -> (B, Q, D_lm): the part of `language_inputs` that may
        depend on an instruction (what a cache keyed by the image alone must not hold)."""
        queries = self.query_features(image_embeds, **query_inputs).last_hidden_state[:, : self.config.num_query_tokens]
        return self.language_projection(queries)

    # ---- joining image and text ----
    def check_input_ids(self, input_ids: Tensor, batch: int | None = None) -> None:
        vocab = self.config.text_config.vocab_size
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.long, torch.int, torch.int16):
            raise TypeError(f"input_ids must be an integer torch.Tensor, got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
            bad = input_ids[(input_ids < 0) | (input_ids >= vocab)][0].item()
            raise ValueError(f"input_ids contain token id {bad}, outside the vocabulary [0, {vocab})")
        if batch is not None and input_ids.shape[0] != batch:
            raise ValueError(f"batch sizes differ: {batch} images but {input_ids.shape[0]} rows of input_ids")

    def has_image_tokens(self, input_ids: Tensor) -> bool:
        """Whether the prompts hold `<image>` slots for the queries (else the queries go in front)."""
        token = self.config.image_token_index
        return token is not None and bool((input_ids == token).any())

    def merge(self, lm_inputs: Tensor, input_ids: Tensor, attention_mask: Tensor | None):
        """Places the image's query embeddings among the text embeddings.

        With `image_token_index` set and present in `input_ids`, the queries fill those
        positions (newer checkpoints); otherwise they go in front of the text (older ones).
        Returns inputs_embeds (B, T', D) and attention_mask (B, T').
        """
        B, Q, _ = lm_inputs.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}"
            )
        embeds = self.language_model.embed(input_ids)  # (B, T, D)
        if self.has_image_tokens(input_ids):
            slots = input_ids == self.config.image_token_index
            per_row = slots.sum(dim=1)
            if (per_row != Q).any():
                raise ValueError(
                    f"each prompt must hold {Q} image tokens (id {self.config.image_token_index}), "
                    f"found {per_row.tolist()}"
                )
            embeds = embeds.masked_scatter(slots[..., None], lm_inputs.to(embeds.dtype))
            return embeds, attention_mask
        embeds = torch.cat([lm_inputs.to(embeds.dtype), embeds], dim=1)  # (B, Q + T, D)
        mask = torch.cat([attention_mask.new_ones(B, Q), attention_mask], dim=1)
        return embeds, mask

    # ---- generation ----
    @torch.inference_mode()
    def generate_tokens(self, pixel_values: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None,
                        config, streamer=None, generator=None, interpolate_pos_encoding: bool = False,
                        **query_inputs) -> Tensor:
        """Token ids for each image (and prompt): the start token(s), then the new tokens.

        `config` is a `blip2.generation.GenerationConfig`. The image encoder, Q-Former and prompt
        prefill run once per image; beams and samples share that work through the stepper.
        """
        from ..generation import generate

        stepper, start_ids = self.stepper(pixel_values, input_ids, attention_mask, config, interpolate_pos_encoding,
                                          **query_inputs)
        return generate(stepper, start_ids, config, streamer=streamer, generator=generator)

    def stepper(self, pixel_values: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None, config,
                interpolate_pos_encoding: bool = False, **query_inputs):
        """The language model primed with the images and prompts, and the history generation starts from.

        One image with several prompts (several questions about it) is encoded once and shared.
        """
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        start = self.generation_start(pixel_values.shape[0], input_ids, config, pixel_values.device)
        lm_inputs = self.language_inputs(pixel_values, interpolate_pos_encoding, **query_inputs)  # (images, Q, D)
        return self._stepper(lm_inputs, start, attention_mask)

    def stepper_from_language_inputs(self, lm_inputs: Tensor, input_ids: Tensor | None,
                                     attention_mask: Tensor | None, config):
        """`stepper` from language inputs computed earlier (`language_inputs`, e.g. a server's cache):
        lm_inputs (images, Q, D), one image per prompt row or one for all."""
        start = self.generation_start(lm_inputs.shape[0], input_ids, config, lm_inputs.device)
        return self._stepper(lm_inputs, start, attention_mask)

    def generation_start(self, images: int, input_ids: Tensor | None, config, device) -> GenerationStart:
        """Checks the prompts and the generation config against the model; fills in the BOS prompt."""
        B = images
        if images == 1 and isinstance(input_ids, Tensor) and input_ids.dim() == 2:
            B = input_ids.shape[0]
        text = self.config.text_config
        decoder_only = family_of(self.config).decoder_only
        start_token = config.bos_token_id if decoder_only else config.decoder_start_token_id
        if start_token is None:
            what = "bos_token_id" if decoder_only else "decoder_start_token_id"
            raise ValueError(f"generation needs {what}: set it in the text config or pass it to generate()")
        start_ids = torch.full((B, 1), start_token, dtype=torch.long, device=device)
        new_tokens = config.new_token_limit(start_ids.shape[1])  # before any model work: fail fast
        if input_ids is None:
            if text.bos_token_id is None:
                raise ValueError("without input_ids the prompt is the BOS token, but text_config.bos_token_id is None")
            input_ids = torch.full((B, 1), text.bos_token_id, dtype=torch.long, device=device)
        self.check_input_ids(input_ids, B)
        return GenerationStart(input_ids, start_ids, new_tokens)

    def _stepper(self, lm_inputs: Tensor, start: GenerationStart, attention_mask: Tensor | None):
        images = lm_inputs.shape[0]
        B = start.input_ids.shape[0]
        family = family_of(self.config)
        input_ids, attention_mask = pack_padding(start.input_ids, attention_mask, pad_first=family.decoder_only)
        shared = 0
        if family.decoder_only and images == 1 and B > 1:
            # Several prompts about one image: when every row starts with the same query tokens at
            # the same positions, their keys and values are computed once for all rows.
            if not self.has_image_tokens(input_ids):
                shared = lm_inputs.shape[1]  # the queries go in front of every row
            else:
                moved = image_block_first(input_ids, attention_mask, self.config.image_token_index, lm_inputs.shape[1])
                if moved is not None:
                    (input_ids, attention_mask), shared = moved, lm_inputs.shape[1]
        embeds, mask = self.merge(lm_inputs.expand(B, -1, -1), input_ids, attention_mask)
        if family.learned_positions:
            check_positions(int(mask.sum(dim=1).max()), start.new_tokens,
                            self.config.text_config.max_position_embeddings)
        stepper = family.stepper_class(self.language_model, embeds, mask, start.new_tokens,
                                       start_ids=start.start_ids, shared_prefix=shared)
        return stepper, start.start_ids


def pack_padding(input_ids: Tensor, attention_mask: Tensor | None, pad_first: bool) -> tuple[Tensor, Tensor | None]:
    """Moves each row's padding to one side of its prompt, keeping the order of its tokens.

    Padding must not change what a row generates (every caller's batch goes through here). A
    decoder-only model continues each row from its last position and counts positions over the
    mask, so its padding belongs in front (`pad_first`): a right-padded row would continue from
    a pad. T5 measures relative distances over all positions, so padding there belongs at the
    end, where it sits between nothing. Rows already laid out that way are returned untouched
    (left-padded OPT and right-padded T5 prompts give exactly what the reference gives).
    input_ids, attention_mask: (B, T).
    """
    if attention_mask is None:
        return input_ids, attention_mask
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}")
    real = attention_mask != 0
    if pad_first:
        misplaced = ~real[:, -1]  # the row ends in padding
    else:
        misplaced = (real[:, 1:] & ~real[:, :-1]).any(dim=1)  # a token follows padding
    if not bool(misplaced.any()):
        return input_ids, attention_mask
    key = real if pad_first else ~real  # a stable sort on it moves padding to one end, tokens keep their order
    order = torch.sort(key.to(torch.int8), dim=1, stable=True).indices  # (B, T)
    same = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(order)
    order = torch.where(misplaced[:, None], order, same)  # rows laid out well are not touched at all
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def image_block_first(input_ids: Tensor, attention_mask: Tensor | None, image_token: int,
                      queries: int) -> tuple[Tensor, Tensor] | None:
    """Left-padded rows that begin with their image tokens, [pad, image x Q, text], laid out as
    [image x Q, pad, text]; None when some row does not begin with Q image tokens.

    The padding is masked and positions count over the mask, so a row means the same either way
    (the layout the queries-in-front prompts have); what changes is that the image block then sits
    at the same cache positions in every row, so several prompts about one image can share it.
    input_ids, attention_mask: (B, T).
    """
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    first = (attention_mask != 0).to(torch.int8).argmax(dim=1)  # (B,) each row's first real position
    if int(first.max()) + queries > T:
        return None
    at = torch.arange(T, device=input_ids.device)
    block = first[:, None] + at[:queries]  # (B, Q) where each row's image block would be
    if not bool((input_ids.gather(1, block) == image_token).all()) or not bool(attention_mask.gather(1, block).all()):
        return None
    # Sort key: the image block 0, the padding before it 1, the text after it 2; a stable sort keeps each part's order.
    key = torch.where(at < first[:, None], 1, torch.where(at < first[:, None] + queries, 0, 2))  # (B, T)
    order = torch.sort(key.to(torch.int8), dim=1, stable=True).indices
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def check_positions(prompt: int, new_tokens: int, max_positions: int) -> None:
    """Learned positions run out: say so before generating rather than failing on an index.

    `prompt` counts the unmasked positions of the longest row (query tokens + text)."""
    if prompt + new_tokens - 1 > max_positions:  # the last new token is never fed back
        raise ValueError(
            f"the prompt takes {prompt} positions (query tokens + text) and generation may add {new_tokens}, "
            f"but the language model has max_position_embeddings={max_positions}, room for "
            f"{max(max_positions - prompt + 1, 0)} new tokens; shorten the prompt or lower max_new_tokens / max_length"
        )


class DecoderStepper:
    """The step interface generation runs over, for a decoder-only language model.

    The prompt (queries + text) is prefilled once per image; beams then share it by
    repeating cache rows, and each step feeds one token into a preallocated cache. With
    `shared_prefix=n`, the first n positions are the same in every row (one image's queries,
    several prompts): they are run for one row and copied into all. `start_ids` is not fed:
    a decoder-only prompt already begins with it.
    """

    def __init__(self, lm, inputs_embeds: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 start_ids: Tensor | None = None, shared_prefix: int = 0) -> None:
        self.lm = lm
        self.embeds = inputs_embeds
        self.mask = attention_mask
        self.shared = shared_prefix
        B, T, _ = inputs_embeds.shape
        self.cache = lm.new_cache(B, T + max_new_tokens, dtype=inputs_embeds.dtype, device=inputs_embeds.device)

    def prefill(self) -> Tensor:
        n = self.shared
        if n:
            head = self.lm.new_cache(1, n, dtype=self.embeds.dtype, device=self.embeds.device)
            self.lm(self.embeds[:1, :n], self.mask[:1, :n], head, last_logits=1)
            self.cache.fill_from(head)
        logits = self.lm(self.embeds[:, n:], self.mask, self.cache, last_logits=1).logits
        self.embeds = None
        return logits[:, -1]  # (B, V)

    def step(self, tokens: Tensor) -> Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        embeds = self.lm.embed(tokens[:, None])  # (B, 1, E)
        return self.lm(embeds, self.mask, self.cache).logits[:, -1]

    def select(self, index: Tensor) -> None:
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
