"""Formulations of the formulation study (docs/paper.md §1, 2, 3 and 5): a path, a prediction target, a t sampler
and a loss weight under one name. The paths are in rectflow.paths, the t samplers in rectflow.timesteps.

z_t = a_t x0 + b_t eps, t in [0, 1], t = 0 data, t = 1 noise. A Formulation combines
  - a path (a_t, b_t): rectified flow, the LDM discrete variance-preserving schedule, cosine, or EDM's sigma(t);
  - what the network predicts: the velocity eps - x0, eps, v = a eps - b x0, EDM's preconditioned F, or x0 itself
    (x/..., trained with the velocity loss: JiT, docs/formulations.md);
  - the density pi(t) training times are drawn from: uniform, logit-normal, mode, cosmap (docs/paper.md §2);
and a per-sample loss equal to -1/2 (w_t / pi(t)) lambda'_t ||eps_hat - eps||^2, so that its expectation over
t ~ pi is the paper's objective L_w with weight w_t (docs/paper.md §1). docs/formulations.md maps every name to its
formulas.
"""
from __future__ import annotations

import math
import re

import torch

from rectflow.paths import (LDM_BETA_END, LDM_BETA_START, LDM_STEPS, SIGMA_MAX, CosinePath,  # noqa: F401
                            CosSigma, EDMPath, LinearVPPath, LogNormalSigma, Path, RectifiedPath, RFSigma,
                            _expand, _time, ldm_log_alphabar)
from rectflow.timesteps import CosMap, LogitNormal, ModeSampler, Uniform  # noqa: F401  (re-exported)

SIGMA_DATA = 0.5  # EDM's sigma_data: the 0.5^2 in the EDM weighting (docs/paper.md §1)

ACCEPTED = ("rf, rf/lognorm(m, s), rf/mode(s), rf/cosmap, eps/linear, v/linear, eps/cos, v/cos, "
            "edm(Pm, Ps), edm/rf, edm/cos, x, x/lognorm(m, s)")
X_T_MIN = 0.05  # x-prediction's velocity loss divides by max(t, X_T_MIN): bounded weight near the data (JiT)


def shift_time(t, alpha):
    """Resolution-dependent shift t_m = alpha t / (1 + (alpha - 1) t) (docs/paper.md §5)."""
    if not alpha > 0:
        raise ValueError(f"shift_time: alpha must be > 0, got {alpha}")
    if alpha == 1:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


# ---------------------------------------------------------------------------------------------------------------
# Weightings w_t of docs/paper.md §1 (with t ~ U(0, 1)); rf variants fold their sampler density in (docs/paper.md §2)


def _w_rf(f, t):
    return t / (1 - t) * f.sampler.density(t)


def _w_eps_linear(f, t):
    return -2 / f.dlam(t)  # plain eps MSE


def _w_v_linear(f, t):
    return -2 / (f.a(t) ** 2 * f.dlam(t))  # plain v MSE


def _w_eps_cos(f, t):
    return 1 / torch.cosh(f.lam(t) / 2)


def _w_v_cos(f, t):
    return torch.exp(-f.lam(t) / 2)


def _w_edm(f, t):
    # the log-SNR density of t ~ U(0,1) (N(lambda; -2Pm, (2Ps)^2) for edm(Pm, Ps)) times (e^-lambda + sigma_data^2)
    return -1 / f.dlam(t) * (torch.exp(-f.lam(t)) + SIGMA_DATA**2)


# ---------------------------------------------------------------------------------------------------------------


