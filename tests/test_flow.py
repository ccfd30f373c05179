"""Forward processes, samplers of t and loss weights against PAPER.md sections 1-3 and 5, written independently here."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from rectflow.flow import TABLE1, Formulation, ldm_log_alphabar, paper_grid, shift_time

GRID = paper_grid()
KINDS = ["rf", "rf/lognorm(0.00, 1.00)", "rf/mode(1.29)", "rf/mode(-1.00)", "rf/cosmap", "eps/linear", "v/linear",
         "eps/cos", "v/cos", "edm(0.00, 0.60)", "edm(-1.20, 1.80)", "edm/rf", "edm/cos"]
SD2 = 0.25  # sigma_data^2 of the EDM weighting


def f64(x):
    return torch.as_tensor(x, dtype=torch.float64)


# -- independent reference formulas (PAPER 1, 2) -------------------------------------------------------------------

def ldm_alphabar():
    """LDM's discrete alphabar_i, i = 0..999, with numpy."""
    beta = (np.sqrt(0.00085) + np.arange(1000) / 999 * (np.sqrt(0.012) - np.sqrt(0.00085))) ** 2
    return np.cumprod(1 - beta)


def ref_ab(name, t):
    """(a_t, b_t) from PAPER 1, numpy float64."""
    t = np.asarray(t, dtype=np.float64)
    if name.startswith("rf"):
        return 1 - t, t
    if name.endswith("/cos") and not name.startswith("edm"):
        return np.cos(np.pi * t / 2), np.sin(np.pi * t / 2)
    if name.endswith("/linear"):
        log_nodes = np.concatenate([[0.0], np.log(ldm_alphabar())])
        alphabar = np.exp(np.interp(t, np.arange(1001) / 1000, log_nodes))
        return np.sqrt(alphabar), np.sqrt(1 - alphabar)
    if name == "edm/rf":
        return np.ones_like(t), t / (1 - t)
    if name == "edm/cos":
        return np.ones_like(t), np.tan(np.pi * t / 2)
    pm, ps = (float(x) for x in name[4:-1].split(","))
    return np.ones_like(t), np.exp(pm + ps * stats.norm.ppf(t))


def ref_lam_dlam(name, t):
    """(lambda_t, lambda'_t) in closed form, numpy."""
    a, b = ref_ab(name, t)
    lam = 2 * np.log(a / b)
    if name.startswith("rf") or name == "edm/rf":
        return lam, -2 / (t * (1 - t))
    if name.endswith("cos"):
        return lam, -2 * np.pi / np.sin(np.pi * t)
    if name.startswith("edm("):
        ps = float(name[4:-1].split(",")[1])
        return lam, -2 * ps / stats.norm.pdf(stats.norm.ppf(t))
    h = 1e-7  # linear: finite difference of the reference
    return lam, (2 * np.log(np.divide(*ref_ab(name, t + h))) - 2 * np.log(np.divide(*ref_ab(name, t - h)))) / (2 * h)


def mode_inverse(t, s):
    """u with 1 - u - s (cos^2(pi u/2) - 1 + u) = t, numpy bisection."""
    lo, hi = np.zeros_like(t), np.ones_like(t)
    for _ in range(60):
        mid = (lo + hi) / 2
        above = 1 - mid - s * (np.cos(np.pi * mid / 2) ** 2 - 1 + mid) > t
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return (lo + hi) / 2


def ref_cdf(name):
    """CDF of the rf training-time density pi(t) (PAPER 2)."""
    if name == "rf":
        return lambda t: t
    if name == "rf/cosmap":
        return lambda t: 2 / np.pi * np.arctan(t / (1 - t))
    if name.startswith("rf/mode"):
        s = float(name[8:-1])
        return lambda t: 1 - mode_inverse(np.asarray(t, dtype=np.float64), s)
    m, s = (float(x) for x in name[11:-1].split(","))
    return lambda t: stats.norm.cdf((np.log(t / (1 - t)) - m) / s)


