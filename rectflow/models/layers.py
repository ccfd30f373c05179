"""Shared MM-DiT pieces (docs/paper.md §4): patch, position, timestep and vector embedders, QK norms, MLP, adaLN.

Module and parameter names mirror the released SD3 checkpoints (`x_embedder.proj`, `t_embedder.mlp.0`, `mlp.fc1`,
`attn.ln_q`, ...), so a released state dict loads without renaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

FREQUENCY_DIM = 256  # width of the sinusoidal timestep features (SD3)
# t in [0, 1] is embedded as t * 1000, as SD3 does (docs/paper.md §4), so released weights work unchanged
TIME_SCALE = 1000.0


def timestep_features(t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos | sin] of the (already scaled) times t [B] -> [B, dim], in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32, device=t.device))
    args = t.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin-cos features [sin | cos] of positions pos [N] -> [N, dim], computed in float64."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.to(torch.float64)[:, None] * omega
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(pos_y: torch.Tensor, pos_x: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sin-cos position embedding of the grid pos_y x pos_x -> [len(y) * len(x), dim], row-major tokens.

    The first half of the channels encodes the column (x) position and the second half the row (y): the channel
    order of the released SD3 tables.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    h, w = len(pos_y), len(pos_x)
    ex = sincos_1d(pos_x, dim // 2)[None, :, :].expand(h, w, dim // 2)
    ey = sincos_1d(pos_y, dim // 2)[:, None, :].expand(h, w, dim // 2)
    return torch.cat([ex, ey], dim=-1).reshape(h * w, dim)


def position_grid(n: int, ref: float, scale: float, total: int | None = None) -> torch.Tensor:
    """The paper's extended-and-interpolated positions along one axis (docs/paper.md §4 "Mixed aspect ratios").

    A grid of `total` tokens (default n) centred on a reference side of `ref` tokens: (p - (total - ref) / 2) * scale,
    then centre-cropped to n tokens. scale = base / ref maps the reference side onto the pretraining grid.
    """
    total = n if total is None else total
    pos = (torch.arange(total, dtype=torch.float64) - (total - ref) / 2) * scale
    top = (total - n) // 2
    return pos[top:top + n]


class PatchEmbed(nn.Module):
    """Cut a latent [B, C, H, W] into p x p patches and project each to the hidden width -> tokens [B, H/p * W/p, h]."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        # A Conv2d holds the weights so the keys and shapes match the released files; forward uses one matmul.
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patchify with a reshape and project with one linear (cheaper than a strided conv, forward and backward)."""
        b, c, hh, ww = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.weight.shape[0], -1), self.proj.bias)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of t * 1000 -> MLP (Linear, SiLU, Linear) -> [B, h]."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed times t [B] in [0, 1]."""
        features = timestep_features(t.float() * TIME_SCALE)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class VectorEmbedder(nn.Module):
    """A flat vector (the pooled text embedding y) -> MLP (Linear, SiLU, Linear) -> [B, h]."""

    def __init__(self, input_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Embed y [B, input_dim]."""
        return self.mlp(y)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale over the last dimension (QK-normalisation, docs/paper.md §4), eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise x [..., dim]."""
        # weight cast to x's dtype keeps the fused kernel under bf16 autocast
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


def make_qk_norm(kind: str | None, head_dim: int) -> nn.Module | None:
    """The per-head Q/K normalisation: "rms" (SD3.5), "ln" (LayerNorm with affine) or None."""
    if kind is None:
        return None
    if kind == "rms":
        return RMSNorm(head_dim)
    if kind == "ln":
        return nn.LayerNorm(head_dim, eps=1e-6)
    raise ValueError(f"qk_norm must be None, 'rms' or 'ln', got {kind!r}")


class Mlp(nn.Module):
    """Transformer MLP: fc1 -> tanh GELU -> fc2 (ratio 4 in SD3)."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP token-wise."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def cpu_autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The low-precision dtype when x lives on the CPU under autocast, else None."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim, eps 1e-6, no affine (adaLN's norm, docs/paper.md §4).

    Under CPU autocast the fp32 residual stream is cast before the norm, so the norm, the modulation and the next
    matmul run in bf16 with one cast instead of fp32 passes and a cast at the matmul (about 10% of a bf16 training
    step at hidden 128); the result is rounded to bf16 before the matmul either way.
    """
    dtype = cpu_autocast_dtype(x)
    if dtype is not None:
        x = x.to(dtype)
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: LayerNorm(x) (eps 1e-6, no affine) * (1 + scale) + shift, with shift, scale [B, h] (docs/paper.md §4)."""
    normed = layer_norm(x)
    return torch.addcmul(shift.unsqueeze(1), normed, (1 + scale).unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y with gate [B, h] broadcast over tokens (one fused op)."""
    return torch.addcmul(x, gate.unsqueeze(1), y)


def init_weights(model: nn.Module) -> None:
    """DiT-style init shared by MM-DiT and the baselines: xavier linears and patch embedding, N(0, 0.02) embedder
    MLPs, and zero adaLN modulations and final projection, so every block starts as the identity and the output at 0."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    w = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    for mlp in (model.t_embedder.mlp, model.y_embedder.mlp):
        nn.init.normal_(mlp[0].weight, std=0.02)
        nn.init.normal_(mlp[2].weight, std=0.02)
    for module in model.modules():
        if hasattr(module, "adaLN_modulation"):
            nn.init.zeros_(module.adaLN_modulation[1].weight)
            nn.init.zeros_(module.adaLN_modulation[1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


def embed_inputs(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    """The forward prelude shared by MM-DiT and the baselines: (image tokens + positions, SiLU(c), h, w, dtype)."""
    b, _, height, width = x.shape
    p = model.patch_size
    if height % p or width % p:
        raise ValueError(f"input {height} x {width} is not divisible by the patch size {p}")
    h, w = height // p, width // p
    t = t.expand(b) if t.ndim == 0 else t
    dtype = model.x_embedder.proj.weight.dtype  # the residual stream's dtype: fp32 under autocast
    x, y = x.to(dtype), y.to(dtype)  # lets a model cast to bf16 take fp32 inputs
    tokens = model.x_embedder(x) + model.position_embedding(h, w).to(dtype)
    c_act = F.silu(model.t_embedder(t) + model.y_embedder(y))  # every adaLN starts with SiLU(c): compute it once
    return tokens, c_act, h, w, dtype


def unpatchify(out: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """Patch outputs [B, h * w, p * p * C] (ordered p, p, C, as the released MM-DiT) -> image [B, C, h p, w p]."""
    out = out.reshape(out.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(out.shape[0], c, h * p, w * p)


BLOCK_LISTS = ("joint_blocks", "blocks", "context_blocks")  # the transformer blocks of MM-DiT and the baselines


def compile_blocks(model: nn.Module) -> nn.Module:
    """torch.compile each transformer block in place (nn.Module.compile: the state dict keeps its keys, and a block
    compiles once for all its calls); a model without block lists is compiled whole."""
    lists = [getattr(model, name) for name in BLOCK_LISTS if isinstance(getattr(model, name, None), nn.ModuleList)]
    if not lists:
        model.compile()
    for blocks in lists:
        for block in blocks:
            block.compile()
    return model
