"""Timestep samplers pi(t) of rectified flow (docs/paper.md §2): the densities training times are drawn from.

Each sampler draws n times in float64 from a generator (the same numbers whatever device they go to) and gives its
density, which rectflow.flow folds into the loss weight (drawing t ~ pi equals weighting uniform t by pi(t)).
"""
from __future__ import annotations

import math

import torch


def _uniform(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n uniform draws in float64 on the generator's device (same numbers whatever device they go to)."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


class Uniform:
    """t ~ U(0, 1)."""

    def draw(self, n, generator):
        return _uniform(n, generator)

    def density(self, t):
        return torch.ones_like(t)


class LogitNormal:
    """lognorm(m, s): t = sigmoid(u), u ~ N(m, s)."""

    def __init__(self, m: float, s: float):
        self.m, self.s = m, s

    def draw(self, n, generator):
        device = generator.device if generator is not None else "cpu"
        u = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        return torch.sigmoid(self.m + self.s * u)

    def density(self, t):
        logit = torch.log(t) - torch.log1p(-t)
        return torch.exp(-((logit - self.m) ** 2) / (2 * self.s**2)) / (self.s * math.sqrt(2 * math.pi) * t * (1 - t))


class ModeSampler:
    """mode(s): t = f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1); decreasing for -1 <= s <= 1.75."""

    def __init__(self, s: float):
        self.s = s

    def f(self, u):
        return 1 - u - self.s * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)

    def df(self, u):
        return -1 - self.s * (1 - math.pi / 2 * torch.sin(math.pi * u))

    def draw(self, n, generator):
        return self.f(_uniform(n, generator))

    def inverse(self, t):
        """u with f_mode(u) = t, by bisection (f_mode is decreasing from 1 to 0)."""
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = self.f(mid) > t  # still above t: the root lies to the right
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2

    def density(self, t):
        return 1 / self.df(self.inverse(t)).abs()


class CosMap:
    """cosmap: t = 1 - 1 / (tan(pi u / 2) + 1), u ~ U(0, 1): rf's log-SNR then follows cos's."""

    def draw(self, n, generator):
        return 1 - 1 / (torch.tan(math.pi / 2 * _uniform(n, generator)) + 1)

    def density(self, t):
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
