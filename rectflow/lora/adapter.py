"""One layer's LoRA (Adapter) and the exact conversions between rectflow's layout (fused qkv, the released files'
module names) and diffusers' (q, k, v separate), module by module (rectflow.lora explains the rules)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from rectflow.models.layouts import CONTEXT_BLOCK, GLOBAL, X_BLOCK


@dataclass
class Adapter:
    """One layer's LoRA: down A [r, in], up B [out, r], alpha (the update is alpha / r * B @ A)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update alpha / r * B @ A [out, in], in float32."""
        return (self.up.float() @ self.down.float()) * self.scale


# ----- released <-> diffusers module names -----------------------------------------------------------------------

def _tables():
    """(released -> diffusers modules, diffusers module -> (released, part, parts)) over block-relative names."""
    forward = {}
    for stream, table in (("x_block", X_BLOCK), ("context_block", CONTEXT_BLOCK)):
        for r, d in table:
            forward[f"{stream}.{r}"] = d
    reverse = {m: (r, i, len(d)) for r, d in forward.items() for i, m in enumerate(d)}
    return forward, reverse


BLOCK_FORWARD, BLOCK_REVERSE = _tables()
GLOBAL_FORWARD = dict(GLOBAL)
GLOBAL_REVERSE = {d[0]: r for r, d in GLOBAL}


def diffusers_modules(module: str) -> tuple[str, ...]:
    """The diffusers module(s) of a released-layout module (three for a fused qkv)."""
    m = re.fullmatch(r"joint_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in BLOCK_FORWARD:
        return tuple(f"transformer_blocks.{m.group(1)}.{d}" for d in BLOCK_FORWARD[m.group(2)])
    if module in GLOBAL_FORWARD:
        return GLOBAL_FORWARD[module]
    raise ValueError(f"module {module!r} has no diffusers counterpart")


def released_module(module: str) -> tuple[str, int, int]:
    """(released module, part, parts) of a diffusers module: to_k is part 1 of 3 of its stream's qkv."""
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in BLOCK_REVERSE:
        r, i, n = BLOCK_REVERSE[m.group(2)]
        return f"joint_blocks.{m.group(1)}.{r}", i, n
    if module in GLOBAL_REVERSE:
        return GLOBAL_REVERSE[module], 0, 1
    raise ValueError(f"module {module!r} is not a module of diffusers' SD3Transformer2DModel")


def _swapped(module: str, adapter: Adapter) -> bool:
    """Whether diffusers orders this module's output rows (scale, shift): the final adaLN, and the pre-only last
    context block's, recognised by its two outputs per hidden unit."""
    if module == "final_layer.adaLN_modulation.1":
        return True
    return module.endswith("context_block.adaLN_modulation.1") and adapter.up.shape[0] == 2 * adapter.down.shape[1]


def _swap_up(adapter: Adapter) -> Adapter:
    """The same adapter with B's two row halves exchanged."""
    a, b = adapter.up.chunk(2, dim=0)
    return Adapter(adapter.down, torch.cat([b, a], dim=0), adapter.alpha)


def split(adapter: Adapter, parts: int) -> list[Adapter]:
    """A fused adapter as `parts` adapters of its output row blocks: per part A, B block and alpha of a block-diagonal
    fused one (see fuse), else the shared A with each B row block (exact either way)."""
    rows = adapter.up.chunk(parts, dim=0)
    r = adapter.rank
    if r % parts == 0 and parts > 1:
        k = r // parts
        blocks = [row.split(k, dim=1) for row in rows]
        if all(not blk.any() for i, row in enumerate(blocks) for j, blk in enumerate(row) if i != j):
            return [Adapter(down, blocks[i][i], adapter.alpha / parts)
                    for i, down in enumerate(adapter.down.split(k, dim=0))]
    return [Adapter(adapter.down, row, adapter.alpha) for row in rows]


def fuse(adapters: list[Adapter], source: str = "LoRA") -> Adapter:
    """The fused adapter of q, k, v (or any row blocks): the shared A when they share one (same alpha), else
    block-diagonal with A stacked (needs one scale alpha / r for all)."""
    first = adapters[0]
    if all(a.down.shape == first.down.shape and torch.equal(a.down, first.down) and a.alpha == first.alpha
           for a in adapters):
        return Adapter(first.down, torch.cat([a.up for a in adapters], dim=0), first.alpha)
    scales = {a.scale for a in adapters}
    if len(scales) > 1:
        raise ValueError(f"{source}: the q, k, v LoRAs have different scales alpha / rank {sorted(scales)}; they "
                         f"cannot be fused exactly into one qkv LoRA")
    up = torch.block_diag(*[a.up for a in adapters])
    down = torch.cat([a.down for a in adapters], dim=0)
    return Adapter(down, up, first.scale * down.shape[0])


def to_diffusers(lora: dict[str, Adapter]) -> dict[str, Adapter]:
    """rectflow-layout adapters -> diffusers-module adapters (fused qkv split, adaLN halves swapped)."""
    out = {}
    for module, adapter in lora.items():
        if _swapped(module, adapter):
            adapter = _swap_up(adapter)
        targets = diffusers_modules(module)
        for target, part in zip(targets, split(adapter, len(targets)) if len(targets) > 1 else [adapter]):
            out[target] = part
    return out


def from_diffusers(lora: dict[str, Adapter], source: str = "LoRA") -> dict[str, Adapter]:
    """diffusers-module adapters -> rectflow layout (q, k, v fused; a qkv needs all three or a zero part is used)."""
    groups: dict[str, list] = {}
    for module, adapter in lora.items():
        released, i, n = released_module(module)
        groups.setdefault(released, [None] * n)[i] = adapter
    out = {}
    for released, parts in groups.items():
        if any(p is None for p in parts):
            # a LoRA on some of q, k, v only: the missing ones are zero updates of the same rank and scale
            ref = next(p for p in parts if p is not None)
            parts = [p if p is not None else Adapter(torch.zeros_like(ref.down), torch.zeros_like(ref.up), ref.alpha)
                     for p in parts]
        adapter = parts[0] if len(parts) == 1 else fuse(parts, f"{source}: {released}")
        out[released] = _swap_up(adapter) if _swapped(released, adapter) else adapter
    return out