def ref_density(name, t):
    """pi(t) from PAPER 2 (mode: 1 / |f_mode'(u)| at u = f_mode^-1(t))."""
    if name == "rf":
        return np.ones_like(t)
    if name == "rf/cosmap":
        return 2 / (np.pi - 2 * np.pi * t + 2 * np.pi * t**2)
    if name.startswith("rf/lognorm"):
        m, s = (float(x) for x in name[11:-1].split(","))
        logit = np.log(t / (1 - t))
        return np.exp(-((logit - m) ** 2) / (2 * s * s)) / (s * np.sqrt(2 * np.pi) * t * (1 - t))
    s = float(name[8:-1])
    u = mode_inverse(np.asarray(t, dtype=np.float64), s)
    return 1 / np.abs(-1 - s * (1 - np.pi / 2 * np.sin(np.pi * u)))


def ref_weight(name, t):
    """The paper's w_t (PAPER 1 table, t ~ U(0, 1)) and the sampler density pi(t)."""
    lam, dlam = ref_lam_dlam(name, t)
    if name.startswith("rf"):
        return t / (1 - t) * ref_density(name, t), ref_density(name, t)
    one = np.ones_like(t)
    if name == "eps/linear":
        return -2 / dlam, one
    if name == "v/linear":
        return -2 / (ref_ab(name, t)[0] ** 2 * dlam), one
    if name == "eps/cos":
        return 1 / np.cosh(lam / 2), one
    if name == "v/cos":
        return np.exp(-lam / 2), one
    if name.startswith("edm("):
        pm, ps = (float(x) for x in name[4:-1].split(","))
        return stats.norm.pdf(lam, -2 * pm, 2 * ps) * (np.exp(-lam) + SD2), one
    # edm/rf, edm/cos: EDM with rf's / cos's schedule, so its log-SNR density is rf's / cos's under t ~ U(0, 1)
    density = t * (1 - t) / 2 if name == "edm/rf" else np.sin(np.pi * t) / (2 * np.pi)
    return density * (np.exp(-lam) + SD2), one


def ref_denoise(name, net, z, t):
    """(x0_hat, eps_hat) written out for each prediction type, with a, b from ref_ab."""
    a, b = (torch.from_numpy(np.asarray(c)).reshape(-1, 1, 1, 1) for c in ref_ab(name, t))
    if name.startswith("rf"):
        return z - b * net, z + a * net
    if name.startswith("eps"):
        return (z - b * net) / a, net
    if name.startswith("v"):
        return a * z - b * net, b * z + a * net
    sigma = b  # EDM: D = c_skip z + c_out F
    c_skip, c_out = SD2 / (sigma**2 + SD2), sigma * 0.5 / torch.sqrt(sigma**2 + SD2)
    x0 = c_skip * z + c_out * net
    return x0, (z - x0) / sigma


# -- names -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, canonical", [
    ("rf", "rf"), (" rf ", "rf"), ("rf/lognorm(0, 1)", "rf/lognorm(0.00, 1.00)"),
    ("rf/lognorm(0.00,1.00)", "rf/lognorm(0.00, 1.00)"), ("rf / lognorm ( 0.5 , .6 )", "rf/lognorm(0.50, 0.60)"),
    ("rf/mode(1.29)", "rf/mode(1.29)"), ("rf/mode(-1)", "rf/mode(-1.00)"), ("rf/mode(1.75)", "rf/mode(1.75)"),
    ("rf/mode(0)", "rf"), ("rf/mode(1.2917)", "rf/mode(1.2917)"), ("rf/cosmap", "rf/cosmap"),
    ("eps/linear", "eps/linear"), ("v/linear", "v/linear"), ("eps/cos", "eps/cos"), ("v/cos", "v/cos"),
    ("edm(0, 0.6)", "edm(0.00, 0.60)"), ("edm(-1.2,1.2)", "edm(-1.20, 1.20)"), ("edm(-0.0, 1.8)", "edm(0.00, 1.80)"),
    ("edm/rf", "edm/rf"), ("edm/cos", "edm/cos"),
])
def test_from_name_canonical(given, canonical):
    assert Formulation.from_name(given).name == canonical


