"""Model FLOPs per token and MFU (model FLOPs utilisation).

What to call: ``flops_per_token(non_embedding_params, num_layers=L, hidden_size=H, seq_len=T)``
-> training FLOPs per token (forward + backward, attention included);
``peak_flops(device_name, override_tflops=None)`` -> the device's peak bf16 FLOP/s (longest
matching key of ``PEAK_BF16_TFLOPS``, or the override), None for an unknown device (MFU is then
not reported); ``mfu(tokens_per_s, flops_per_token=f, peak=p)`` -> the utilisation in [0, 1].
Pure functions: no device, no process group.

MFU = tokens/s * flops_per_token / peak FLOP/s, with the PaLM count
flops_per_token = 6 * N + 12 * num_layers * hidden_size * seq_len, where N is the number of
non-embedding parameters (active parameters for MoE: each token meets top_k of num_experts).
"""

from __future__ import annotations

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
