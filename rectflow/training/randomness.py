"""Randomness as pure functions of (seed, step, purpose): every draw of a training step comes from its own seeded
generator, so step n sees the same inputs whether or not the run was interrupted; the global generators' states are
saved in checkpoints for whatever else draws from them.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_for(seed: int, step: int, purpose: str, index: int = 0) -> int:
    """A 63-bit seed derived from (seed, step, purpose, index), so no generator state has to be carried."""
    digest = hashlib.sha256(f"{seed}/{step}/{purpose}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator_for(seed: int, step: int, purpose: str, index: int = 0) -> torch.Generator:
    """A CPU generator for one purpose of one step."""
    return torch.Generator().manual_seed(seed_for(seed, step, purpose, index))



def rng_states() -> dict:
    """RNG states of every global generator (the trainer's own draws use step-seeded generators)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def set_rng_states(states: dict) -> None:
    """Restore what rng_states saved."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, keys, internal = states["python"]
    random.setstate((version, tuple(keys), internal))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))

