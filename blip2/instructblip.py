"""The documented transformers InstructBlip classes (4.37.2), over the lean core
(`blip2.modeling.instructblip`), in the reference's checkpoint format."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVideoConfig, InstructBlipVisionConfig
from .generation import GenerationConfig
from .hf_compat import Blip2ForConditionalGeneration, Blip2VisionModel, PreTrainedModel, qformer_output
from .keymap import KeyTable, blip2_table, instruct_qformer_rules
from .modeling.instructblip import InstructBlip, InstructBlipVideo, InstructQFormer
from .outputs import InstructBlipForConditionalGenerationModelOutput


# The reference's InstructBLIP metadata: no fp32-kept modules of its own (the language model's are
# added per model), and no keys skipped by device placement.
_INSTRUCT_SURFACE = {"_keep_in_fp32_modules": [], "_skip_keys_device_placement": None}


class InstructBlipVisionModel(Blip2VisionModel):
    config_class = InstructBlipVisionConfig
    _keep_in_fp32_modules = _INSTRUCT_SURFACE["_keep_in_fp32_modules"]
    _skip_keys_device_placement = _INSTRUCT_SURFACE["_skip_keys_device_placement"]


class InstructBlipQFormerModel(PreTrainedModel, InstructQFormer):
    """The Q-Former alone: query embeddings and/or instruction ids -> outputs over both."""

    config_class = InstructBlipQFormerConfig
    main_input_name = "input_ids"
    _keep_in_fp32_modules = _INSTRUCT_SURFACE["_keep_in_fp32_modules"]
    _skip_keys_device_placement = _INSTRUCT_SURFACE["_skip_keys_device_placement"]

    def __init__(self, config: InstructBlipQFormerConfig) -> None:
        self._check_config(config)
        InstructQFormer.__init__(self, config)
        self.init_weights()

    def key_table(self) -> KeyTable:
        return KeyTable(instruct_qformer_rules(self.config, prefix=""), {})

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word

    def forward(self, input_ids, attention_mask=None, position_ids=None, query_embeds=None, head_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        attn, hidden, as_dict = self._flags(output_attentions, output_hidden_states, return_dict)
        for name, value in (("head_mask", head_mask), ("past_key_values", past_key_values)):
            if value is not None:
                raise ValueError(f"InstructBlipQFormerModel does not support {name}")
        if input_ids is None and query_embeds is None:
            raise ValueError("pass query_embeds, input_ids (the instruction), or both")
        self.fit_layout()
        out = InstructQFormer.forward(self, query_embeds, input_ids, attention_mask, encoder_hidden_states,
                                      encoder_attention_mask, hidden, attn, position_ids)
        return qformer_output(out, as_dict)


def maps_bos_to_eos(config) -> bool:
    """The original Vicuna InstructBLIP configs name their LM "LLaMAForCausalLM"; their authors
    trained with a tokenizer whose BOS was id 2 while the model config says 0, and the
    reference (4.37) rewrites generated 0s to 2 for exactly these configs."""
    architectures = getattr(config.text_config, "architectures", None) or []
    return bool(architectures) and architectures[0] == "LLaMAForCausalLM"


class InstructBlipForConditionalGeneration(Blip2ForConditionalGeneration, InstructBlip):
    """InstructBLIP: the instruction goes to the Q-Former (`qformer_input_ids`) and the language model (`input_ids`)."""

    config_class = InstructBlipConfig
    _skip_keys_device_placement = _INSTRUCT_SURFACE["_skip_keys_device_placement"]

    def __init__(self, config: InstructBlipConfig) -> None:
        super().__init__(config)
        self._keep_in_fp32_modules = list(getattr(self.language_model, "keep_in_fp32", ()))

    def key_table(self) -> KeyTable:
        return blip2_table(self.config, instruct_qformer_rules)

    def forward(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None, input_ids=None,
                attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, output_attentions=None,
                output_hidden_states=None, labels=None, return_dict=None, interpolate_pos_encoding: bool = False):
        flags = self._flags(output_attentions, output_hidden_states, return_dict)
        return self._conditional_forward(
            pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels, flags,
            interpolate_pos_encoding, output_class=InstructBlipForConditionalGenerationModelOutput,
            qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask,
        )

    def generate(self, pixel_values: Tensor, qformer_input_ids: Tensor | None = None,
                 qformer_attention_mask: Tensor | None = None, input_ids: Tensor | None = None,
                 attention_mask: Tensor | None = None, *, interpolate_pos_encoding: bool = False,
                 generation_config: GenerationConfig | None = None, streamer=None,
                 generator: torch.Generator | None = None, **generate_kwargs) -> Tensor:
        """Generates text from images and instructions.

        Args:
            pixel_values: (batch, 3, height, width) images.
            qformer_input_ids, qformer_attention_mask: (batch, length) the instruction for the Q-Former
                (its BERT tokenizer's ids; `InstructBlipProcessor` makes them).
            input_ids, attention_mask: (batch, length) the prompt for the language model, left-padded.
            generate_kwargs: any `GenerationConfig` field, as for `Blip2ForConditionalGeneration.generate`.

        Returns:
            (batch * num_return_sequences, length) ids: BOS (T5: the decoder start) and the new tokens.
        """
        base = self.generation_config if generation_config is None else generation_config
        config = base.updated(generate_kwargs)
        self.fit_layout(generating=True)
        out = self.generate_tokens(pixel_values, input_ids, attention_mask, config, streamer=streamer,
                                   generator=generator, interpolate_pos_encoding=interpolate_pos_encoding,
                                   qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask)
        if maps_bos_to_eos(self.config):
            out = out.masked_fill(out == 0, 2)
        return out


class InstructBlipVideoForConditionalGeneration(InstructBlipForConditionalGeneration, InstructBlipVideo):
    """InstructBLIP over videos: pixel_values (batch, frames, 3, height, width), one instruction per
    video; each frame through the image encoder and Q-Former, the frames' queries joined
    (`blip2.modeling.instructblip.InstructBlipVideo`). Checkpoints have InstructBLIP's keys."""

    config_class = InstructBlipVideoConfig

    def forward(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None, input_ids=None,
                attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, output_attentions=None,
                output_hidden_states=None, labels=None, return_dict=None, interpolate_pos_encoding: bool = False):
        """Loss and logits; the per-frame vision and Q-Former outputs are not returned (None)."""
        attn, hidden, as_dict = self._flags(output_attentions, output_hidden_states, return_dict)
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        self.check_input_ids(input_ids, pixel_values.shape[0])
        lm_inputs = self.language_inputs(pixel_values, interpolate_pos_encoding, qformer_input_ids=qformer_input_ids,
                                         qformer_attention_mask=qformer_attention_mask)  # (B, F * Q, D)
        embeds, mask = self.merge(lm_inputs, input_ids, attention_mask)
        loss, logits, lm_out = self.language_forward(embeds, mask, decoder_input_ids, decoder_attention_mask, labels,
                                                     need_hidden=hidden, need_weights=attn)
        result = InstructBlipForConditionalGenerationModelOutput(loss, logits, None, None, lm_out)
        return result if as_dict else result.to_tuple()
