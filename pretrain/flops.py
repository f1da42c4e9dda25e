"""Model FLOPs per token and MFU (model FLOPs utilisation).

What to call: ``model_flops_per_token(model, seq_len=S, decoder_len=G)`` -> training FLOPs
per position of any of our models (forward + backward, attention included; works on the meta
device); ``flops_per_token(non_embedding_params, num_layers=L, hidden_size=H, seq_len=T)`` and
``encoder_decoder_flops_per_token(...)`` are its formulas;
``peak_flops(device_name, override_tflops=None)`` -> the device's peak bf16 FLOP/s (longest
matching key of ``PEAK_BF16_TFLOPS``, or the override), None for an unknown device (MFU is then
not reported); ``mfu(tokens_per_s, flops_per_token=f, peak=p)`` -> the utilisation in [0, 1].
Pure functions: no device, no process group.

MFU = tokens/s * flops_per_token / peak FLOP/s, with the PaLM count
flops_per_token = 6 * N + 12 * num_layers * hidden_size * seq_len, where N is the number of
non-embedding parameters (active parameters for MoE: each token meets top_k of num_experts).

An encoder-decoder row holds S source and G target positions, and throughput counts both
(``pretrain.batches.batch_tokens``), so its figure is the row's FLOPs over S + G::

    6 * (N_enc + N_mem) * S  +  6 * N_dec * G                      (parameters)
    + 12 * A * (L_enc * S * S  +  L_dec * (G * G  +  G * S))         (attention)

N_enc: the encoder stack's active non-embedding parameters; N_mem: the cross-attention key and
value projections, applied to the S encoder outputs, not to the G targets; N_dec: the rest of the
decoder stack plus the output projection (a tied one still multiplies); A = heads x head_dim
(mT5's inner width, which may differ from D); each of the L_dec decoder layers attends over G
targets (self) and S sources (cross). Attention is counted in full, causal or not, as PaLM does.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}


def flops_per_token(
    non_embedding_params: int, *, num_layers: int, hidden_size: int, seq_len: int
) -> float:
    """Training FLOPs per token: 6 * N + 12 * L * H * T (forward + backward, attention included)."""
    return 6.0 * non_embedding_params + 12.0 * num_layers * hidden_size * seq_len


def encoder_decoder_flops_per_token(
    *,
    encoder_params: int,
    memory_params: int,
    decoder_params: int,
    encoder_layers: int,
    decoder_layers: int,
    attention_width: int,
    source_len: int,
    target_len: int,
) -> float:
    """Training FLOPs per position (source or target) of an encoder-decoder row of
    ``source_len`` + ``target_len`` positions (the formula in the module docstring)."""
    S, G = source_len, target_len
    dense = 6.0 * (encoder_params + memory_params) * S + 6.0 * decoder_params * G
    attention = 12.0 * attention_width * (encoder_layers * S * S + decoder_layers * (G * G + G * S))
    return (dense + attention) / (S + G)


def active_params(module: torch.nn.Module, *, top_k: int = 1, num_experts: int = 1) -> float:
    """Parameters of ``module`` less its lookup tables (``nn.Embedding``), routed experts
    (``GroupedExperts``, whose parameters are its own) counting ``top_k / num_experts`` of their
    size: what one token meets."""
    from pretrain.models.moe import GroupedExperts

    count = 0.0
    for sub in module.modules():
        if isinstance(sub, torch.nn.Embedding):
            continue
        own = sum(p.numel() for p in sub.parameters(recurse=False))
        count += own * top_k / num_experts if isinstance(sub, GroupedExperts) else own
    return count


def model_flops_per_token(model: torch.nn.Module, *, seq_len: int, decoder_len: int = 0) -> float:
    """Training FLOPs per position of ``model`` (a whole ``build_model`` model, meta is fine):
    PaLM's count for decoders and encoders at context ``seq_len``; for an encoder-decoder,
    source rows of ``seq_len`` and target rows of ``decoder_len`` positions (module docstring).
    """
    cfg = model.cfg
    moe = {"top_k": cfg.moe.top_k, "num_experts": max(cfg.moe.num_experts, 1)}
    width = cfg.num_heads * cfg.resolved_head_dim
    # a tied output projection reads the embedding table: it multiplies all the same
    head = model.tok_embeddings.weight.numel() if model.output is None else 0
    if not hasattr(model, "encoder"):
        return flops_per_token(
            round(active_params(model, **moe)) + head,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            seq_len=seq_len,
        )
    if decoder_len <= 0:
        raise ValueError(f"decoder_len ({decoder_len}) must be > 0 for an encoder-decoder")
    memory = sum(
        active_params(block.cross_attention.wk) + active_params(block.cross_attention.wv)
        for block in model.decoder.layers.values()
    )
    decoder = active_params(model.decoder, **moe) - memory
    decoder += head + (active_params(model.output) if model.output is not None else 0)
    decoder += model.output_bias.numel() if model.output_bias is not None else 0
    return encoder_decoder_flops_per_token(
        encoder_params=round(active_params(model.encoder, **moe)),
        memory_params=round(memory),
        decoder_params=round(decoder),
        encoder_layers=len(model.encoder.layers),
        decoder_layers=len(model.decoder.layers),
        attention_width=width,
        source_len=seq_len,
        target_len=decoder_len,
    )


def peak_flops(device_name: str, *, override_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of a device by name (longest matching table key), or the override.

    Returns None for an unknown device (MFU is then not reported).
    """
    if override_tflops is not None:
        return override_tflops * 1e12
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def mfu(tokens_per_s: float, *, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation in [0, 1] for a throughput on one device of ``peak`` FLOP/s."""
    return tokens_per_s * flops_per_token / peak
