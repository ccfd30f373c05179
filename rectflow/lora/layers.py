"""Training LoRAs with peft: which linear layers (presets, regexes, blocks), attaching float32 adapters to a frozen
model, and reading / restoring the trained adapters as rectflow.lora Adapters."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from rectflow.lora.adapter import Adapter

# target presets (regexes over module names; anything else given is itself a regex)
TARGETS = {
    "attn": r"joint_blocks\.\d+\.(x|context)_block\.attn2?\.(qkv|proj)",
    "attn-mlp": r"joint_blocks\.\d+\.(x|context)_block\.(attn2?\.(qkv|proj)|mlp\.fc[12])",
    "all-linear": r".*",
}


def parse_blocks(spec: str | None) -> set[int] | None:
    """'0-5,12' -> {0, 1, 2, 3, 4, 5, 12}; None or '' -> None (all blocks)."""
    if not spec:
        return None
    blocks = set()
    for part in str(spec).split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            lo_i, hi_i = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"lora_blocks: {part.strip()!r} in {spec!r} is not a block index or range like 0-5")
        if lo_i < 0 or hi_i < lo_i:
            raise ValueError(f"lora_blocks: bad range {part.strip()!r} in {spec!r}")
        blocks |= set(range(lo_i, hi_i + 1))
    return blocks


def select_modules(model: nn.Module, targets: str, blocks: str | None = None) -> list[str]:
    """Names of the linear layers a LoRA adapts: `targets` is a preset of TARGETS or a regex matched against
    whole module names; `blocks` restricts block modules to those joint blocks."""
    pattern = TARGETS.get(targets, targets)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"lora_targets: {targets!r} is neither a preset {list(TARGETS)} nor a regex ({err})")
    wanted = parse_blocks(blocks)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not regex.fullmatch(name):
            continue
        m = re.match(r"joint_blocks\.(\d+)\.", name)
        if wanted is not None and (m is None or int(m.group(1)) not in wanted):
            continue
        names.append(name)
    if not names:
        raise ValueError(f"lora_targets {targets!r} with lora_blocks {blocks!r} selects no linear layer of the model")
    depth = len(getattr(model, "joint_blocks", []))
    if wanted is not None and max(wanted) >= depth:
        raise ValueError(f"lora_blocks {blocks!r}: the model has blocks 0-{depth - 1}")
    return names


def attach(model: nn.Module, rank: int, alpha: float | None, targets: str = "attn", blocks: str | None = None,
           dropout: float = 0.0) -> list[str]:
    """Add trainable LoRA layers (peft, zero-initialised B so the model is unchanged) to the selected linear layers
    and freeze everything else; the LoRA weights are float32 whatever the base's dtype. Returns the module names."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    names = select_modules(model, targets, blocks)
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=names,
                        lora_dropout=dropout, bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    return names


def _lora_layers(model: nn.Module):
    """(module name, peft LoRA layer) pairs of a model with attached LoRAs."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            yield name, module


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """The model's attached LoRAs (views of the trained weights) as {module name: Adapter}."""
    return {name: Adapter(m.lora_A["default"].weight, m.lora_B["default"].weight, float(m.lora_alpha["default"]))
            for name, m in _lora_layers(model)}


@torch.no_grad()
def load_adapters(model: nn.Module, lora: dict[str, Adapter], source="LoRA", copy=None) -> None:
    """Copy a LoRA into the model's attached layers (resume): the same modules, ranks and alphas. copy(dst, src):
    how (a sharded model's scatters the whole tensor into its shards)."""
    copy = copy or (lambda dst, src: dst.copy_(src))
    have = adapters(model)
    if set(have) != set(lora):
        missing, extra = sorted(set(have) - set(lora)), sorted(set(lora) - set(have))
        raise ValueError(f"{source}: LoRA modules differ from the run's (missing {missing[:3]}, extra {extra[:3]})")
    for name, a in lora.items():
        if (have[name].down.shape, have[name].up.shape, have[name].alpha) != (a.down.shape, a.up.shape, a.alpha):
            raise ValueError(f"{source}: {name} has rank/alpha {a.rank}/{a.alpha}, the run "
                             f"{have[name].rank}/{have[name].alpha}")
        copy(have[name].down, a.down)
        copy(have[name].up, a.up)
