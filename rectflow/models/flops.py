"""FLOPs of an MM-DiT's forward pass, counted analytically (docs/benchmarks.md), and the accelerators' peaks: what
model FLOP utilisation (MFU) is measured against in training logs and benchmarks.
"""
from __future__ import annotations

import os

import torch

# dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' data sheets
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
             "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12}
PEAK_ENV = "RECTFLOW_PEAK_TFLOPS"  # overrides the table (or fills it in for an unlisted device)


def forward_flops(cfg: dict, h_lat: int, w_lat: int, n_ctx: int) -> float:
    """Multiply-add FLOPs (x2) of one sample's forward pass, counting the work the model needs: the pre-only last
    context block computes keys and values only and the last joint attention has image queries only."""
    h, p, depth = cfg["hidden_size"], cfg["patch_size"], cfg["depth"]
    mlp = int(h * cfg["mlp_ratio"])
    n = (h_lat // p) * (w_lat // p)
    lin = lambda tokens, fan_in, fan_out: 2.0 * tokens * fan_in * fan_out  # noqa: E731
    total = lin(n, cfg["in_channels"] * p * p, h) + lin(n_ctx, cfg["context_dim"], h)
    total += lin(1, 256, h) + lin(1, h, h) + lin(1, cfg["pooled_dim"], h) + lin(1, h, h)
    for i in range(depth):
        last, dual = i == depth - 1, i in cfg["dual_attention_layers"]
        total += lin(1, h, (9 if dual else 6) * h) + lin(1, h, (2 if last else 6) * h)
        total += lin(n, h, 3 * h) + lin(n, h, h) + 2 * lin(n, h, mlp)
        if last:
            total += lin(n_ctx, h, 2 * h) + 4.0 * n * (n + n_ctx) * h
        else:
            total += lin(n_ctx, h, 3 * h) + lin(n_ctx, h, h) + 2 * lin(n_ctx, h, mlp)
            total += 4.0 * (n + n_ctx) ** 2 * h
        if dual:
            total += lin(n, h, 3 * h) + lin(n, h, h) + 4.0 * n * n * h
    return total + lin(1, h, 2 * h) + lin(n, h, p * p * cfg["out_channels"])


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s ($RECTFLOW_PEAK_TFLOPS, else the table); None when unknown (a CPU)."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)
