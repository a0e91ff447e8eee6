"""PCA bases from streamed moments: a mean and an orthonormal basis ordered by decreasing variance."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcal.capture import StreamingMoments


@dataclass(frozen=True)
class PcaBasis:
    mean: torch.Tensor  # [p] float32
    basis: torch.Tensor  # [p, r] float32, orthonormal columns
    eigenvalues: torch.Tensor  # [r] float64, variance along each column, decreasing
    total_variance: float  # trace of the covariance: explained-variance fractions divide by it

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def project(self, x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        r = self.rank if rank is None else rank
        return (x.float() - self.mean.to(x.device)) @ self.basis[:, :r].to(x.device)

    def reconstruct(self, coords: torch.Tensor) -> torch.Tensor:
        r = coords.shape[-1]
        return coords @ self.basis[:, :r].T.to(coords.device) + self.mean.to(coords.device)

    def explained_variance(self) -> torch.Tensor:
        """Cumulative fraction of variance kept by the first 1..r components."""
        return (self.eigenvalues.cumsum(0) / max(self.total_variance, 1e-30)).clamp(max=1.0)


def fit_pca_basis(moments: StreamingMoments, rank_cap: int | None = None) -> PcaBasis:
    """Eigendecomposition of the centred covariance (float64); keeps at most ``rank_cap`` components."""
    mean, cov = moments.mean_and_covariance()
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(0), evecs[:, order]
    # eigh's eigenvector signs are arbitrary; fix them (largest entry positive) so refits give identical bytes.
    signs = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    r = evals.numel() if rank_cap is None else min(rank_cap, evals.numel())
    return PcaBasis(
        mean=mean.float().cpu(),
        basis=evecs[:, :r].float().cpu().contiguous(),
        eigenvalues=evals[:r].cpu(),
        total_variance=float(cov.diagonal().sum()),
    )
