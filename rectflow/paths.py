"""Forward processes z_t = a_t x0 + b_t eps (docs/paper.md §1): each path's a_t, b_t, their derivatives and
lambda_t = log(a_t^2 / b_t^2). t in [0, 1], t = 0 data, t = 1 noise.
"""
from __future__ import annotations

import functools
import math

import torch

SIGMA_MAX = 80.0  # EDM's sigma(1) is infinite; sampling starts at Karras et al.'s sigma_max
LDM_BETA_START, LDM_BETA_END, LDM_STEPS = 0.00085, 0.012, 1000  # the usual LDM values (docs/paper.md §1)


def _time(t) -> torch.Tensor:
    """t as a tensor; python numbers become float64 scalars so solver coefficients keep full precision."""
    return t if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=torch.float64)


def _expand(c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A per-sample (shape [B]) or scalar coefficient, in z's dtype and shaped to broadcast over z."""
    c = c.to(device=z.device, dtype=z.dtype)
    return c.reshape(c.shape + (1,) * (z.ndim - c.ndim)) if c.ndim else c


class Path:
    """z_t = a_t x0 + b_t eps; subclasses give a, b, da, db, from_rf_time (the t at which b/a equals rf's
    t/(1-t), 1 past the path's lowest SNR) and override lambda where a closed form is more stable."""

    t_max = 1.0  # largest t with finite coefficients

    def to_rf_time(self, t):
        """rf's time at the same log-SNR, b / (a + b) = sigmoid(-lambda / 2); the inverse of from_rf_time."""
        return torch.sigmoid(-self.lam(t) / 2)

    def lam(self, t):
        """Log signal-to-noise ratio lambda_t = 2 log(a_t / b_t)."""
        return 2 * (torch.log(self.a(t)) - torch.log(self.b(t)))

    def dlam(self, t):
        """lambda'_t = 2 (a'/a - b'/b)."""
        return 2 * (self.da(t) / self.a(t) - self.db(t) / self.b(t))


class RectifiedPath(Path):
    """Rectified flow: a = 1 - t, b = t."""

    def a(self, t):
        return 1 - t

    def b(self, t):
        return t.clone()

    def da(self, t):
        return -torch.ones_like(t)

    def db(self, t):
        return torch.ones_like(t)

    def lam(self, t):
        return 2 * (torch.log1p(-t) - torch.log(t))

    def dlam(self, t):
        return -2 / (t * (1 - t))

    def from_rf_time(self, t):
        return t

    def to_rf_time(self, t):
        return t


class CosinePath(Path):
    """Cosine: a = cos(pi t / 2), b = sin(pi t / 2), written with sines so a(1) = 0 and b(1) = 1 exactly."""

    def a(self, t):
        return torch.sin(math.pi / 2 * (1 - t))

    def b(self, t):
        return torch.sin(math.pi / 2 * t)

    def da(self, t):
        return -math.pi / 2 * self.b(t)

    def db(self, t):
        return math.pi / 2 * self.a(t)

    def dlam(self, t):
        return -math.pi / (self.a(t) * self.b(t))  # -2 pi / sin(pi t)

    def from_rf_time(self, t):
        return 2 / math.pi * torch.atan2(t, 1 - t)  # tan(pi t_cos / 2) = t / (1 - t)


@functools.lru_cache(maxsize=1)
def ldm_log_alphabar() -> torch.Tensor:
    """log alphabar at t = j / T, j = 0..T: 0 (data) then the LDM discrete steps 0..T-1 (float64)."""
    i = torch.arange(LDM_STEPS, dtype=torch.float64)
    root = math.sqrt(LDM_BETA_START) + i / (LDM_STEPS - 1) * (math.sqrt(LDM_BETA_END) - math.sqrt(LDM_BETA_START))
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-root**2), 0)])