class Formulation:
    """One variant of the formulation study: path, prediction target, t sampler and loss weighting
    (docs/paper.md §1-3)."""

    def __init__(self, name, path, prediction, sampler, weight, loss_scale, t_max=None):
        self.name = name
        self.path = path
        self.prediction = prediction  # "velocity" | "eps" | "v" | "edm" | "x"
        self.sampler = sampler
        self._weight = weight
        self.loss_scale = loss_scale  # -1/2 (w/pi) lambda' (d eps_hat / d net_out)^2, constant in t
        self.t_max = path.t_max if t_max is None else t_max
        self.t_min = 0.0

    def __repr__(self):
        return f"Formulation({self.name!r})"

    def __eq__(self, other):
        return isinstance(other, Formulation) and other.name == self.name

    def __hash__(self):
        return hash(self.name)

    @classmethod
    def from_name(cls, name: str) -> Formulation:
        """Parse a name as Table 1 prints it, spaces optional, e.g. "rf/lognorm(0.00, 1.00)" or "edm(0, 0.6)"."""
        return _parse(name)

    # -- the path
    def a(self, t):
        return self.path.a(_time(t))

    def b(self, t):
        return self.path.b(_time(t))

    def da(self, t):
        return self.path.da(_time(t))

    def db(self, t):
        return self.path.db(_time(t))

    def lam(self, t):
        return self.path.lam(_time(t))

    def dlam(self, t):
        return self.path.dlam(_time(t))

    def from_rf_time(self, t):
        """The t of this formulation with the same log-SNR as rf at t (how sampling grids carry over)."""
        return self.path.from_rf_time(_time(t))

    def to_rf_time(self, t):
        """rf's time with the same log-SNR as this formulation at t, b / (a + b) (the identity for the rf family)."""
        return self.path.to_rf_time(_time(t))

    def w(self, t):
        """The paper's weight w_t of L_w with t ~ U(0, 1) (docs/paper.md §1 table; rf variants: t/(1-t) pi(t),
        §2)."""
        return self._weight(self, _time(t))

    def t_density(self, t):
        """Density pi(t) that sample_t draws from before any shift."""
        return self.sampler.density(_time(t))

    # -- training
    def sample_t(self, n, generator=None, device=None, shift=1.0, dtype=None) -> torch.Tensor:
        """n training times from pi(t), shifted (docs/paper.md §5), kept inside the open interval (0, 1).

        The shift acts in rf time, t -> from_rf_time(shift_time(to_rf_time(t))), so that it is docs/paper.md §5's
        lambda -> lambda - 2 log(alpha) on every path (for the rf family both maps are the identity).
        """
        dtype = dtype or torch.get_default_dtype()
        eps = torch.finfo(dtype).eps
        t = self.sampler.draw(n, generator)
        if shift != 1:
            t = self.path.from_rf_time(shift_time(self.path.to_rf_time(t), shift))
        t = t.to(dtype).clamp(eps, 1 - eps)
        return t.to(device) if device is not None else t

    def _edm_cd(self, t, like):
        """EDM's c = sigma / sqrt(sigma^2 + sd^2) and d = sd / sqrt(sigma^2 + sd^2), finite for sigma in [0, inf]."""
        sigma = self.b(t)
        c = 1 / torch.sqrt(1 + (SIGMA_DATA / sigma) ** 2)
        d = SIGMA_DATA / torch.sqrt(sigma**2 + SIGMA_DATA**2)
        return _expand(c, like), _expand(d, like)

    def target(self, x0, eps, t):
        """The exact network output for z_t = a_t x0 + b_t eps."""
        t = _time(t)
        if self.prediction == "velocity":
            return eps - x0
        if self.prediction == "eps":
            return eps
        if self.prediction == "v":
            return _expand(self.a(t), x0) * eps - _expand(self.b(t), x0) * x0
        if self.prediction == "x":
            return x0
        c, d = self._edm_cd(t, x0)
        return c * x0 / SIGMA_DATA - d * eps  # F = (x0 - c_skip z) / c_out

    def network_input(self, z, t):
        """(z_in, t_in) the network sees: identity, except EDM's c_in z and t_in = sigma / (1 + sigma)."""
        t = _time(t)
        t_in = t.expand(z.shape[0]) if t.ndim == 0 else t
        t_dtype = torch.promote_types(z.dtype, torch.float32)  # bf16 would blur t by ~0.4%
        if self.prediction != "edm":
            return z, t_in.to(device=z.device, dtype=t_dtype)
        sigma = self.b(t_in)
        _, d = self._edm_cd(t, z)
        # rf's time at the same SNR: a monotone map of sigma onto [0, 1] that float32 resolves up to sigma_max
        return z * d / SIGMA_DATA, (1 / (1 + 1 / sigma)).to(device=z.device, dtype=t_dtype)

    def denoise(self, net_out, z, t):
        """(x0_hat, eps_hat) from the network output at z_t."""
        t = _time(t)
        if self.prediction == "edm":
            c, d = self._edm_cd(t, z)
            return d**2 * z + SIGMA_DATA * c * net_out, c * d / SIGMA_DATA * z - d * net_out
        a, b = _expand(self.a(t), z), _expand(self.b(t), z)
        if self.prediction == "velocity":  # rf path: a + b = 1
            return z - b * net_out, z + a * net_out
        if self.prediction == "eps":
            return (z - b * net_out) / a, net_out
        if self.prediction == "x":  # rf path; t = 0 only where no step is evaluated
            return net_out, (z - a * net_out) / b
        norm = a**2 + b**2  # 1 on variance-preserving paths
        return (a * z - b * net_out) / norm, (b * z + a * net_out) / norm

    def velocity(self, net_out, z, t):
        """dz_t/dt = a'_t x0_hat + b'_t eps_hat (the raw output for rf)."""
        if self.prediction == "velocity":
            return net_out
        x0, eps = self.denoise(net_out, z, t)
        return _expand(self.da(_time(t)), z) * x0 + _expand(self.db(_time(t)), z) * eps

    def rf_velocity(self, net_out, z, t):
        """Velocity in the SNR-matched rectified-flow frame (z / (a + b) against b / (a + b)): eps_hat - x0_hat."""
        if self.prediction == "velocity":
            return net_out
        x0, eps = self.denoise(net_out, z, t)
        return eps - x0

    def loss(self, net_out, x0, eps, t):
        """Per-sample loss -1/2 (w_t / pi(t)) lambda'_t ||eps_hat - eps||^2 (mean over non-batch dims),
        docs/paper.md §1."""
        return self.loss_scale * self._error(net_out, x0, eps, t).pow(2).flatten(1).mean(1)

    def _error(self, net_out, x0, eps, t):
        """net_out - target in float32, in the loss's units: x-prediction's error becomes the velocity error
        (x0 - x0_hat) / t, with t floored at X_T_MIN."""
        dtype = torch.promote_types(net_out.dtype, torch.float32)
        err = net_out.to(dtype) - self.target(x0, eps, t).to(dtype)
        if self.prediction == "x":
            err = err / _expand(_time(t).to(err).clamp_min(X_T_MIN), err)
        return err

    def contrastive_loss(self, net_out, x0, eps, t, negatives: torch.Tensor, weight: float):
        """Contrastive flow matching (docs/training.md "Learning speed"): the loss minus weight x the same error
        measured against the target of sample negatives[i] (its data and noise, at sample i's t), which pushes each
        prediction away from other captions' flows. A sample that is its own negative keeps the plain loss."""
        loss = self.loss(net_out, x0, eps, t)
        away = self._error(net_out, x0[negatives], eps[negatives], t)
        other = negatives != torch.arange(len(negatives), device=negatives.device)
        return loss - weight * other.to(away.dtype) * self.loss_scale * away.pow(2).flatten(1).mean(1)

    def training_loss(self, model_fn, x0, t=None, eps=None, generator=None, shift=1.0, negatives=None,
                      contrastive: float = 0.0):
        """Draw t and eps where not given, noise x0, run model_fn(z_in, t_in) and return the per-sample loss
        (contrastive_loss with negatives and a weight)."""
        if t is None:
            dtype = torch.promote_types(x0.dtype, torch.float32)
            t = self.sample_t(x0.shape[0], generator=generator, device=x0.device, shift=shift, dtype=dtype)
        elif shift != 1.0:
            raise ValueError(f"training_loss: shift={shift} only applies to drawn t; shift the given t yourself")
        if eps is None:
            device = generator.device if generator is not None else x0.device
            eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
        t = _time(t).to(x0.device)
        z = _expand(self.a(t), x0) * x0 + _expand(self.b(t), x0) * eps
        net_out = model_fn(*self.network_input(z, t))
        if contrastive and negatives is not None:
            return self.contrastive_loss(net_out, x0, eps, t, negatives.to(x0.device), contrastive)
        return self.loss(net_out, x0, eps, t)

    # -- sampling
    @property
    def prior_scale(self) -> float:
        """Std of z at t_max for zero-mean unit-variance data, sqrt(a^2 + b^2): 1 for rf and VP, ~sigma_max for EDM."""
        t = torch.tensor(self.t_max, dtype=torch.float64)
        return math.sqrt(float(self.a(t)) ** 2 + float(self.b(t)) ** 2)

    def prior(self, shape, generator=None, device=None, dtype=None):
        """z at t_max: standard normal noise times prior_scale."""
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
        return noise.to(device) * self.prior_scale if device is not None else noise * self.prior_scale