def test_paper_grid():
    assert len(GRID) == 61 and len(set(GRID)) == 61
    assert len(TABLE1) == 16 and set(TABLE1) <= set(GRID)
    assert [Formulation.from_name(n).name for n in GRID] == GRID
    count = lambda prefix: sum(n.startswith(prefix) for n in GRID)
    assert count("rf/mode") + ("rf" in GRID) == 9 and count("rf/lognorm") == 30 and count("edm(") == 15
    assert {"rf/mode(-1.00)", "rf/mode(-0.54)", "rf/mode(-0.08)", "rf/mode(0.38)", "rf/mode(0.83)", "rf/mode(1.00)",
            "rf/mode(1.29)", "rf/mode(1.75)"} == {n for n in GRID if n.startswith("rf/mode")}


@pytest.mark.parametrize("bad", [
    "", "flow", "rf/foo", "rf/lognorm", "rf/lognorm()", "rf/lognorm(0)", "rf/lognorm(0, 1, 2)", "rf/lognorm(0, 0)",
    "rf/lognorm(0, -1)", "rf/lognorm(a, 1)", "rf/mode", "rf/mode(1.76)", "rf/mode(-1.01)", "rf/mode(nan)",
    "rf/mode(inf)", "edm", "edm()", "edm(0)", "edm(0, 0)", "edm(0, -0.6)", "edm/foo", "eps/linearx", "v",
])
def test_from_name_rejects(bad):
    with pytest.raises(ValueError, match=r"accepted forms: rf, rf/lognorm\(m, s\), rf/mode\(s\).*edm\(Pm, Ps\)"):
        Formulation.from_name(bad)


@pytest.mark.parametrize("bad, kind", [
    ("rf/lognorm(0, -1)", "invalid"), ("rf/mode(1.76)", "invalid"), ("edm(0)", "invalid"),
    ("rf/lognorm(a, 1)", "invalid"),
    ("rf/foo", "unknown"), ("flow", "unknown"), ("edm/foo", "unknown"),
])
def test_from_name_says_unknown_or_invalid(bad, kind):
    """A name no form matches is unknown; a known form with bad parameters is invalid."""
    with pytest.raises(ValueError, match=rf"^{kind} formulation "):
        Formulation.from_name(bad)


# -- t samplers (PAPER 2) --------------------------------------------------------------------------------------------

SAMPLERS = ["rf", "rf/lognorm(0.00, 1.00)", "rf/lognorm(1.00, 0.60)", "rf/lognorm(-0.50, 1.80)", "rf/mode(1.29)",
            "rf/mode(1.75)", "rf/mode(-1.00)", "rf/mode(0.50)", "rf/cosmap"]


