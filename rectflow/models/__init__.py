"""Network architectures: MM-DiT (PAPER.md section 4) and its building blocks."""
from rectflow.models.mmdit import MMDiT

__all__ = ["MMDiT"]