# ---------------------------------------------------------------------------------------------------------------
# Names (docs/paper.md §3, Table 1)


def _fmt(x: float) -> str:
    """Table 1 prints parameters with 2 decimals; more digits only when 2 would change the value."""
    s = f"{x:.2f}"
    s = "0.00" if s == "-0.00" else s
    return s if float(s) == x else repr(float(x))


def _rf(name, sampler):
    return Formulation(name, RectifiedPath(), "velocity", sampler, _w_rf, 1.0)


def _x(name, sampler):
    """x-prediction on the rf path with rf's velocity loss (its w_t for t >= X_T_MIN)."""
    return Formulation(name, RectifiedPath(), "x", sampler, _w_rf, 1.0)


def _edm(name, path):
    return Formulation(name, path, "edm", Uniform(), _w_edm, SIGMA_DATA**2 / 2)


def _eps_cos_t_max() -> float:
    """eps-prediction cannot give x0 where a = 0: eps/cos starts at LDM's terminal SNR, a(t_max) = a_LDM(1)."""
    return 2 / math.pi * math.acos(math.exp(float(ldm_log_alphabar()[-1]) / 2))


_PLAIN = {
    "rf": lambda: _rf("rf", Uniform()),
    "rf/cosmap": lambda: _rf("rf/cosmap", CosMap()),
    "eps/linear": lambda: Formulation("eps/linear", LinearVPPath(), "eps", Uniform(), _w_eps_linear, 1.0),
    "v/linear": lambda: Formulation("v/linear", LinearVPPath(), "v", Uniform(), _w_v_linear, 1.0),
    "eps/cos": lambda: Formulation("eps/cos", CosinePath(), "eps", Uniform(), _w_eps_cos, math.pi, _eps_cos_t_max()),
    "v/cos": lambda: Formulation("v/cos", CosinePath(), "v", Uniform(), _w_v_cos, math.pi / 2),
    "edm/rf": lambda: _edm("edm/rf", RFSigma()),
    "edm/cos": lambda: _edm("edm/cos", CosSigma()),
    "x": lambda: _x("x", Uniform()),
}
_CALL = re.compile(r"(rf/lognorm|x/lognorm|rf/mode|edm)(?:\((.*)\))?")
_ARGS = {"rf/lognorm": ("m", "s"), "x/lognorm": ("m", "s"), "rf/mode": ("s",), "edm": ("Pm", "Ps")}


