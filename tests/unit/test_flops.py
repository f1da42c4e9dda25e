"""Model FLOPs per position: each family's figure against a count by hand from its config (the
decoder's PaLM count; the encoder-decoder's source and target terms, cross-attention memory
projections on the source side, MoE experts at top_k / num_experts)."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import load_config
from pretrain.flops import encoder_decoder_flops_per_token, model_flops_per_token
from pretrain.models import build_model
from tests.sample_data import REPO


def _model(preset: str, *overrides: str):
    cfg = load_config(REPO / "configs" / preset, list(overrides)).model
    with torch.device("meta"):
        return cfg, build_model(cfg)


def test_decoder_is_palms_count():
    cfg, model = _model("tiny_decoder.yaml")
    D, F, L, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.vocab_size
    kv = cfg.kv_heads * cfg.resolved_head_dim
    # attention q, o (D x D) and k, v (D x kv); SwiGLU 3 x D x F; two norms; final norm
    per_layer = 2 * D * D + 2 * D * kv + 3 * D * F + 2 * D
    head = V * D  # untied or tied, the projection multiplies
    params = L * per_layer + D + head
    assert sum(p.numel() for p in model.parameters()) == params + (
        0 if cfg.tie_embeddings else V * D
    )
    T = 64
    assert model_flops_per_token(model, seq_len=T) == 6 * params + 12 * L * D * T


@pytest.mark.parametrize("S, G", [(64, 16), (32, 32)])
def test_mt5_shape_counts_sources_and_targets_apart(S: int, G: int):
    cfg, model = _model("tiny_encdec.yaml", "model.head_dim=24")  # inner 96 != D 64
    D, F, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    A = cfg.num_heads * 24
    Le, Ld = cfg.num_layers, cfg.num_decoder_layers
    attention = 4 * D * A  # q, k, v, o without biases
    ffn = 3 * D * F  # gated GELU: wi_0, wi_1, wo
    encoder = Le * (attention + ffn + 2 * D) + D  # RMSNorm weights; relative tables excluded
    memory = Ld * 2 * D * A  # cross-attention k and v read the encoder output
    decoder = Ld * (attention + 2 * D * A + ffn + 3 * D) + D + V * D  # + cross q, o; untied head
    want = (
        6 * (encoder + memory) * S + 6 * decoder * G + 12 * A * (Le * S * S + Ld * (G * G + G * S))
    ) / (S + G)
    assert model_flops_per_token(model, seq_len=S, decoder_len=G) == pytest.approx(want, rel=1e-12)
    assert want == encoder_decoder_flops_per_token(
        encoder_params=encoder, memory_params=memory, decoder_params=decoder,
        encoder_layers=Le, decoder_layers=Ld, attention_width=A, source_len=S, target_len=G,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"decoder_len \(0\) must be > 0"):
        model_flops_per_token(model, seq_len=S)


def test_mbart_tied_head_and_its_bias_multiply_but_positions_do_not():
    cfg, model = _model("tiny_mbart.yaml")
    D, F, V, S = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, 32
    L = cfg.num_layers
    attention = 4 * (D * D + D)  # biases
    ffn = 2 * D * F + F + D
    norms = 2 * 2 * D  # LayerNorm weight and bias
    per_stack_extra = 2 * D + 2 * D  # layernorm_embedding + final layer norm
    encoder = L * (attention + ffn + norms) + per_stack_extra
    memory = L * 2 * (D * D + D)
    decoder = L * (attention + 2 * (D * D + D) + ffn + 3 * 2 * D) + per_stack_extra + V * D + V
    want = (6 * (encoder + memory) * S + 6 * decoder * S + 12 * D * L * (S * S + 2 * S * S)) / (
        2 * S
    )
    assert model_flops_per_token(model, seq_len=S, decoder_len=S) == pytest.approx(want, rel=1e-12)


def test_switch_experts_count_top_k_of_num_experts():
    _, dense = _model("tiny_encdec_moe.yaml", "model.moe.num_experts=0")
    cfg, sparse = _model("tiny_encdec_moe.yaml")
    E, k, D, F = cfg.moe.num_experts, cfg.moe.top_k, cfg.hidden_size, cfg.ffn_hidden_size
    sparse_layers = sum(1 for name in sparse.moe_layers())
    assert sparse_layers > 0
    S = G = 32
    expert = 3 * D * F  # one gated expert (w1, w2, w3)
    # an MoE layer: E experts at k / E, plus the router (D x E); the dense FFN it replaces
    per_layer = expert * k + D * E - expert
    # each stack's MoE layers run on its own positions: the difference per position is
    per_position = 6 * per_layer * sparse_layers / 2
    got = model_flops_per_token(sparse, seq_len=S, decoder_len=G)
    assert got - model_flops_per_token(dense, seq_len=S, decoder_len=G) == pytest.approx(
        per_position, rel=1e-9
    )
