"""A Megatron ``torch_dist`` checkpoint of a tiny random Llama, written with plain DCP, for the
import tests (``tests/unit/test_megatron_checkpoint.py``, ``tests/cli/test_megatron_ckpt_cli.py``).

What to call: ``llama(tied=)`` for the model, ``megatron_state(model, stacked=, te=)`` for its
weights in megatron-core's GPT layout (q/k/v interleaved per query group, gate and up
concatenated, vocabulary padded with junk rows, plus the entries Megatron saves beside the model),
``write_megatron(root, state)`` for the run directory; ``OVERRIDES`` are the config keys the weights
do not say.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import transformers

VOCAB, PADDED = 100, 128
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, LAYERS = 4, 2, 8, 32, 48, 3
ROPE_THETA, EPS = 5000.0, 1e-6
# what the weights do not say, given as a user would
OVERRIDES = [
    f"model.num_heads={HEADS}",
    f"model.rope_theta={ROPE_THETA}",
    f"model.norm_eps={EPS}",
    "model.max_seq_len=64",
    f"model.vocab_size={VOCAB}",
]


def llama(*, tied: bool, seed: int = 0, vocab: int = VOCAB):
    """A tiny random LlamaForCausalLM (fp32, eval) with weights far from their init."""
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        rms_norm_eps=EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    return model


def megatron_state(model, *, stacked: bool, te: bool, padded: int = PADDED) -> dict:
    """``model``'s weights in megatron-core's GPT layout (keys as torch_dist stores them),
    with ``_extra_state`` and other entries Megatron saves beside the model."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(7)

    def pad(rows_VD):
        junk = 5.0 * torch.randn(padded - rows_VD.shape[0], rows_VD.shape[1], generator=gen)
        return torch.cat([rows_VD, junk])

    per_group = HEADS // KV_HEADS
    layers = []
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        q, k, v = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        groups = []
        for g in range(KV_HEADS):
            groups += [
                q[g * per_group * HEAD_DIM : (g + 1) * per_group * HEAD_DIM],
                k[g * HEAD_DIM : (g + 1) * HEAD_DIM],
                v[g * HEAD_DIM : (g + 1) * HEAD_DIM],
            ]
        layer = {
            "self_attention.linear_qkv.weight": torch.cat(groups),
            "self_attention.linear_proj.weight": sd[p + "self_attn.o_proj.weight"],
            "mlp.linear_fc1.weight": torch.cat(
                [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]
            ),
            "mlp.linear_fc2.weight": sd[p + "mlp.down_proj.weight"],
        }
        attn_norm = sd[p + "input_layernorm.weight"]
        mlp_norm = sd[p + "post_attention_layernorm.weight"]
        if te:
            layer["self_attention.linear_qkv.layer_norm_weight"] = attn_norm
            layer["mlp.linear_fc1.layer_norm_weight"] = mlp_norm
        else:
            layer["input_layernorm.weight"] = attn_norm
            layer["pre_mlp_layernorm.weight"] = mlp_norm
        layers.append(layer)
    state: dict = {
        "embedding.word_embeddings.weight": pad(sd["model.embed_tokens.weight"]),
        "decoder.final_layernorm.weight": sd["model.norm.weight"],
        "rng_state/shard_0.0_1.1": io.BytesIO(b"rng"),
        "optimizer.state.exp_avg.decoder.final_layernorm.weight": torch.zeros(HIDDEN),
    }
    if not model.config.tie_word_embeddings:
        state["output_layer.weight"] = pad(sd["lm_head.weight"])
    if stacked:
        for key in layers[0]:
            state[f"decoder.layers.{key}"] = torch.stack([layer[key] for layer in layers])
        state["decoder.layers.self_attention.linear_qkv._extra_state/shard_0_1"] = io.BytesIO(b"te")
    else:
        for i, layer in enumerate(layers):
            for key, tensor in layer.items():
                state[f"decoder.layers.{i}.{key}"] = tensor
            state[f"decoder.layers.{i}.self_attention.linear_proj._extra_state"] = torch.zeros(1)
    return state


def write_megatron(root: Path, state: dict, *, iteration: int = 20) -> Path:
    """A Megatron run directory: ``iter_NNNNNNN/`` (metadata.json, DCP files, common.pt) and
    ``latest_checkpointed_iteration.txt``; returns the run directory."""
    it = root / f"iter_{iteration:07d}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(it), no_dist=True)
    (it / "metadata.json").write_text(
        json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1})
    )
    (it / "common.pt").write_bytes(b"never read")
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return root
