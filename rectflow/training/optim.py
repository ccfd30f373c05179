"""The optimizer and its schedules: AdamW (fused where PyTorch has it) or Muon for the blocks' matrices, linear
warm-up with an optional cosine decay, and the moving average of the weights (exponential, or EDM2's power-function
profile).
"""
from __future__ import annotations

import math

import torch

from rectflow.config import TrainConfig
from rectflow.devices import native_bf16
from rectflow.models.layers import BLOCK_LISTS


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class Optimizers:
    """Several optimizers stepped as one (Muon for matrices, AdamW for the rest): the Optimizer methods the trainer
    uses, param_groups being the inner groups themselves (setting their lr sets the inner ones')."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        self.param_groups = [g for opt in optimizers.values() for g in opt.param_groups]

    def __iter__(self):
        """The inner optimizers (torch.distributed.checkpoint's state-dict API takes an iterable of them)."""
        return iter(self.optimizers.values())

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, this run's optimizer has "
                             f"{sorted(self.optimizers)} (was the optimizer changed?)")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def muon_split(model: torch.nn.Module, params) -> tuple[list, list]:
    """(matrices for Muon, the rest for AdamW) of the trainable params: the 2-D weights inside the transformer
    blocks; embedders, the final layer, biases and norms stay with AdamW, as Muon's authors use it."""
    wanted = {id(p) for p in params}
    blocks = {id(p) for name, p in model.named_parameters()
              if p.ndim == 2 and name.split(".")[0] in BLOCK_LISTS}
    ordered = [p for p in model.parameters() if id(p) in wanted]
    return [p for p in ordered if id(p) in blocks], [p for p in ordered if id(p) not in blocks]


def make_optimizer(params, cfg: TrainConfig, model: torch.nn.Module | None = None):
    """The config's optimizer over `params` (a model's parameters, or a list: the trainable ones); muon needs the
    model (which of its parameters are block matrices)."""
    if cfg.optimizer == "muon":
        matrices, rest = muon_split(model, list(params.parameters() if isinstance(params, torch.nn.Module)
                                                else params))
        fp32 = bool(matrices) and not native_bf16(matrices[0].device)
        muon = Muon(matrices, fp32_iterations=fp32, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    adjust_lr_fn="match_rms_adamw")
        return Optimizers(muon=muon, adamw=make_adamw(rest, cfg))
    return make_adamw(params, cfg)


MUON_CHUNK = 16  # matrices orthogonalised together at most


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update (same hyper-parameters, same state dict), with the matrices of one shape
    orthogonalised together: one batched Newton-Schulz chain per shape instead of one per matrix (a model's blocks
    repeat a handful of shapes; bit-identical to torch's per-matrix update, ~20% cheaper for a width-128 model on a
    CPU). fp32_iterations runs the iterations in fp32: torch runs them in bf16, which a CPU without native bf16
    emulates (there they cost ~10x the model's own step). Whole matrices only: the config refuses Muon under FSDP."""

    def __init__(self, params, fp32_iterations: bool = False, **kwargs):
        super().__init__(params, **kwargs)
        self.fp32_iterations = fp32_iterations

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse or torch.is_complex(p) for p in params):
                raise RuntimeError("Muon supports dense real gradients only")
            by_shape: dict[tuple, list] = {}
            for p in params:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for same in by_shape.values():  # in chunks: a stack's copies stay small next to a large model
                for i in range(0, len(same), MUON_CHUNK):
                    self._update(group, same[i:i + MUON_CHUNK])
        return loss

    def _update(self, group: dict, params: list) -> None:
        """Momentum (Nesterov's by default), orthogonalised, at the shape-adjusted rate, of same-shape matrices."""
        grads = [p.grad for p in params]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(g)) for p, g in zip(params, grads)]
        torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
        update = torch.stack(grads).lerp(torch.stack(bufs), group["momentum"]) if group["nesterov"] \
            else torch.stack(bufs)
        dtype = torch.float32 if self.fp32_iterations else torch.bfloat16
        ortho = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
        lr = group["lr"] * muon_lr_ratio(group["adjust_lr_fn"], params[0].shape)
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, list(ortho.unbind(0)), alpha=-lr)


def muon_lr_ratio(adjust_lr_fn: str | None, shape) -> float:
    """Muon's learning-rate factor for an A x B matrix: sqrt(max(1, A/B)) (the original), or 0.2 sqrt(max(A, B))
    (match_rms_adamw: the update's RMS of AdamW's, so AdamW's learning rate carries over)."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols)) if adjust_lr_fn in (None, "original") else 1.0


def newton_schulz(updates: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The orthogonalisation Muon applies to a stack of same-shape updates [n, rows, cols] (the quintic iteration
    X <- aX + (bA + cA^2)X with A = XX^T, on the wide orientation, after scaling each matrix to Frobenius norm 1),
    in `dtype`."""
    a, b, c = ns_coefficients
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def make_adamw(params, cfg: TrainConfig) -> torch.optim.AdamW:
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



def ema_decay_at(update: int, decay: float, warmup: bool, power: float | None = None) -> float:
    """Decay of the `update`-th EMA update (0-based); with warm-up min(decay, (1 + k) / (10 + k)). power: EDM2's
    power-function EMA, (1 - 1 / (k + 1))^(power + 1), the average of the weights along training with density
    ~ t^power (the first update copies the weights)."""
    if power is not None:
        return (1.0 - 1.0 / (update + 1)) ** (power + 1)
    return min(decay, (1 + update) / (10 + update)) if warmup else decay


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)

