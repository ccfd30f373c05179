"""rectflow: rectified-flow transformers for text-to-image synthesis (Esser et al. 2024, "SD3").

Public API (DESIGN.md): Formulation, shift_time, sampling.time_grid, MMDiT.
Submodules are imported lazily so `import rectflow` stays light.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Formulation": "rectflow.flow",
    "shift_time": "rectflow.flow",
    "paper_grid": "rectflow.flow",
    "MMDiT": "rectflow.models.mmdit",
}
_SUBMODULES = {"flow", "sampling", "models", "checkpoints", "data", "text", "autoencoder", "config", "train", "sample",
               "demo", "distributed", "evaluate", "ablate", "studies"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"rectflow.{name}")
    raise AttributeError(f"module 'rectflow' has no attribute {name!r}")


__all__ = list(_LAZY) + sorted(_SUBMODULES)
