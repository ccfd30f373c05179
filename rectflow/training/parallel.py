"""Sharded data parallelism with PyTorch's FSDP2 (`parallel: fsdp`): `fully_shard` on every transformer block, then on
the root (the embedders and the final layer with it), as torchtitan lays its models out; the EMA is sharded the
same way, so its update stays local to each shard. `parallel: hsdp` shards within groups of processes (a node's
GPUs) and replicates across the groups (a 2-D device mesh). Options: bf16 parameters for compute and all-gathers with
fp32 gradient reduction (MixedPrecisionPolicy), and parameters, gradients and optimizer state kept on the CPU
(CPUOffloadPolicy).

Checkpoints stay the run's ordinary files: the full model, EMA and optimizer state are gathered (torch's
distributed state-dict API, full_state_dict on the CPU) and written by rank 0, so a run saved by N processes resumes
on any number, with or without FSDP. The optimizer state is kept keyed by parameter name (the same API's format) in
both directions.
"""
from __future__ import annotations

import os

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from torch.distributed.tensor import DTensor, distribute_tensor

from rectflow.models.layers import BLOCK_LISTS

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
OPTIMIZER_FORMAT = "fqn"  # the training state's marker: the optimizer state is keyed by parameter name


def device_mesh(parallel: str, world: int, shard_size: int, device_type: str):
    """The device mesh of hsdp, (replicate, shard) with shard_size processes per shard group (0: a node's,
    LOCAL_WORLD_SIZE); None for fsdp (fully_shard's default: every process one group)."""
    if parallel != "hsdp":
        return None
    from torch.distributed.device_mesh import init_device_mesh  # needs an initialised process group

    size = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if size < 1 or world % size:
        raise ValueError(f"config key 'fsdp_shard_size': {world} processes do not split into shard groups of {size}")
    return init_device_mesh(device_type, (world // size, size), mesh_dim_names=("replicate", "shard"))


def shard(model: torch.nn.Module, mesh=None, mixed_precision: bool = False, cpu_offload: bool = False
          ) -> torch.nn.Module:
    """fully_shard each transformer block, then the whole model (in place; returns it)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard  # needs a process group

    options = {"mesh": mesh} if mesh is not None else {}
    if mixed_precision:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for name in BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            for block in blocks:
                # FSDP gathers a unit's parameters in its forward hooks: blocks the model drives through their
                # methods instead (DiT's and UViT's stream blocks) stay in the root's unit
                if type(block).forward is not torch.nn.Module.forward:
                    fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters of every sharded module of a model (after forward passes without backward)."""
    from torch.distributed.fsdp import FSDPModule  # the class fully_shard gives its modules

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def all_finite(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer this process holds (its shards) is finite."""
    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in (*model.parameters(), *model.buffers())]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter whole: gathered from its shards (a collective) when it is a DTensor, else itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def copy_full_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- a whole tensor; a sharded dst keeps its own shard of it."""
    if isinstance(dst, DTensor):
        src = distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements)
    dst.copy_(src)


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
