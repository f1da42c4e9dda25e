"""Shared by the Hugging Face twin and generation tests: a model with every parameter random
and its exported transformers twin.

What to call: ``randomised(cfg, seed=)`` (our model, eval mode, every parameter perturbed so a
wrong mapping shows); ``hf_twin(model, cfg, **config)`` (``checkpoints_tools.adapters.to_hf``
of it loaded into the class its config names, eager attention, strict; ``config`` set on the
transformers config first).
"""

from __future__ import annotations

import torch

from pretrain.models import ModelConfig, MoEConfig, build_model


def randomised(cfg: ModelConfig, *, seed: int = 0) -> torch.nn.Module:
    """A model whose every parameter (norms, biases, relative tables) is random."""
    model = build_model(cfg)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


def hf_model(hf_state_dict, hf_config) -> torch.nn.Module:
    """The transformers model ``hf_config.architectures[0]`` holding ``hf_state_dict``."""
    import transformers

    cls = getattr(transformers, hf_config.architectures[0])
    model = cls._from_config(hf_config, attn_implementation="eager").eval()
    model.load_state_dict(hf_state_dict, strict=True)
    return model


def hf_twin(model: torch.nn.Module, cfg: ModelConfig, **config) -> torch.nn.Module:
    """``model`` exported (``to_hf``) and loaded as its transformers twin."""
    from checkpoints_tools.adapters import to_hf

    hf_state_dict, hf_config = to_hf(model.state_dict(), cfg)
    for key, value in config.items():
        setattr(hf_config, key, value)
    return hf_model(hf_state_dict, hf_config)


_BASES = {
    # T5 v1.1 / mT5: relative positions, RMSNorm, gated GELU, unscaled attention, untied
    "mt5": {
        "head_dim": 12,  # inner width 48 != d_model
        "position": "relative",
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
        "norm": "rmsnorm",
        "norm_eps": 1e-6,
        "mlp": "gated_gelu",
        "scale_attention": False,
        "pad_token_id": 0,
    },
    # mBART: learned positions, LayerNorm with biases, embedding norm, tied head + bias
    "mbart": {
        "position": "learned",
        "norm": "layernorm",
        "norm_eps": 1e-5,
        "mlp": "gelu",
        "bias": True,
        "scale_embeddings": True,
        "embedding_norm": True,
        "tie_embeddings": True,
        "final_logits_bias": True,
        "init_std": 0.1,
        "pad_token_id": 1,
    },
}
_EXTRAS = {
    "switch": (
        "mt5",
        {
            "num_layers": 4,
            "num_decoder_layers": 4,
            "mlp": "gelu",
            "moe": MoEConfig(
                num_experts=4, top_k=1, router="switch", every=2, offset=1, dropless=True
            ),
        },
    ),
    "nllb": (
        "mbart",
        {
            "position": "sinusoidal",
            "embedding_norm": False,
            "final_logits_bias": False,
            "pad_token_id": 1,
            "moe": MoEConfig(num_experts=4, top_k=2, router="gshard", every=2, dropless=True),
        },
    ),
}


def tiny_encdec(shape: str, **fields) -> ModelConfig:
    """A width-32, 4-head encoder-decoder of ``shape`` (mt5 | mbart | switch: mt5 with top-1 MoE
    in blocks 1 and 3 of 4 per stack | nllb: mbart with sinusoidal positions and GShard top-2):
    the shape's settings, then ``fields`` (vocabulary, widths, lengths, ...), then what makes
    switch / nllb differ from their base."""
    base, extras = _EXTRAS.get(shape, (shape, {}))
    values = {"family": "encoder_decoder", "hidden_size": 32, "num_layers": 2, "num_heads": 4}
    values.update(_BASES[base])
    values.update(fields)
    values.update(extras)
    return ModelConfig(**values)
