"""Sampling: time grids, classifier-free guidance and ODE solvers (docs/paper.md §6).

Solvers are small pure functions over an explicit, decreasing time grid in the formulation's own t. Every
formulation is sampled the same way: its network output becomes (x0_hat, eps_hat), and Euler and Heun step the ODE
in the SNR-matched rectified-flow frame y = z / (a + b) against tau = b / (a + b), where it reads
dy/dtau = eps_hat - x0_hat. For rf that frame is the formulation's own (Euler is exactly SD3's Euler); for the others
an Euler step is the DDIM step z' = a' x0_hat + b' eps_hat, which stays well behaved where the formulation's own
t-parametrisation is steep (EDM's sigma(t) = exp(Pm + Ps Phi^-1(t)) near t = 1). DPM++ 2M works on the half
log-SNR log(a / b) of any path. docs/formulations.md explains the choices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rectflow.flow import Formulation, shift_time

SD3_TRAIN_STEPS = 1000  # the released schedulers' discretisation; its low end sets the last non-zero time


def time_grid(steps: int, shift: float = 1.0, schedule: str = "linear") -> torch.Tensor:
    """steps + 1 times (float64) decreasing from 1 to 0.

    linear: shift_time(linspace(1, 0, steps + 1), shift).
    sd3: shift_time(linspace(1, shift_time(1/1000, shift), steps), shift) then 0, the grid the released models are
    sampled with (docs/paper.md §6: the low end is shifted twice).
    sd3-dynamic: shift_time(linspace(1, 1/1000, steps), shift) then 0, diffusers' grid with use_dynamic_shifting
    (the shift is then exp(mu), dynamic_shift()).
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"time_grid: steps must be a positive integer, got {steps}")
    steps = int(steps)
    if schedule == "linear":
        return shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)
    if schedule == "sd3":
        low = shift_time(1 / SD3_TRAIN_STEPS, shift)
        ts = shift_time(torch.linspace(1, low, steps, dtype=torch.float64), shift)
        return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
    if schedule == "sd3-dynamic":
        ts = shift_time(torch.linspace(1, 1 / SD3_TRAIN_STEPS, steps, dtype=torch.float64), shift)
        return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
    raise ValueError(f"time_grid: schedule must be 'linear', 'sd3' or 'sd3-dynamic', got {schedule!r}")


