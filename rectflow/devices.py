"""The one device resolver: a `--device` / config value ('auto', 'cpu', 'cuda', 'cuda:N') to a torch.device."""
from __future__ import annotations

import torch

CHOICES = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(spec: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' -> cuda when available, else cpu; under torchrun (local_rank given) a cuda device is cuda:LOCAL_RANK."""
    if isinstance(spec, torch.device):
        device = spec
    else:
        if spec == "auto":
            spec = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise ValueError(f"device {spec!r}: expected {CHOICES}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(spec)!r}: this torch build or machine has no CUDA device (torch "
                         f"{torch.__version__}); use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(spec)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device {str(spec)!r}: expected {CHOICES}")
    if device.type == "cuda" and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device
