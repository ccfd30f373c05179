"""The one device resolver: a `--device` / config value ('auto', 'cpu', 'cuda', 'cuda:N') to a torch.device;
and whether a device runs bf16 natively."""
from __future__ import annotations

import os

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


def native_bf16(device: torch.device) -> bool:
    """Whether the device runs bf16 matmuls natively: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX
    (elsewhere CPU bf16 is emulated: 1024^2 matmuls on one thread ran at 0.9 GFLOPS against 79 in fp32 on an
    AVX2-only EPYC, 30 against 108 on an AVX-512 Xeon without AVX512-BF16).
    RECTFLOW_CPU_BF16=1 or 0 overrides the CPU check."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    forced = os.environ.get("RECTFLOW_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(checks):  # a torch without these probes: assume native, as before
        return True
    return any(check() for check in checks if check is not None)
