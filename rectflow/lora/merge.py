"""Applying LoRA files to a model: shape checks, and merging W + scale * alpha / r * B A into its weights."""
from __future__ import annotations

import torch
import torch.nn as nn

from rectflow.lora.adapter import Adapter
from rectflow.lora.formats import parse_spec, read_lora


def check_lora(model: nn.Module, lora: dict[str, Adapter], source) -> None:
    """Every adapted module must be a linear layer of the model with the adapter's shapes."""
    modules = dict(model.named_modules())
    problems = []
    for name, a in sorted(lora.items()):
        layer = modules.get(name)
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        if weight is None or weight.ndim != 2:
            problems.append(f"{name}: not a linear layer of this model")
        elif (a.up.shape[0], a.down.shape[1]) != tuple(weight.shape):
            problems.append(f"{name}: LoRA is {a.up.shape[0]} x {a.down.shape[1]}, the layer {tuple(weight.shape)}")
    if problems:
        more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ValueError(f"{source} does not fit this model: {'; '.join(problems[:4])}{more}")


@torch.no_grad()
def merge(model: nn.Module, lora: dict[str, Adapter], scale: float = 1.0, source="LoRA") -> None:
    """W <- W + scale * alpha / r * B @ A for every adapted layer (in float32, stored in W's dtype)."""
    check_lora(model, lora, source)
    modules = dict(model.named_modules())
    for name, a in lora.items():
        w = modules[name].weight
        w.copy_((w.float() + scale * a.delta().to(w.device)).to(w.dtype))


def apply_loras(model: nn.Module, specs) -> list[dict]:
    """Merge each 'FILE[:SCALE]' LoRA (any format) into the model in turn; returns [{file, scale, format}]."""
    applied = []
    for spec in specs or ():
        path, scale = parse_spec(spec)
        lora, fmt = read_lora(path)
        merge(model, lora, scale, source=f"LoRA file {path}")
        applied.append({"file": str(path), "scale": scale, "format": fmt})
    return applied
