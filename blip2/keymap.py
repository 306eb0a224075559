"""The key table: every tensor of a transformers BLIP-2 checkpoint and where it lives in ours.

A rule maps one of our parameters to one or more checkpoint tensors; several tensors
are concatenated along dim 0 (separate q/k/v projections become one fused projection).
The table is generated from the config, so it lists exactly the keys a checkpoint of
that shape must have: loading is strict against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .families import family_of


@dataclass(frozen=True)
class Rule:
    ours: str
    hf: tuple[str, ...]  # concatenated along dim 0, in this order
    sizes: tuple[int, ...] | None = None  # each part's rows when they differ (grouped-query q/k/v)


@dataclass
class KeyTable:
    rules: list[Rule]
    # Checkpoint keys that are copies of a tied tensor (an OPT lm_head, T5's per-stack
    # embed_tokens). Accepted when present, never required, not written.
    tied: dict[str, str]


def _linear(ours: str, hf: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", (f"{hf}.weight",))]
    if bias:
        rules.append(Rule(f"{ours}.bias", (f"{hf}.bias",)))
    return rules


def _fused(ours: str, hfs: list[str], bias: bool = True, sizes: tuple[int, ...] | None = None) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", tuple(f"{h}.weight" for h in hfs), sizes)]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{h}.bias" for h in hfs), sizes))
    return rules


def _norm(ours: str, hf: str, affine: bool = True, bias: bool = True) -> list[Rule]:
    if not affine:
        return []
    return _linear(ours, hf, bias)


def _unprefixed(rules: list[Rule]) -> list[Rule]:
    """Rules built with a placeholder prefix, for models saved on their own (no prefix)."""
    cut = lambda k: k.split(".", 1)[1]
    return [Rule(cut(r.ours), tuple(cut(h) for h in r.hf)) for r in rules]


def vision_rules(cfg, prefix: str = "vision_model") -> list[Rule]:
    if not prefix:
        return _unprefixed(vision_rules(cfg, "_"))
    p = prefix
    rules = [
        Rule(f"{p}.embeddings.class_embedding", (f"{p}.embeddings.class_embedding",)),
        Rule(f"{p}.embeddings.position_embedding", (f"{p}.embeddings.position_embedding",)),
        *_linear(f"{p}.embeddings.patch_embedding", f"{p}.embeddings.patch_embedding"),
    ]
    for n in range(cfg.num_hidden_layers):
        ours, hf = f"{p}.layers.{n}", f"{p}.encoder.layers.{n}"
        rules += _norm(f"{ours}.norm1", f"{hf}.layer_norm1")
        # The reference stores one qkv bias, cat(q_bias, 0, v_bias); with qkv_bias=False there is none.
        rules += _linear(f"{ours}.attn.qkv", f"{hf}.self_attn.qkv", bias=cfg.qkv_bias)
        rules += _linear(f"{ours}.attn.proj", f"{hf}.self_attn.projection")
        rules += _norm(f"{ours}.norm2", f"{hf}.layer_norm2")
        rules += _linear(f"{ours}.mlp.fc1", f"{hf}.mlp.fc1")
        rules += _linear(f"{ours}.mlp.fc2", f"{hf}.mlp.fc2")
    rules += _norm(f"{p}.post_layernorm", f"{p}.post_layernorm")
    return rules


def qformer_rules(cfg, prefix: str = "qformer", input_norm: str = "layernorm") -> list[Rule]:
    """`input_norm`: where the checkpoint keeps the input LayerNorm under the prefix
    (InstructBLIP's sits in its `embeddings`)."""
    if not prefix:
        return _unprefixed(qformer_rules(cfg, "_", input_norm))
    p = prefix
    rules = _norm(f"{p}.layernorm", f"{p}.{input_norm}")
    for n in range(cfg.num_hidden_layers):
        ours, hf = f"{p}.layers.{n}", f"{p}.encoder.layer.{n}"
        sa = f"{hf}.attention"
        rules += _fused(f"{ours}.self_attn.qkv", [f"{sa}.attention.query", f"{sa}.attention.key", f"{sa}.attention.value"])
        rules += _linear(f"{ours}.self_attn.out", f"{sa}.output.dense")
        rules += _norm(f"{ours}.self_norm", f"{sa}.output.LayerNorm")
        if n % cfg.cross_attention_frequency == 0:
            ca = f"{hf}.crossattention"
            rules += _linear(f"{ours}.cross_attn.q", f"{ca}.attention.query")
            rules += _fused(f"{ours}.cross_attn.kv", [f"{ca}.attention.key", f"{ca}.attention.value"])
            rules += _linear(f"{ours}.cross_attn.out", f"{ca}.output.dense")
            rules += _norm(f"{ours}.cross_norm", f"{ca}.output.LayerNorm")
        rules += _linear(f"{ours}.mlp.fc1", f"{hf}.intermediate_query.dense")
        rules += _linear(f"{ours}.mlp.fc2", f"{hf}.output_query.dense")
        rules += _norm(f"{ours}.mlp_norm", f"{hf}.output_query.LayerNorm")
    rules += qformer_text_rules(cfg, p)
    return rules


def opt_rules(cfg, prefix: str = "language_model") -> KeyTable:
    ours_p, hf_p = prefix, f"{prefix}.model.decoder"
    affine, bias = cfg.layer_norm_elementwise_affine, cfg.enable_bias
    rules = [
        Rule(f"{ours_p}.embed_tokens.weight", (f"{hf_p}.embed_tokens.weight",)),
        Rule(f"{ours_p}.embed_positions.weight", (f"{hf_p}.embed_positions.weight",)),
    ]
    if cfg.word_embed_proj_dim != cfg.hidden_size:
        rules += _linear(f"{ours_p}.project_in", f"{hf_p}.project_in", bias=False)
        rules += _linear(f"{ours_p}.project_out", f"{hf_p}.project_out", bias=False)
    for n in range(cfg.num_hidden_layers):
        ours, hf = f"{ours_p}.layers.{n}", f"{hf_p}.layers.{n}"
        rules += _norm(f"{ours}.attn_norm", f"{hf}.self_attn_layer_norm", affine)
        rules += _fused(f"{ours}.attn.qkv", [f"{hf}.self_attn.q_proj", f"{hf}.self_attn.k_proj", f"{hf}.self_attn.v_proj"], bias)
        rules += _linear(f"{ours}.attn.out", f"{hf}.self_attn.out_proj", bias)
        rules += _norm(f"{ours}.mlp_norm", f"{hf}.final_layer_norm", affine)
        rules += _linear(f"{ours}.fc1", f"{hf}.fc1", bias)
        rules += _linear(f"{ours}.fc2", f"{hf}.fc2", bias)
    if cfg.do_layer_norm_before and not cfg._remove_final_layer_norm:
        rules += _norm(f"{ours_p}.final_norm", f"{hf_p}.final_layer_norm", affine)
    tied = {}
    if cfg.tie_word_embeddings:
        tied[f"{prefix}.lm_head.weight"] = f"{ours_p}.embed_tokens.weight"
    else:
        rules.append(Rule(f"{ours_p}.lm_head.weight", (f"{prefix}.lm_head.weight",)))
    return KeyTable(rules, tied)


def _t5_layer_rules(cfg, ours: str, hf: str, first: bool, cross: bool) -> list[Rule]:
    """One T5 block: hf's block.N.layer.{0: self-attention, 1: cross-attention, last: feed-forward}."""
    sa = f"{hf}.layer.0.SelfAttention"
    rules = _norm(f"{ours}.attn_norm", f"{hf}.layer.0.layer_norm", bias=False)
    rules += _fused(f"{ours}.attn.qkv", [f"{sa}.q", f"{sa}.k", f"{sa}.v"], bias=False)
    rules += _linear(f"{ours}.attn.out", f"{sa}.o", bias=False)
    if first:  # the first block of each stack holds the relative position table
        rules.append(Rule(f"{ours}.attn.rel_bias.weight", (f"{sa}.relative_attention_bias.weight",)))
    ff = 1
    if cross:
        ca = f"{hf}.layer.1.EncDecAttention"
        rules += _norm(f"{ours}.cross_norm", f"{hf}.layer.1.layer_norm", bias=False)
        rules += _linear(f"{ours}.cross_attn.q", f"{ca}.q", bias=False)
        rules += _fused(f"{ours}.cross_attn.kv", [f"{ca}.k", f"{ca}.v"], bias=False)
        rules += _linear(f"{ours}.cross_attn.out", f"{ca}.o", bias=False)
        ff = 2
    dense = f"{hf}.layer.{ff}.DenseReluDense"
    rules += _norm(f"{ours}.mlp_norm", f"{hf}.layer.{ff}.layer_norm", bias=False)
    if cfg.is_gated_act:  # wi_0 (through the activation) and wi_1 (linear) fused as one wi
        rules += _fused(f"{ours}.mlp.wi", [f"{dense}.wi_0", f"{dense}.wi_1"], bias=False)
    else:
        rules += _linear(f"{ours}.mlp.wi", f"{dense}.wi", bias=False)
    rules += _linear(f"{ours}.mlp.wo", f"{dense}.wo", bias=False)
    return rules


def t5_rules(cfg, prefix: str = "language_model") -> KeyTable:
    """T5 encoder-decoder. `prefix=""` gives the table of a bare T5ForConditionalGeneration."""
    p = f"{prefix}." if prefix else ""
    rules = [Rule(f"{p}shared.weight", (f"{p}shared.weight",))]
    for stack, layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        for n in range(layers):
            rules += _t5_layer_rules(cfg, f"{p}{stack}.layers.{n}", f"{p}{stack}.block.{n}",
                                     first=n == 0, cross=stack == "decoder")
        rules += _norm(f"{p}{stack}.final_norm", f"{p}{stack}.final_layer_norm", bias=False)
    # Each stack's embed_tokens is the shared table; older checkpoints store the copies.
    tied = {f"{p}{stack}.embed_tokens.weight": f"{p}shared.weight" for stack in ("encoder", "decoder")}
    if cfg.tie_word_embeddings:
        tied[f"{p}lm_head.weight"] = f"{p}shared.weight"
    else:
        rules.append(Rule(f"{p}lm_head.weight", (f"{p}lm_head.weight",)))
    return KeyTable(rules, tied)


def llama_rules(cfg, prefix: str = "language_model") -> KeyTable:
    """Llama decoders. `prefix=""` gives the table of a bare LlamaForCausalLM."""
    p = f"{prefix}." if prefix else ""
    hf_p = f"{p}model"
    rules = [Rule(f"{p}embed_tokens.weight", (f"{hf_p}.embed_tokens.weight",))]
    accepted = {}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    qkv_rows = (cfg.num_attention_heads * head_dim, *[cfg.num_key_value_heads * head_dim] * 2)
    for n in range(cfg.num_hidden_layers):
        ours, hf = f"{p}layers.{n}", f"{hf_p}.layers.{n}"
        sa = f"{hf}.self_attn"
        rules += _norm(f"{ours}.attn_norm", f"{hf}.input_layernorm", bias=False)
        rules += _fused(f"{ours}.attn.qkv", [f"{sa}.q_proj", f"{sa}.k_proj", f"{sa}.v_proj"], cfg.attention_bias,
                         qkv_rows)
        rules += _linear(f"{ours}.attn.out", f"{sa}.o_proj", cfg.attention_bias)
        rules += _norm(f"{ours}.mlp_norm", f"{hf}.post_attention_layernorm", bias=False)
        rules += _fused(f"{ours}.mlp.gate_up", [f"{hf}.mlp.gate_proj", f"{hf}.mlp.up_proj"], bias=False)
        rules += _linear(f"{ours}.mlp.down", f"{hf}.mlp.down_proj", bias=False)
        # Checkpoints written before rotary frequencies became non-persistent store them per layer;
        # they are recomputed from the config, so they are accepted and ignored.
        accepted[f"{sa}.rotary_emb.inv_freq"] = f"{ours}.attn"
    rules += _norm(f"{p}final_norm", f"{hf_p}.norm", bias=False)
    if cfg.tie_word_embeddings:
        accepted[f"{p}lm_head.weight"] = f"{p}embed_tokens.weight"
    else:
        rules.append(Rule(f"{p}lm_head.weight", (f"{p}lm_head.weight",)))
    return KeyTable(rules, accepted)


def instruct_qformer_rules(cfg, prefix: str = "qformer") -> list[Rule]:
    """InstructBLIP's Q-Former: BLIP-2's layers with text feed-forwards, and the instruction's
    embeddings, whose LayerNorm is the Q-Former's input norm."""
    if not prefix:
        return _unprefixed(instruct_qformer_rules(cfg, "_"))
    return [*text_embedding_rules(f"{prefix}.embeddings"),
            *qformer_rules(cfg, prefix, input_norm="embeddings.layernorm")]


def blip2_table(config, qformer_part=qformer_rules) -> KeyTable:
    """The full table for Blip2Model / Blip2ForConditionalGeneration (InstructBLIP: its Q-Former's rules)."""
    text = family_of(config).key_table(config.text_config)
    rules = [
        Rule("query_tokens", ("query_tokens",)),
        *vision_rules(config.vision_config),
        *qformer_part(config.qformer_config),
        *_linear("language_projection", "language_projection"),
        *text.rules,
    ]
    return KeyTable(rules, text.tied)


# ---------------------------------------------------------------- retrieval (newer releases)
# The Q-Former's text side and the retrieval heads, as in Salesforce/blip2-itm-vit-g.

def qformer_text_rules(cfg, prefix: str = "qformer") -> list[Rule]:
    """Each layer's text feed-forward (`intermediate`, `output`); only with use_qformer_text_input."""
    if not getattr(cfg, "use_qformer_text_input", False):
        return []
    rules = []
    for n in range(cfg.num_hidden_layers):
        ours, hf = f"{prefix}.layers.{n}", f"{prefix}.encoder.layer.{n}"
        rules += _linear(f"{ours}.text_mlp.fc1", f"{hf}.intermediate.dense")
        rules += _linear(f"{ours}.text_mlp.fc2", f"{hf}.output.dense")
        rules += _norm(f"{ours}.text_mlp_norm", f"{hf}.output.LayerNorm")
    return rules


def text_embedding_rules(prefix: str = "embeddings") -> list[Rule]:
    """The Q-Former's word and position embeddings (a top-level `embeddings` in the reference)."""
    return [
        Rule(f"{prefix}.word.weight", (f"{prefix}.word_embeddings.weight",)),
        Rule(f"{prefix}.position.weight", (f"{prefix}.position_embeddings.weight",)),
    ]


def itg_head_rules(prefix: str = "itg_head") -> list[Rule]:
    """Ours only: the stage-1 ITG head (BERT's LM head; its decoder is the tied word embeddings).

    The reference's retrieval checkpoints have no such head: tables of the retrieval classes
    accept these keys (see `training_only_keys`) and stage 1 starts a fresh head without them.
    """
    return [
        *_linear(f"{prefix}.dense", f"{prefix}.transform.dense"),
        *_norm(f"{prefix}.norm", f"{prefix}.transform.LayerNorm"),
        Rule(f"{prefix}.bias", (f"{prefix}.bias",)),
    ]


def _accepted(rules: list[Rule]) -> dict[str, str]:
    """Checkpoint keys a table accepts when present, never requires and does not write
    (the treatment `KeyTable.tied` gives tied copies)."""
    return {hf: rule.ours for rule in rules for hf in rule.hf}


def training_only_keys() -> dict[str, str]:
    """Keys that only stage-1 training writes (the ITG head, the ITC temperature)."""
    return _accepted([*itg_head_rules(), Rule("temp", ("temp",))])


def retrieval_table(config) -> KeyTable:
    """Blip2ForImageTextRetrieval: image encoder, queries, Q-Former with text input, both
    projections and the ITM head; no language model."""
    rules = [
        Rule("query_tokens", ("query_tokens",)),
        *vision_rules(config.vision_config),
        *text_embedding_rules(),
        *qformer_rules(config.qformer_config),
        *_linear("vision_projection", "vision_projection"),
        *_linear("text_projection", "text_projection"),
        *_linear("itm_head", "itm_head"),
    ]
    return KeyTable(rules, training_only_keys())


# The one-sided classes load the whole retrieval checkpoint, as the reference's examples do
# (`Blip2TextModelWithProjection.from_pretrained("Salesforce/blip2-itm-vit-g")`): the other
# side's tensors are accepted and left out.
def text_with_projection_table(config) -> KeyTable:
    """Blip2TextModelWithProjection (its query tokens are stored though the text path never uses them)."""
    rules = [
        Rule("query_tokens", ("query_tokens",)),
        *text_embedding_rules(),
        *qformer_rules(config.qformer_config),
        *_linear("text_projection", "text_projection"),
    ]
    other = [*vision_rules(config.vision_config), *_linear("vision_projection", "vision_projection"),
             *_linear("itm_head", "itm_head")]
    return KeyTable(rules, {**_accepted(other), **training_only_keys()})


def vision_with_projection_table(config) -> KeyTable:
    """Blip2VisionModelWithProjection."""
    rules = [
        Rule("query_tokens", ("query_tokens",)),
        *vision_rules(config.vision_config),
        *qformer_rules(config.qformer_config),
        *_linear("vision_projection", "vision_projection"),
    ]
    other = [*text_embedding_rules(), *_linear("text_projection", "text_projection"),
             *_linear("itm_head", "itm_head")]
    return KeyTable(rules, {**_accepted(other), **training_only_keys()})
