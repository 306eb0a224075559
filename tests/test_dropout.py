"""Dropout at inference is skipped without a call into torch (`blip2.modeling.activations.dropout`,
which decoding steps use: each call into torch gives up the GIL), and still applies in training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blip2.config import OPTConfig
from blip2.modeling.activations import dropout
from blip2.modeling.opt import OPTLanguageModel


def test_dropout_is_the_identity_at_inference_and_torch_s_in_training():
    x = torch.randn(32, 32)
    assert dropout(x, 0.5, False) is x
    torch.manual_seed(0)
    ours = dropout(x, 0.5, True)
    torch.manual_seed(0)
    assert torch.equal(ours, F.dropout(x, 0.5, True))
    assert not torch.equal(ours, x)


def test_a_language_model_drops_out_in_training_only():
    torch.manual_seed(0)
    lm = OPTLanguageModel(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                    num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32,
                                    dropout=0.5))
    embeds = torch.randn(2, 5, 16)
    with torch.no_grad():
        lm.eval()
        assert torch.equal(lm(embeds).logits, lm(embeds).logits)
        lm.train()
        assert not torch.equal(lm(embeds).logits, lm(embeds).logits)
