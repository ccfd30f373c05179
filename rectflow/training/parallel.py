"""Sharded data parallelism with PyTorch's FSDP2 (`parallel: fsdp`): `fully_shard` on every transformer block, then on
the root (the embedders and the final layer with it), as torchtitan lays its models out; the EMA is sharded the
same way, so its update stays local to each shard.

Checkpoints stay the run's ordinary files: the full model, EMA and optimizer state are gathered (torch's
distributed state-dict API, full_state_dict on the CPU) and written by rank 0, so a run saved by N processes resumes
on any number, with or without FSDP. The optimizer state is kept keyed by parameter name (the same API's format) in
both directions.
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from rectflow.models.layers import BLOCK_LISTS

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
OPTIMIZER_FORMAT = "fqn"  # the training state's marker: the optimizer state is keyed by parameter name


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """fully_shard each transformer block, then the whole model (in place; returns it)."""
    from torch.distributed.fsdp import fully_shard  # needs an initialised process group

    for name in BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            for block in blocks:
                fully_shard(block)
    fully_shard(model)
    return model


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU (a collective: every rank calls it; rank 0 gets the tensors)."""
    return get_model_state_dict(model, options=FULL)


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, gathered on the CPU (a collective)."""
    return get_optimizer_state_dict(model, opt, options=FULL)


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict into a sharded (or plain) model: each rank keeps its shard."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a name-keyed optimizer state (full_optimizer_state's) into a sharded or plain model's optimizer; not
    strict: a parameter that never had a gradient (the pre-only block's query norm) has no state to load."""
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True, strict=False))
