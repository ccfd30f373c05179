"""FID: parity with torchmetrics and scipy, zero on identical sets, growth with a shift."""
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from rectflow.evaluate.frechet import GaussianFit, fid, frechet_distance


class PassThrough(nn.Module):
    """A 'feature extractor' for torchmetrics that returns its input: the features are computed beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def torchmetrics_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    pytest.importorskip("torchmetrics")
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=PassThrough(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def scipy_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def feature_sets(n_real, n_fake, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5
    real = torch.randn(n_real, dim, generator=g) @ mix
    fake = torch.randn(n_fake, dim, generator=g) @ (mix + 0.3 * torch.randn(dim, dim, generator=g) / dim ** 0.5) + 0.2
    return real, fake


@pytest.mark.parametrize("n_real,n_fake,dim", [(400, 300, 32), (60, 50, 64)])  # second: fewer samples than dims
def test_fid_matches_torchmetrics_and_scipy(n_real, n_fake, dim):
    real, fake = feature_sets(n_real, n_fake, dim)
    ours = fid(real, fake)
    reference = torchmetrics_fid(real, fake)
    rel_err = abs(ours - reference) / reference
    print(f"FID ours {ours:.10f} torchmetrics {reference:.10f} relative error {rel_err:.2e}")
    assert rel_err < 1e-3
    assert abs(ours - scipy_fid(real, fake)) / ours < 1e-3
    assert ours > 0.1


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    real, _ = feature_sets(300, 2, 16, seed=1)
    assert abs(fid(real, real)) < 1e-8
    shift = torch.zeros(16)
    previous = 0.0
    for size in (0.1, 0.5, 1.0, 2.0):
        shift[0] = size
        value = fid(real, real + shift)
        # a pure translation leaves the covariances equal: FID is exactly the squared shift
        assert value == pytest.approx(size ** 2, rel=1e-6, abs=1e-8)
        assert value > previous
        previous = value
    # a scale change alters only the covariance term: Tr(S + 4 S - 2 * 2 S) = Tr(S)
    fit = GaussianFit.of(real)
    assert fid(real, 2 * real) == pytest.approx(float(fit.mu.square().sum() + fit.sigma.trace()), rel=1e-6)


def test_gaussian_fit_round_trip_and_errors():
    real, fake = feature_sets(50, 40, 8)
    a, b = GaussianFit.of(real), GaussianFit.of(fake)
    restored = GaussianFit.from_state_dict(a.state_dict())
    assert frechet_distance(restored, b) == frechet_distance(a, b)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(a, GaussianFit.of(torch.randn(10, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        GaussianFit.of(torch.randn(1, 4))
