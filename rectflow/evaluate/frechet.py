"""Frechet distance between Gaussian fits of image features (FID, docs/paper.md §3: "FID on CLIP L/14 image features").

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

Everything runs in float64. The trace of the matrix square root uses the symmetric form
Tr((S_1 S_2)^(1/2)) = Tr((S_1^(1/2) S_2 S_1^(1/2))^(1/2)): S_1 S_2 is not symmetric, but it is similar to the
symmetric positive semi-definite S_1^(1/2) S_2 S_1^(1/2), so both have the same non-negative eigenvalues, and a
symmetric eigensolver never returns the small imaginary parts that a general sqrtm does on rank-deficient covariances
(fewer samples than feature dimensions).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GaussianFit:
    """Mean and unbiased covariance (divided by n - 1) of a set of feature vectors, in float64."""

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int

    @classmethod
    def of(cls, features: torch.Tensor) -> "GaussianFit":
        """Fit a Gaussian to features [N, D]."""
        if features.dim() != 2 or features.shape[0] < 2:
            raise ValueError(f"need features of shape [N >= 2, D] to fit a Gaussian, got {tuple(features.shape)}")
        x = features.detach().to("cpu", torch.float64)
        mu = x.mean(0)
        centred = x - mu
        sigma = centred.T @ centred / (x.shape[0] - 1)
        return cls(mu=mu, sigma=sigma, n=x.shape[0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors for a safetensors cache file."""
        return {"mu": self.mu, "sigma": self.sigma, "n": torch.tensor(self.n)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "GaussianFit":
        """Inverse of state_dict."""
        return cls(mu=state["mu"].double(), sigma=state["sigma"].double(), n=int(state["n"]))


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """Tr((S_1 S_2)^(1/2)) for covariance matrices, via the similar symmetric matrix S_1^(1/2) S_2 S_1^(1/2)."""
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    vals = torch.linalg.eigvalsh((middle + middle.T) / 2)
    return vals.clamp(min=0).sqrt().sum()


def frechet_distance(a: GaussianFit, b: GaussianFit) -> float:
    """Frechet distance between two Gaussian fits (squared 2-Wasserstein distance between the Gaussians)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {tuple(a.mu.shape)} vs {tuple(b.mu.shape)}")
    mean_term = (a.mu - b.mu).square().sum()
    cov_term = a.sigma.trace() + b.sigma.trace() - 2 * trace_sqrt_product(a.sigma, b.sigma)
    return float(mean_term + cov_term)


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two feature sets [N, D] and [M, D]."""
    return frechet_distance(GaussianFit.of(features_a), GaussianFit.of(features_b))
