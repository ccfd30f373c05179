"""Time grids, guidance and solvers (PAPER 6) on a problem with a closed-form answer.

For Gaussian data x0 ~ N(MU, S^2 I), z_t = a x0 + b eps is Gaussian with variance V = a^2 S^2 + b^2, and
E[x0 | z] = MU + a S^2 (z - a MU) / V, E[eps | z] = b (z - a MU) / V: the exact network output of every formulation.
Its probability-flow ODE is affine and carries z_t = a MU + sqrt(V) xi to x0 = MU + S xi.
"""
import math

import numpy as np
import pytest
import torch

from rectflow.flow import Formulation, shift_time
from rectflow.sampling import (SOLVERS, formulation_grid, guided, sample, sample_dpmpp_2m, sample_euler, sample_heun,
                               time_grid)

MU, S = 0.7, 0.5


def exact_model(f, counter=None):
    """model_fn(z_in, t_in) returning f's exact network output for the Gaussian data."""
    def model_fn(z_in, t_in):
        if counter is not None:
            counter.append(t_in)
        t = f.from_rf_time(t_in) if f.prediction == "edm" else t_in  # EDM's t_in is rf's time at equal SNR
        a, b = (c.reshape(-1, *[1] * (z_in.ndim - 1)) for c in (f.a(t), f.b(t)))
        z = z_in * torch.sqrt(b**2 + 0.25) if f.prediction == "edm" else z_in  # undo EDM's c_in
        v = a**2 * S**2 + b**2
        return f.target(MU + a * S**2 * (z - a * MU) / v, b * (z - a * MU) / v, t)
    return model_fn


def solve(name, solver, ts, n=64):
    """Max error of the solver from ts[0] to ts[-1], started on the exact marginal: z_t = a MU + sqrt(V) xi."""
    f = Formulation.from_name(name)
    xi = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = lambda t: float(f.a(t)) * MU + math.sqrt(float(f.a(t)) ** 2 * S**2 + float(f.b(t)) ** 2) * xi
    return (SOLVERS[solver](exact_model(f), f, exact(ts[0]), ts) - exact(ts[-1])).abs().max().item()


def order(name, solver, grid, steps):
    """Convergence order: minus the log-log slope of error against steps."""
    errors = [solve(name, solver, grid(n)) for n in steps]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0], errors


# -- time grids ------------------------------------------------------------------------------------------------------

def test_linear_grid():
    ts = time_grid(4)
    assert ts.dtype == torch.float64 and ts.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    torch.testing.assert_close(time_grid(4, shift=3.0), 3 * ts / (1 + 2 * ts))
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="schedule"):
        time_grid(4, schedule="karras")


def test_sd3_grid_matches_diffusers():
    FlowMatchEulerDiscreteScheduler = pytest.importorskip("diffusers").FlowMatchEulerDiscreteScheduler
    worst = 0.0
    for steps in (1, 5, 28, 50):
        for shift in (1.0, 3.0):
            scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
            scheduler.set_timesteps(steps)
            ours = time_grid(steps, shift=shift, schedule="sd3")
            assert ours.shape == scheduler.sigmas.shape and ours[0] == 1 and ours[-1] == 0
            worst = max(worst, (ours - scheduler.sigmas.double()).abs().max().item())
    assert worst < 1e-6  # measured 3.0e-8: diffusers works in float32
    assert time_grid(28, shift=3.0, schedule="sd3")[-2].item() == pytest.approx(0.0089, abs=5e-5)  # PAPER 6


def test_euler_reproduces_diffusers_sampling_loop():
    FlowMatchEulerDiscreteScheduler = pytest.importorskip("diffusers").FlowMatchEulerDiscreteScheduler
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    weight = torch.randn(4, 4, generator=g) / 2

    def model_fn(z, t):  # any smooth deterministic "network"
        return torch.einsum("oc,bchw->bohw", weight, torch.tanh(z)) + t.reshape(-1, 1, 1, 1) * z

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(28)
    z = noise.clone()
    for timestep in scheduler.timesteps:
        t = (timestep / 1000).expand(2)
        z = scheduler.step(model_fn(z, t), timestep, z).prev_sample
    ours = sample(model_fn, Formulation.from_name("rf"), noise, steps=28, shift=3.0, schedule="sd3")
    torch.testing.assert_close(ours, z, rtol=0, atol=2e-5)


