"""The key table: every tensor of a transformers BLIP-2 checkpoint and where it lives in ours.

A rule maps one of our parameters to one or more checkpoint tensors; several tensors
are concatenated along dim 0 (separate q/k/v projections become one fused projection).
The table is generated from the config, so it lists exactly the keys a checkpoint of
that shape must have: loading is strict against it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    ours: str
    hf: tuple[str, ...]  # concatenated along dim 0, in this order


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


def _fused(ours: str, hfs: list[str], bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", tuple(f"{h}.weight" for h in hfs))]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{h}.bias" for h in hfs)))
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


def qformer_rules(cfg, prefix: str = "qformer") -> list[Rule]:
    if not prefix:
        return _unprefixed(qformer_rules(cfg, "_"))
    p = prefix
    rules = _norm(f"{p}.layernorm", f"{p}.layernorm")
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


def t5_rules(cfg, prefix: str = "language_model") -> KeyTable:
    """T5 encoder-decoder: filled in by the T5 work (issue 4)."""
    raise NotImplementedError("T5 language models are not supported yet")


TEXT_RULES = {"opt": opt_rules, "t5": t5_rules}


def blip2_table(config) -> KeyTable:
    """The full table for Blip2Model / Blip2ForConditionalGeneration."""
    text = TEXT_RULES[config.text_config.model_type](config.text_config)
    rules = [
        Rule("query_tokens", ("query_tokens",)),
        *vision_rules(config.vision_config),
        *qformer_rules(config.qformer_config),
        *_linear("language_projection", "language_projection"),
        *text.rules,
    ]
    return KeyTable(rules, text.tied)