def dynamic_shift(tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_mu: float = 0.5,
                  max_mu: float = 1.15) -> float:
    """diffusers' resolution-dependent shift (calculate_shift and FlowMatchEulerDiscreteScheduler's exponential
    time_shift): exp(mu) with mu linear in the image's token count, 0.5 at 256 tokens and 1.15 at 4096."""
    slope = (max_mu - base_mu) / (max_tokens - base_tokens)
    return math.exp(base_mu + slope * (tokens - base_tokens))


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance (SD3.5 medium's recommended setting): at the solver steps i with start * steps < i <
    stop * steps, the guided output gains scale * (cond - cond_skip), cond_skip being the conditional output with the
    given joint blocks skipped. The semantics of diffusers' skip_guidance_layers and of Stability AI's
    SkipLayerCFGDenoiser; like both, it acts only with classifier-free guidance on (cfg_scale != 1)."""

    layers: tuple[int, ...]
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2

    def __post_init__(self):
        if not self.layers or any(int(i) != i or i < 0 for i in self.layers):
            raise ValueError(f"skip-layer guidance: layers must be block indices >= 0, got {self.layers!r}")
        if not (math.isfinite(self.scale) and 0 <= self.start <= self.stop <= 1):
            raise ValueError(f"skip-layer guidance: expected a finite scale and 0 <= start <= stop <= 1, got scale "
                             f"{self.scale}, start {self.start}, stop {self.stop}")

    def active(self, i: int, steps: int) -> bool:
        return self.start * steps < i < self.stop * steps


class Guided:
    """model_fn(z_in, t_in) with classifier-free guidance: uncond + cfg_scale (cond - uncond), one batched forward;
    with skip-layer guidance also cond - cond_skip at the steps it covers (`step`, set by the solver's on_step).

    model(x, t, context, y[, skip_layers]); the unconditional inputs default to zeros (the training-time dropout of
    docs/paper.md §4). At cfg_scale 1 the unconditional branch cancels, so only the conditional forward runs.
    """

    def __init__(self, model, context, y, cfg_scale, uncond_context=None, uncond_y=None,
                 slg: SkipLayerGuidance | None = None, steps: int | None = None):
        self.model, self.context, self.y, self.cfg_scale = model, context, y, cfg_scale
        self.slg, self.steps, self.step = slg, steps, 0
        if cfg_scale != 1:
            uncond_context = torch.zeros_like(context) if uncond_context is None else uncond_context
            uncond_y = torch.zeros_like(y) if uncond_y is None else uncond_y
            self.both_context, self.both_y = torch.cat([context, uncond_context]), torch.cat([y, uncond_y])

    def __call__(self, z_in, t_in):
        if self.cfg_scale == 1:
            return self.model(z_in, t_in, self.context, self.y)
        out = self.model(torch.cat([z_in, z_in]), torch.cat([t_in, t_in]), self.both_context, self.both_y)
        cond, uncond = out.chunk(2)
        guided_out = uncond + self.cfg_scale * (cond - uncond)
        if self.slg is not None and self.slg.active(self.step, self.steps):
            skipped = self.model(z_in, t_in, self.context, self.y, skip_layers=self.slg.layers)
            guided_out = guided_out + (cond - skipped) * self.slg.scale
        return guided_out

    def on_step(self, i: int) -> None:
        self.step = i


def guided(model, context, y, cfg_scale, uncond_context=None, uncond_y=None, slg=None, steps=None) -> Guided:
    """Guided(...): the classifier-free (and skip-layer) guided model function."""
    return Guided(model, context, y, cfg_scale, uncond_context, uncond_y, slg, steps)


def _coefficients(f: Formulation, t: float) -> tuple[float, float]:
    """(a_t, b_t) as float64 python numbers."""
    t = torch.tensor(t, dtype=torch.float64)
    return float(f.a(t)), float(f.b(t))


def _evaluate(model_fn, f: Formulation, z, t: float):
    """(x0_hat, rf-frame velocity) of the model at (z, t)."""
    net_out = model_fn(*f.network_input(z, t))
    x0, _ = f.denoise(net_out, z, t)
    return x0, f.rf_velocity(net_out, z, t)


def _step(f: Formulation, z, t: float, t_next: float, velocity):
    """One Euler step of dy/dtau = velocity in the rf frame y = z / (a + b), tau = b / (a + b)."""
    a, b = _coefficients(f, t)
    a_next, b_next = _coefficients(f, t_next)
    s, s_next = a + b, a_next + b_next
    return (s_next / s) * z + (s_next * (b_next / s_next - b / s)) * velocity


def _enter(on_step, i: int) -> None:
    """Tell a step-aware model function (skip-layer guidance) which solver step its next evaluations belong to."""
    if on_step is not None:
        on_step(i)


def _leave(after_step, i: int, z):
    """z after step i, as after_step(i, z) changes it (inpainting's blend), else as it is."""
    return z if after_step is None else after_step(i, z)


def _times(ts) -> list[float]:
    """The grid as python floats (float64), checked to decrease."""
    ts = [float(t) for t in (ts.tolist() if isinstance(ts, torch.Tensor) else ts)]
    if len(ts) < 2 or any(t1 >= t0 for t0, t1 in zip(ts, ts[1:])):
        raise ValueError(f"time grid must hold at least 2 strictly decreasing times, got {ts}")
    return ts


def sample_euler(model_fn, formulation: Formulation, z, ts, callback=None, on_step=None, after_step=None):
    """Euler (DDIM for non-rf formulations) from ts[0] to ts[-1]; callback(i, t, z, x0_hat) before each step,
    on_step(i) before step i's evaluations."""
    ts = _times(ts)
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        _enter(on_step, i)
        x0, v = _evaluate(model_fn, formulation, z, t)
        if callback is not None:
            callback(i, t, z, x0)
        z = _leave(after_step, i, _step(formulation, z, t, t_next, v))
    return z


def sample_heun(model_fn, formulation: Formulation, z, ts, callback=None, on_step=None, after_step=None):
    """Heun's second-order method; the step into t = 0 is an Euler step (nothing to evaluate there)."""
    ts = _times(ts)
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        _enter(on_step, i)
        x0, v = _evaluate(model_fn, formulation, z, t)
        if callback is not None:
            callback(i, t, z, x0)
        if t_next == 0:
            z = _step(formulation, z, t, t_next, v)
        else:
            _, v_next = _evaluate(model_fn, formulation, _step(formulation, z, t, t_next, v), t_next)
            z = _step(formulation, z, t, t_next, (v + v_next) / 2)
        z = _leave(after_step, i, z)
    return z


def sample_dpmpp_2m(model_fn, formulation: Formulation, z, ts, callback=None, on_step=None, after_step=None):
    """DPM-Solver++(2M) in x0 form over the half log-SNR l = log(a / b) (Lu et al. 2022), for any a_t, b_t.

    z' = (b'/b) z - a' expm1(-h) D with h = l' - l and D the x0_hat extrapolated along l from the previous step;
    first order where there is no previous step (or it started from a = 0), x0_hat itself into b = 0.
    """
    ts = _times(ts)
    f = formulation
    x0_prev, h_prev = None, None
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        _enter(on_step, i)
        x0, _ = _evaluate(model_fn, f, z, t)
        if callback is not None:
            callback(i, t, z, x0)
        a, b = _coefficients(f, t)
        a_next, b_next = _coefficients(f, t_next)
        if b_next == 0:
            z = _leave(after_step, i, a_next * x0)
            continue
        h = float(f.lam(torch.tensor(t_next, dtype=torch.float64)) - f.lam(torch.tensor(t, dtype=torch.float64))) / 2
        if x0_prev is None or not math.isfinite(h_prev):
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        z = _leave(after_step, i, (b_next / b) * z - (a_next * math.expm1(-h)) * d)
        x0_prev, h_prev = x0, h
    return z


SOLVERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}


def formulation_grid(formulation: Formulation, steps: int, shift: float = 1.0, schedule: str = "linear"):
    """steps + 1 times of the formulation, from t_max to t_min: time_grid (rf times) fitted to the rf times the
    formulation reaches, carried to its own t at equal log-SNR.

    Where the formulation spans all of rf time (t_max and t_min at rf times 1 and 0: the rf family, v/cos) this is
    time_grid itself carried over. Otherwise (a lower starting SNR: LDM's floor, eps/cos, EDM's sigma_max) the grid's
    unshifted positions u = shift_time(tau, 1 / shift) are mapped linearly onto [u(tau_min), u(tau_max)] and shifted
    again, so every step stays a step and the shift keeps its meaning.
    """
    f = formulation
    grid = time_grid(steps, shift, schedule)
    hi, lo = float(f.to_rf_time(f.t_max)), float(f.to_rf_time(f.t_min))
    if hi == 1.0 and lo == 0.0:
        ts = f.from_rf_time(grid).clamp(f.t_min, f.t_max)
    else:
        u_hi, u_lo = shift_time(hi, 1 / shift), shift_time(lo, 1 / shift)
        u = shift_time(grid, 1 / shift)
        ts = f.from_rf_time(shift_time(u_lo + (u_hi - u_lo) * u, shift)).clamp(f.t_min, f.t_max)
        ts[0], ts[-1] = f.t_max, f.t_min  # exactly, whatever the round trip through rf time rounds to
    if not torch.all(torch.diff(ts) < 0):
        raise ValueError(f"formulation_grid: {steps} steps of {f.name} do not resolve into distinct times in float64")
    return ts


def img2img_start(steps: int, strength: float) -> int:
    """The first grid index image-to-image samples from: the last strength * steps steps run (diffusers'
    StableDiffusion3Img2ImgPipeline.get_timesteps, its rounding included)."""
    if not 0 < strength <= 1:
        raise ValueError(f"--strength: expected a value in (0, 1], got {strength!r}")
    start = int(max(steps - min(steps * strength, steps), 0))
    if start >= steps:
        raise ValueError(f"--strength {strength} with {steps} steps leaves no step to run; raise either")
    return start


def sample(model_fn, formulation, noise, steps=28, solver="euler", shift=1.0, schedule="linear", callback=None,
           on_step=None, init=None, strength=1.0, mask=None):
    """x0 from standard-normal noise: the prior z = noise * prior_scale at the start of
    formulation_grid(formulation, steps, shift, schedule), then the solver (on_step(i) before step i).

    Image-to-image: with init (clean latents), the grid is entered at img2img_start(steps, strength), from the
    forward process z_t = a_t init + b_t noise there (rf: (1 - t) init + t noise, diffusers' scale_noise).
    Inpainting: with a mask (1: redraw, 0: keep; broadcast over channels) as well, after every step the kept region is
    set back to init noised to the step's end time (diffusers' StableDiffusion3InpaintPipeline for 16-channel
    models); after the last step it is init itself."""
    f = formulation if isinstance(formulation, Formulation) else Formulation.from_name(formulation)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
    ts = formulation_grid(f, steps, shift, schedule)
    after_step = None
    if init is None:
        if mask is not None:
            raise ValueError("inpainting needs the image to keep (init) as well as the mask")
        z = noise * f.prior_scale
    else:
        ts = ts[img2img_start(steps, strength):]
        a, b = _coefficients(f, float(ts[0]))
        z = a * init + b * noise
        if mask is not None:
            times = _times(ts)

            def blend(i, z_next):
                a_next, b_next = _coefficients(f, times[i + 1])
                return (1 - mask) * (a_next * init + b_next * noise) + mask * z_next
            after_step = blend
    return SOLVERS[solver](model_fn, f, z, ts, callback, on_step, after_step)