def test_formulation_grid_is_snr_matched():
    rf = Formulation.from_name("rf")
    for schedule in ("linear", "sd3"):
        rf_grid = time_grid(28, shift=3.0, schedule=schedule)
        for name in ("rf", "rf/lognorm(0.00, 1.00)", "rf/mode(1.29)", "rf/cosmap"):  # bit for bit: sd3 parity
            assert torch.equal(formulation_grid(Formulation.from_name(name), 28, 3.0, schedule), rf_grid)
        v_cos = Formulation.from_name("v/cos")  # spans all of rf time: rf's noise levels exactly
        ts = formulation_grid(v_cos, 28, 3.0, schedule)
        torch.testing.assert_close(v_cos.lam(ts[1:-1]), rf.lam(rf_grid[1:-1]), rtol=1e-7, atol=0)


@pytest.mark.parametrize("name", ["eps/linear", "v/linear", "eps/cos", "edm(0.00, 0.60)", "edm(-1.20, 1.20)",
                                  "edm/rf", "edm/cos"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_formulation_grid_fits_the_reachable_range(name, shift):
    """A formulation that starts below rf's t = 1 gets rf's grid laid over the rf times it reaches: from the rf time
    of t_max down to 0, evenly in the unshifted position, then shifted (no point lost to clipping)."""
    f = Formulation.from_name(name)
    top = float(f.to_rf_time(f.t_max))
    assert top < 1
    for steps in (5, 25):
        ts = formulation_grid(f, steps, shift)
        u = shift_time(f.to_rf_time(ts), 1 / shift)  # back to the unshifted rf positions
        expected = torch.linspace(shift_time(top, 1 / shift), 0, steps + 1, dtype=torch.float64)
        torch.testing.assert_close(u, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["rf", "rf/mode(1.29)", "v/cos", "v/linear", "eps/linear", "eps/cos",
                                  "edm(0.00, 0.60)", "edm(-1.20, 0.60)", "edm(1.20, 1.80)", "edm/rf", "edm/cos"])
def test_formulation_grid_has_exactly_the_steps_asked_for(name):
    f = Formulation.from_name(name)
    for steps in (5, 25, 50):
        for shift in (1.0, 3.0):
            for schedule in ("linear", "sd3"):
                ts = formulation_grid(f, steps, shift, schedule)
                assert len(ts) == steps + 1, (steps, shift, schedule)
                assert ts[0] == f.t_max and ts[-1] == f.t_min and torch.all(torch.diff(ts) < 0)


# -- solvers on the Gaussian problem ---------------------------------------------------------------------------------

def test_convergence_orders():
    steps = [16, 32, 64, 128]
    p_euler, e_euler = order("rf", "euler", time_grid, steps)
    p_heun, e_heun = order("rf", "heun", time_grid, steps)
    assert abs(p_euler - 1) < 0.05 and abs(p_heun - 2) < 0.1  # measured 0.98, 2.05
    assert e_euler[-1] < 0.02 and e_heun[-1] < 2e-4
    # DPM++ 2M: order 2 on a grid with bounded log-SNR steps; a grid uniform in t takes O(1) log-SNR steps at both
    # ends, which costs a log factor (N^-2 log N) visible at these sizes
    lam_grid = lambda n: torch.sigmoid(torch.linspace(math.log(99), -math.log(99), n + 1, dtype=torch.float64))
    p_dpm, _ = order("rf", "dpmpp_2m", lam_grid, [32, 64, 128, 256])
    p_dpm_t, e_dpm = order("rf", "dpmpp_2m", time_grid, [64, 128, 256, 512])
    assert abs(p_dpm - 2) < 0.1 and 1.6 < p_dpm_t < 2.1  # measured 1.99 and 1.76
    assert e_dpm[0] < e_euler[-1] / 4


@pytest.mark.parametrize("name", ["v/cos", "v/linear", "eps/linear", "eps/cos", "edm(0.00, 0.60)", "edm(-1.20, 1.20)",
                                  "edm/rf", "edm/cos", "rf/mode(1.29)"])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m"])
def test_one_solver_samples_every_formulation(name, solver):
    """On the SNR-matched grid a formulation's exact output steps exactly like rf's; only the start may differ."""
    rf_error = solve("rf", solver, formulation_grid(Formulation.from_name("rf"), 32))
    error = solve(name, solver, formulation_grid(Formulation.from_name(name), 32))
    if Formulation.from_name(name).t_max == 1.0 and not name.endswith("linear"):
        assert error == pytest.approx(rf_error, rel=1e-8)
    else:  # starts lower (LDM's SNR floor, eps/cos, EDM's sigma_max): a slightly different problem
        assert error == pytest.approx(rf_error, rel=0.2)
    assert error < {"euler": 0.08, "heun": 3e-3, "dpmpp_2m": 1.2e-2}[solver]  # rf: 0.071, 0.0025, 0.011


def test_sample_recovers_mean_and_variance():
    f = Formulation.from_name("rf/lognorm(0.00, 1.00)")
    noise = torch.randn(12000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # < 32k: 1 thread
    x0 = sample(exact_model(f), f, noise, steps=32, solver="heun")
    # the exact flow maps noise to MU + S noise: compare with the same noise's statistics, then with the truth
    assert abs(x0.mean().item() - (MU + S * noise.mean().item())) < 3e-3  # Heun's error at 32 steps
    assert abs(x0.std().item() - S * noise.std().item()) < 3e-3
    assert abs(x0.mean().item() - MU) < 4 * S / math.sqrt(x0.numel())
    assert abs(x0.std().item() - S) < 4 * S / math.sqrt(2 * x0.numel())


def test_heun_evaluations_and_last_euler_step():
    f = Formulation.from_name("rf")
    calls = []
    sample_heun(exact_model(f, calls), f, torch.zeros(3, 1, dtype=torch.float64), time_grid(10))
    assert len(calls) == 2 * 10 - 1 and all(float(t[0]) > 0 for t in calls)  # never evaluated at t = 0


def test_dpmpp_2m_final_step_returns_x0_hat():
    f = Formulation.from_name("v/cos")
    z = torch.randn(5, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = exact_model(f)
    x0_hat, _ = f.denoise(model(*f.network_input(z, 0.3)), z, 0.3)
    torch.testing.assert_close(sample_dpmpp_2m(model, f, z, [0.3, 0.0]), x0_hat)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_callback(solver):
    f = Formulation.from_name("edm(0.00, 0.60)")
    seen = []
    ts = formulation_grid(f, 6)
    noise = torch.randn(2, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample(exact_model(f), f, noise, steps=6, solver=solver, callback=lambda *args: seen.append(args))
    assert [i for i, *_ in seen] == list(range(len(ts) - 1)) and [t for _, t, *_ in seen] == ts[:-1].tolist()
    i, t, z, x0 = seen[0]
    torch.testing.assert_close(z, noise * f.prior_scale)
    torch.testing.assert_close(x0, f.denoise(exact_model(f)(*f.network_input(z, t)), z, t)[0])


def test_determinism_from_generator():
    f = Formulation.from_name("rf")
    model_fn = lambda z, t: torch.sin(z) + t.reshape(-1, 1)
    draw = lambda seed: sample(model_fn, f, f.prior((4, 3), generator=torch.Generator().manual_seed(seed)), steps=5)
    assert torch.equal(draw(7), draw(7)) and not torch.equal(draw(7), draw(8))


def test_solver_inputs_are_checked():
    f = Formulation.from_name("rf")
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        sample(lambda z, t: z, f, torch.zeros(1, 1), solver="rk4")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_euler(lambda z, t: z, f, torch.zeros(1, 1), [0.0, 1.0])


# -- guidance --------------------------------------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """A model whose output depends on all its inputs; records every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context, y):
        self.calls.append((x, t, context, y))
        return x * context.mean((1, 2)).reshape(-1, 1, 1, 1) + y.sum(1).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1)


def test_guided_batches_cond_and_uncond():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 2, 4, 4, generator=g), torch.rand(3, generator=g)
    context, y = torch.randn(3, 5, 8, generator=g), torch.randn(3, 6, generator=g)
    model = Recorder()
    out = guided(model, context, y, 4.5)(x, t)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 6  # one forward, batch doubled
    cond, uncond = model(x, t, context, y), model(x, t, torch.zeros_like(context), torch.zeros_like(y))
    torch.testing.assert_close(out, uncond + 4.5 * (cond - uncond))
    neg_context, neg_y = torch.randn(3, 5, 8, generator=g), torch.randn(3, 6, generator=g)
    out = guided(model, context, y, 2.0, neg_context, neg_y)(x, t)
    uncond = model(x, t, neg_context, neg_y)
    torch.testing.assert_close(out, uncond + 2.0 * (cond - uncond))
    model.calls.clear()
    torch.testing.assert_close(guided(model, context, y, 1.0)(x, t), cond)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 3  # scale 1: the unconditional branch cancels


def test_dynamic_shift_grid_matches_diffusers():
    FlowMatchEulerDiscreteScheduler = pytest.importorskip("diffusers").FlowMatchEulerDiscreteScheduler
    from rectflow.sampling import dynamic_shift
    for tokens, steps in ((256, 10), (1024, 28), (4096, 4)):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)  # diffusers' calculate_shift
        scheduler.set_timesteps(steps, mu=mu)
        ours = time_grid(steps, dynamic_shift(tokens), "sd3-dynamic")
        torch.testing.assert_close(ours.float(), scheduler.sigmas.float(), atol=1e-6, rtol=0)