def _bad(name, why, known=True):
    """The error for a name: 'unknown' when no accepted form matches, 'invalid' for a known form's bad parameters."""
    return ValueError(f"{'invalid' if known else 'unknown'} formulation {name!r}: {why}; accepted forms: {ACCEPTED}")


def _parse(name: str) -> Formulation:
    """Formulation for a Table 1 name (see Formulation.from_name)."""
    if not isinstance(name, str):
        raise _bad(name, "expected a string", known=False)
    key = re.sub(r"\s+", "", name).lower()
    if key in _PLAIN:
        return _PLAIN[key]()
    match = _CALL.fullmatch(key)
    if match is None:
        raise _bad(name, "not a known form", known=False)
    kind, arg_text = match.groups()
    expected = _ARGS[kind]
    try:
        args = [float(x) for x in arg_text.split(",")] if arg_text else []
    except ValueError:
        raise _bad(name, f"arguments must be numbers, got {arg_text!r}") from None
    if len(args) != len(expected) or not all(math.isfinite(x) for x in args):
        raise _bad(name, f"{kind} takes {len(expected)} finite number(s) ({', '.join(expected)}), got {arg_text!r}")
    return _KIND[kind](name, *args)


def _lognorm(name, m, s, kind="rf"):
    if not s > 0:
        raise _bad(name, f"lognorm scale s must be > 0, got {s}")
    return (_x if kind == "x" else _rf)(f"{kind}/lognorm({_fmt(m)}, {_fmt(s)})", LogitNormal(m, s))