class LinearVPPath(Path):
    """LDM's discrete schedule made continuous: discrete step i sits at t = (i + 1) / T, t = 0 is clean data,
    log alphabar is linear in t between these nodes; a = sqrt(alphabar), b = sqrt(1 - alphabar)."""

    def _log_alphabar(self, t):
        """(log alphabar(t), its slope in t) from the piecewise-linear interpolation of the nodes."""
        nodes = ldm_log_alphabar().to(t.device)
        x = t.to(torch.float64) * LDM_STEPS
        j = x.floor().clamp(0, LDM_STEPS - 1).long()
        slope = nodes[j + 1] - nodes[j]
        return (nodes[j] + (x - j) * slope).to(t.dtype), (slope * LDM_STEPS).to(t.dtype)

    def a(self, t):
        return torch.exp(self._log_alphabar(t)[0] / 2)

    def b(self, t):
        return torch.sqrt(-torch.expm1(self._log_alphabar(t)[0])).abs()  # abs: +0, not -0, at t = 0

    def da(self, t):
        log_ab, k = self._log_alphabar(t)
        return 0.5 * k * torch.exp(log_ab / 2)

    def db(self, t):
        log_ab, k = self._log_alphabar(t)
        return -0.5 * k * torch.exp(log_ab) / torch.sqrt(-torch.expm1(log_ab))

    def lam(self, t):
        log_ab = self._log_alphabar(t)[0]
        return log_ab - torch.log(-torch.expm1(log_ab))

    def dlam(self, t):
        log_ab, k = self._log_alphabar(t)
        return k / -torch.expm1(log_ab)

    def from_rf_time(self, t):
        # alphabar = a^2 / (a^2 + b^2) at rf's ratio b/a = t/(1-t); past the last node (SNR below LDM's) -> t = 1
        t64 = t.to(torch.float64)
        log_ab = 2 * torch.log1p(-t64) - torch.log((1 - t64) ** 2 + t64**2)
        nodes = ldm_log_alphabar().to(t.device)
        j = (torch.searchsorted(-nodes, -log_ab, right=True) - 1).clamp(0, LDM_STEPS - 1)
        frac = ((log_ab - nodes[j]) / (nodes[j + 1] - nodes[j])).clamp(max=1)
        return ((j + frac) / LDM_STEPS).to(t.dtype)


class EDMPath(Path):
    """EDM (docs/paper.md §1): a = 1, b = sigma(t); subclasses give log sigma, sigma' and lambda' = -2 sigma'/sigma."""

    def a(self, t):
        return torch.ones_like(t)

    def da(self, t):
        return torch.zeros_like(t)

    def b(self, t):
        return torch.exp(self.log_sigma(t))

    def lam(self, t):
        return -2 * self.log_sigma(t)


class LogNormalSigma(EDMPath):
    """edm(Pm, Ps): log sigma = Pm + Ps Phi^-1(t), so lambda ~ N(-2 Pm, (2 Ps)^2) for t ~ U(0, 1)."""

    def __init__(self, p_mean: float, p_std: float):
        self.p_mean, self.p_std = p_mean, p_std
        # Phi rounds to 1 in float64 above ~8.3 standard deviations: stop at the last double below 1 then
        self.t_max = min(float(torch.special.ndtr(torch.tensor((math.log(SIGMA_MAX) - p_mean) / p_std,
                                                              dtype=torch.float64))), 1 - 2**-53)

    def log_sigma(self, t):
        return self.p_mean + self.p_std * torch.special.ndtri(t)

    def dlam(self, t):
        u = torch.special.ndtri(t)
        return -2 * self.p_std * math.sqrt(2 * math.pi) * torch.exp(u**2 / 2)  # -2 Ps / phi(u)

    def from_rf_time(self, t):
        # Phi(x) as erfc(-x / sqrt 2) / 2: torch's ndtr (1 + erf) / 2 rounds to 0 below x ~ -8.3, where grids near
        # the data still need distinct times
        x = (torch.log(t) - torch.log1p(-t) - self.p_mean) / self.p_std
        return torch.special.erfc(-x / math.sqrt(2)) / 2

    def db(self, t):
        return -self.b(t) * self.dlam(t) / 2


class RFSigma(EDMPath):
    """edm/rf: sigma = t / (1 - t), the noise-to-signal ratio of rf, so lambda_t equals rf's at every t."""

    t_max = SIGMA_MAX / (1 + SIGMA_MAX)

    def log_sigma(self, t):
        return torch.log(t) - torch.log1p(-t)

    def db(self, t):
        return 1 / (1 - t) ** 2

    # rf's log-SNR at every t: its lambda', and rf time is this path's own time
    dlam, from_rf_time, to_rf_time = RectifiedPath.dlam, RectifiedPath.from_rf_time, RectifiedPath.to_rf_time


class CosSigma(EDMPath):
    """edm/cos: sigma = tan(pi t / 2), the noise-to-signal ratio of cos, so lambda_t equals cos's at every t."""

    t_max = 2 / math.pi * math.atan(SIGMA_MAX)

    def log_sigma(self, t):
        return torch.log(torch.sin(math.pi / 2 * t)) - torch.log(torch.sin(math.pi / 2 * (1 - t)))

    def db(self, t):
        return math.pi / 2 / torch.sin(math.pi / 2 * (1 - t)) ** 2

    def dlam(self, t):
        return -math.pi / (torch.sin(math.pi / 2 * t) * torch.sin(math.pi / 2 * (1 - t)))

    def from_rf_time(self, t):
        return 2 / math.pi * torch.atan2(t, 1 - t)