@pytest.mark.parametrize("name", SAMPLERS)
def test_sample_t_matches_density(name):
    f = Formulation.from_name(name)
    t = f.sample_t(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    assert 0 < t.min() and t.max() < 1
    assert stats.kstest(t, ref_cdf(name)).pvalue > 1e-3
    grid = np.linspace(0.01, 0.99, 99)
    np.testing.assert_allclose(f.t_density(f64(grid)).numpy(), ref_density(name, grid), rtol=1e-5)
    if not name.startswith("rf/mode"):  # mode's density is 1/|f_mode'| of the reference, singular at an end for s=-1
        assert integrate.quad(lambda x: float(f.t_density(f64(x))), 0, 1)[0] == pytest.approx(1, abs=1e-6)


def test_ks_rejects_wrong_density():
    t = Formulation.from_name("rf/lognorm(0, 1)").sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert stats.kstest(t.numpy(), ref_cdf("rf/lognorm(0.30, 1.00)")).pvalue < 1e-6


def test_sampler_moments():
    g = torch.Generator().manual_seed(1)
    n = 40000
    t = Formulation.from_name("rf/lognorm(0.5, 0.6)").sample_t(n, generator=g, dtype=torch.float64)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 4 * 0.6 / math.sqrt(n)
    assert abs(logit.std().item() - 0.6) < 4 * 0.6 / math.sqrt(2 * n)
    for s in (-1.0, 1.29):  # mode: E t = 1/2 for every s; E t^2 = int_0^1 f_mode(u)^2 du
        t = Formulation.from_name(f"rf/mode({s})").sample_t(n, generator=g, dtype=torch.float64)
        m2 = integrate.quad(lambda u: (1 - u - s * (math.cos(math.pi * u / 2) ** 2 - 1 + u)) ** 2, 0, 1)[0]
        assert abs(t.mean().item() - 0.5) < 4 * math.sqrt(m2 - 0.25) / math.sqrt(n)
        assert abs((t**2).mean().item() - m2) < 0.01
    # cosmap: rf's log-SNR 2 log((1-t)/t) is distributed like cos's 2 log cot(pi u / 2), u uniform
    t = Formulation.from_name("rf/cosmap").sample_t(n, generator=g, dtype=torch.float64)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    lam_rf, lam_cos = 2 * torch.log((1 - t) / t), 2 * torch.log(1 / torch.tan(math.pi * u / 2))
    assert stats.ks_2samp(lam_rf.numpy(), lam_cos.numpy()).pvalue > 1e-3


def test_sample_t_shift_generator_and_range():
    f = Formulation.from_name("rf/lognorm(0, 1)")
    t1 = f.sample_t(1000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t3 = f.sample_t(1000, generator=torch.Generator().manual_seed(5), shift=3.0, dtype=torch.float64)
    torch.testing.assert_close(t3, 3 * t1 / (1 + 2 * t1), rtol=1e-12, atol=0)
    again = f.sample_t(1000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(t1, again)
    assert not torch.equal(t1, f.sample_t(1000, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    shifted_cdf = lambda x: ref_cdf("rf/lognorm(0.00, 1.00)")(x / (3 - 2 * x))  # inverse shift of x
    assert stats.kstest(f.sample_t(20000, generator=torch.Generator().manual_seed(2), shift=3.0).numpy(),
                        shifted_cdf).pvalue > 1e-3
    t = Formulation.from_name("rf/lognorm(0, 2.2)").sample_t(100000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and 0 < t.min() and t.max() < 1  # float32 never rounds to 0 or 1


@pytest.mark.parametrize("name", ["v/cos", "eps/linear", "edm(0.00, 0.60)"])
@pytest.mark.parametrize("alpha", [3.0, 0.5])
def test_sample_t_shift_is_a_log_snr_shift_on_every_path(name, alpha):
    """PAPER 5: the shift moves every draw's log-SNR by -2 log(alpha), whatever the path's t-parametrisation."""
    f = Formulation.from_name(name)
    t1 = f.sample_t(4000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = f.sample_t(4000, generator=torch.Generator().manual_seed(3), shift=alpha, dtype=torch.float64)
    target = f.lam(t1) - 2 * math.log(alpha)
    reach = target > f.lam(torch.tensor(1.0, dtype=torch.float64)) + 1e-6  # LDM's SNR floor: draws past it sit at 1
    assert reach.float().mean() > 0.75 and torch.all(ts[~reach] > 1 - 1e-6)
    torch.testing.assert_close(f.lam(ts)[reach], target[reach], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(f.lam(shift_time(t1, alpha))[reach], target[reach])  # shifting t itself would not


def test_sample_t_shift_of_the_rf_family_is_shift_time():
    for name in ("rf", "rf/lognorm(0.00, 1.00)", "rf/mode(1.29)", "edm/rf"):
        f = Formulation.from_name(name)
        t1 = f.sample_t(1000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        t3 = f.sample_t(1000, generator=torch.Generator().manual_seed(5), shift=3.0, dtype=torch.float64)
        eps = torch.finfo(torch.float64).eps
        raw = f.sampler.draw(1000, torch.Generator().manual_seed(5))
        assert torch.equal(t3, shift_time(raw, 3.0).clamp(eps, 1 - eps)), name  # bit for bit as before
        assert torch.equal(t1, raw.clamp(eps, 1 - eps)), name


def test_shift_time():
    t = f64(np.linspace(0.001, 0.999, 50))
    rf = Formulation.from_name("rf")
    for alpha in (0.5, 3.0):
        torch.testing.assert_close(rf.lam(shift_time(t, alpha)), rf.lam(t) - 2 * math.log(alpha))
    assert shift_time(0.5, 3.0) == pytest.approx(0.75) and shift_time(t, 1.0) is t
    with pytest.raises(ValueError, match="alpha must be > 0"):
        shift_time(t, 0.0)


# -- paths (PAPER 1) -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", GRID)
def test_path_boundaries_and_derivatives(name):
    f = Formulation.from_name(name)
    assert float(f.a(f64(0.0))) == 1.0 and float(f.b(f64(0.0))) == 0.0  # t = 0 is data
    if name.startswith("edm"):  # t = 1 is infinite noise: sigma grows without bound; sampling stops at sigma_max
        assert float(f.b(f64(f.t_max))) > 40 and float(f.a(f64(f.t_max))) == 1.0
    elif name.endswith("linear"):  # LDM's last discrete step: SNR small but not zero
        assert float(f.a(f64(1.0))) ** 2 == pytest.approx(ldm_alphabar()[-1], rel=1e-12)
    else:
        assert float(f.a(f64(1.0))) == 0.0 and float(f.b(f64(1.0))) == 1.0
    t = np.array([0.05, 0.2, 0.37, 0.5, 0.63, 0.8, 0.95]) + 3.7e-4  # off the LDM nodes (j / 1000)
    a, b = ref_ab(name, t)
    np.testing.assert_allclose(f.a(f64(t)).numpy(), a, rtol=1e-12)
    np.testing.assert_allclose(f.b(f64(t)).numpy(), b, rtol=1e-12)
    lam, dlam = ref_lam_dlam(name, t)
    np.testing.assert_allclose(f.lam(f64(t)).numpy(), lam, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(f.dlam(f64(t)).numpy(), dlam, rtol=1e-6)
    h = 1e-7
    for fn, dfn in ((f.a, f.da), (f.b, f.db), (f.lam, f.dlam)):
        fd = (fn(f64(t + h)) - fn(f64(t - h))) / (2 * h)
        np.testing.assert_allclose(dfn(f64(t)).numpy(), fd.numpy(), rtol=1e-6, atol=1e-8)


def test_ldm_nodes_are_the_discrete_schedule():
    f = Formulation.from_name("eps/linear")
    i = np.arange(1000)
    np.testing.assert_allclose(f.a(f64((i + 1) / 1000)).numpy() ** 2, ldm_alphabar(), rtol=1e-12)
    assert torch.all(torch.diff(ldm_log_alphabar()) < 0)


@pytest.mark.parametrize("name", KINDS)
def test_from_rf_time_matches_log_snr(name):
    f, rf = Formulation.from_name(name), Formulation.from_name("rf")
    t = f64(np.linspace(0.02, 0.92, 40))  # LDM's lowest SNR is rf's t ~ 0.936
    np.testing.assert_allclose(f.lam(f.from_rf_time(t)).numpy(), rf.lam(t).numpy(), rtol=1e-7)
    assert float(f.from_rf_time(f64(0.0))) == 0.0 and float(f.from_rf_time(f64(1.0))) >= f.t_max


# -- losses and parametrisations (PAPER 1) ---------------------------------------------------------------------------

def batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    x0, eps, net = (torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = 0.02 + 0.96 * torch.rand(n, generator=g, dtype=torch.float64)
    return x0, eps, net, t


@pytest.mark.parametrize("name", GRID)
def test_loss_is_weighted_eps_loss(name):
    f = Formulation.from_name(name)
    x0, eps, net, t = batch(1)
    tn = t.numpy()
    w, pi = ref_weight(name, tn)
    np.testing.assert_allclose(f.w(t).numpy(), w, rtol=1e-6)
    a, b = (torch.from_numpy(c).reshape(-1, 1, 1, 1) for c in ref_ab(name, tn))
    z = a * x0 + b * eps
    _, eps_hat = ref_denoise(name, net, z, tn)
    dlam = ref_lam_dlam(name, tn)[1]
    expected = -0.5 * w / pi * dlam * ((eps_hat - eps) ** 2).flatten(1).mean(1).numpy()
    np.testing.assert_allclose(f.loss(net, x0, eps, t).numpy(), expected, rtol=1e-6)


def test_rf_velocity_mse_is_eps_loss_with_t_over_1_minus_t():
    f = Formulation.from_name("rf")
    x0, eps, net, t = batch(2)
    velocity_mse = ((net - (eps - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(f.loss(net, x0, eps, t), velocity_mse, rtol=0, atol=0)
    tt = t.reshape(-1, 1, 1, 1)
    eps_hat = (1 - tt) * x0 + tt * eps + (1 - tt) * net  # z + (1 - t) v
    eps_form = -0.5 * (t / (1 - t)) * (-2 / (t * (1 - t))) * ((eps_hat - eps) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(velocity_mse, eps_form, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name, constant, target", [
    ("rf/mode(1.29)", 1.0, lambda x0, e, a, b: e - x0), ("eps/linear", 1.0, lambda x0, e, a, b: e),
    ("v/linear", 1.0, lambda x0, e, a, b: a * e - b * x0), ("eps/cos", math.pi, lambda x0, e, a, b: e),
    ("v/cos", math.pi / 2, lambda x0, e, a, b: a * e - b * x0),
])
def test_loss_is_plain_mse_times_documented_constant(name, constant, target):
    f = Formulation.from_name(name)
    x0, eps, net, t = batch(3)
    a, b = (torch.from_numpy(c).reshape(-1, 1, 1, 1) for c in ref_ab(name, t.numpy()))
    mse = ((net - target(x0, eps, a, b)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(f.loss(net, x0, eps, t), constant * mse, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["edm(0.00, 0.60)", "edm/rf", "edm/cos"])
def test_edm_loss_is_karras_loss_over_8(name):
    """Karras et al.: E[lambda(sigma) ||D - x0||^2], lambda = (sigma^2 + sd^2) / (sigma sd)^2; ours is 1/8 of it."""
    f = Formulation.from_name(name)
    x0, eps, net, t = batch(4)
    sigma = torch.from_numpy(ref_ab(name, t.numpy())[1]).reshape(-1, 1, 1, 1)
    x0_hat, _ = ref_denoise(name, net, x0 + sigma * eps, t.numpy())
    karras = ((sigma**2 + SD2) / (sigma**2 * SD2) * (x0_hat - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(f.loss(net, x0, eps, t), karras / 8, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", GRID)
def test_target_round_trip(name):
    f = Formulation.from_name(name)
    x0, eps, _, t = batch(5)
    tt = t.reshape(-1, 1, 1, 1)
    z = f.a(tt) * x0 + f.b(tt) * eps
    target = f.target(x0, eps, t)
    x0_hat, eps_hat = f.denoise(target, z, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)
    h = 1e-6  # dz/dt of z_t = a_t x0 + b_t eps by finite differences
    dz = ((f.a(tt + h) - f.a(tt - h)) * x0 + (f.b(tt + h) - f.b(tt - h)) * eps) / (2 * h)
    torch.testing.assert_close(f.velocity(target, z, t), dz, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f.rf_velocity(target, z, t), eps - x0, rtol=1e-9, atol=1e-9)
    if name.startswith("rf"):
        assert torch.equal(target, eps - x0)
    assert torch.equal(f.loss(target, x0, eps, t), torch.zeros(len(t), dtype=torch.float64))


@pytest.mark.parametrize("name", ["edm(0.00, 0.60)", "edm(-1.20, 1.80)", "edm/rf", "edm/cos", "rf", "v/cos"])
def test_network_input(name):
    f = Formulation.from_name(name)
    t = f64(np.linspace(0, f.t_max, 50))
    z = torch.randn(50, 3, 2, 2, dtype=torch.float64)
    z_in, t_in = f.network_input(z, t)
    assert t_in.shape == (50,) and t_in.min() >= 0 and t_in.max() <= 1 and torch.all(torch.diff(t_in) > 0)
    if name.startswith("edm"):  # Karras c_in; t_in is rf's time at the same SNR, sigma / (1 + sigma)
        sigma = f.b(t)
        torch.testing.assert_close(z_in, z / torch.sqrt(sigma**2 + SD2).reshape(-1, 1, 1, 1))
        torch.testing.assert_close(t_in, sigma / (1 + sigma))
        assert t_in.float().unique().numel() == 50  # distinct in float32 right up to sigma_max
    else:
        assert torch.equal(z_in, z) and torch.equal(t_in, t)
    z_in, t_in = f.network_input(z.float(), 0.5)  # a scalar time is broadcast over the batch
    assert t_in.shape == (50,) and t_in.dtype == torch.float32 and z_in.dtype == torch.float32


@pytest.mark.parametrize("name", KINDS)
def test_training_loss(name):
    f = Formulation.from_name(name)
    x0, eps, net, t = batch(6)
    seen = []

    def model_fn(z_in, t_in):
        seen.append((z_in, t_in))
        return net

    torch.testing.assert_close(f.training_loss(model_fn, x0, t=t, eps=eps), f.loss(net, x0, eps, t))
    z_in, t_in = f.network_input(f.a(t.reshape(-1, 1, 1, 1)) * x0 + f.b(t.reshape(-1, 1, 1, 1)) * eps, t)
    torch.testing.assert_close(seen[0][0], z_in)
    torch.testing.assert_close(seen[0][1], t_in)
    first = f.training_loss(model_fn, x0, generator=torch.Generator().manual_seed(9), shift=3.0)
    again = f.training_loss(model_fn, x0, generator=torch.Generator().manual_seed(9), shift=3.0)
    assert torch.equal(first, again) and torch.isfinite(first).all()
    with pytest.raises(ValueError, match="shift"):
        f.training_loss(model_fn, x0, t=t, shift=3.0)


@pytest.mark.parametrize("name, scale", [("rf", 1), ("v/linear", 1), ("eps/cos", 1), ("edm/rf", math.hypot(1, 80))])
def test_prior(name, scale):
    f = Formulation.from_name(name)
    z = f.prior((4, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn((4, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(z, noise * scale)
    assert f.prior_scale == pytest.approx(scale)


def test_sampling_range():
    assert Formulation.from_name("rf").t_max == 1.0 and Formulation.from_name("v/cos").t_max == 1.0
    eps_cos = Formulation.from_name("eps/cos")  # starts at LDM's terminal SNR: x0_hat = (z - b eps)/a needs a > 0
    assert float(eps_cos.a(f64(eps_cos.t_max))) ** 2 == pytest.approx(ldm_alphabar()[-1])
    for name in ("edm(0.00, 0.60)", "edm(1.20, 1.80)", "edm/rf", "edm/cos"):
        f = Formulation.from_name(name)
        assert float(f.b(f64(f.t_max))) == pytest.approx(80, rel=1e-3)
    edm = Formulation.from_name("edm(-1.20, 0.60)")  # sigma = 80 is 9.3 std out: t rounds to 1 in float64
    assert edm.t_max == 1 - 2**-53 and 40 < float(edm.b(f64(edm.t_max))) < 80
