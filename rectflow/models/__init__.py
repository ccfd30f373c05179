"""Network architectures: MM-DiT (docs/paper.md §4) and its building blocks."""
from rectflow.models.mmdit import MMDiT

__all__ = ["MMDiT"]
