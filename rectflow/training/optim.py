"""The optimizer and its schedules: AdamW (fused where PyTorch has it), linear warm-up with an optional cosine decay,
and the exponential moving average of the weights.
"""
from __future__ import annotations

import math

import torch

from rectflow.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW of the config over `params` (a model's parameters, or a list: the trainable ones): the fused kernel (all
    tensors in one pass) where PyTorch has it for the parameters (float32 on CPU or CUDA), else PyTorch's default
    implementation.

    A resumed run keeps the implementation its checkpoint was written with (load_state_dict restores the param
    groups' `fused` flag), so runs checkpointed before the fused kernel was used continue exactly.
    """
    params = list(params.parameters() if isinstance(params, torch.nn.Module) else params)
    # sharded (DTensor) parameters take the default implementation
    fused = getattr(torch, "_fused_adamw_", None) is not None and all(
        p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") and type(p.data) is torch.Tensor
        for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.effective_adam_eps,
                             weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))



def ema_decay_at(update: int, decay: float, warmup: bool) -> float:
    """Decay of the `update`-th EMA update (0-based); with warm-up min(decay, (1 + k) / (10 + k))."""
    return min(decay, (1 + update) / (10 + update)) if warmup else decay


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)