def _mode(name, s):
    if not -1 <= s <= 1.75:
        raise _bad(name, f"mode s must lie in [-1, 1.75] (f_mode is monotone there), got {s}")
    if s == 0:
        return _rf("rf", Uniform())  # mode(0) is the uniform sampler (docs/paper.md §2)
    return _rf(f"rf/mode({_fmt(s)})", ModeSampler(s))


def _edm_lognormal(name, p_mean, p_std):
    if not p_std > 0:
        raise _bad(name, f"edm Ps must be > 0, got {p_std}")
    return _edm(f"edm({_fmt(p_mean)}, {_fmt(p_std)})", LogNormalSigma(p_mean, p_std))


_KIND = {"rf/lognorm": _lognorm, "x/lognorm": lambda name, m, s: _lognorm(name, m, s, "x"), "rf/mode": _mode,
         "edm": _edm_lognormal}

# Grid points where docs/paper.md §3 gives only ranges (docs/formulations.md): every Table 1 entry is on them.
MODE_S = [round(-1 + k * 2.75 / 6, 2) for k in range(7)] + [1.0]  # 7 evenly spaced in [-1, 1.75], plus 1.0 (0 is rf)
LOGNORM_M = [-1.0, -0.5, 0.0, 0.5, 1.0]
LOGNORM_S = [0.2, 0.6, 1.0, 1.4, 1.8, 2.2]
EDM_PM = [-1.2, -0.6, 0.0, 0.6, 1.2]
EDM_PS = [0.6, 1.2, 1.8]

TABLE1 = [
    "rf/lognorm(0.00, 1.00)", "rf/lognorm(1.00, 0.60)", "rf/lognorm(0.50, 0.60)", "rf/mode(1.29)",
    "rf/lognorm(0.50, 1.00)", "eps/linear", "rf/mode(1.75)", "rf/cosmap", "edm(0.00, 0.60)", "rf", "v/linear",
    "edm(0.60, 1.20)", "v/cos", "edm/cos", "edm/rf", "edm(-1.20, 1.20)",
]


def paper_grid() -> list[str]:
    """The 61 canonical names of the formulation study (docs/paper.md §3)."""
    names = ["eps/linear", "v/linear", "eps/cos", "v/cos", "rf"]
    names += [f"rf/mode({_fmt(s)})" for s in sorted(MODE_S)]
    names += ["rf/cosmap"]
    names += [f"rf/lognorm({_fmt(m)}, {_fmt(s)})" for m in LOGNORM_M for s in LOGNORM_S]
    names += [f"edm({_fmt(pm)}, {_fmt(ps)})" for pm in EDM_PM for ps in EDM_PS]
    return names + ["edm/rf", "edm/cos"]
