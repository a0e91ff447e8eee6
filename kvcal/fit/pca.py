"""PCA bases from streamed moments, in the space where squared error is the error that matters.

A token row ``x`` (layers then heads then dims) is centred and mapped blockwise by the metric's weights
(``kvcal.fit.metric``): ``y = A (x - mean)``. The basis diagonalises the covariance of ``y``, so its coordinates
are uncorrelated *and* squared error on them is the metric's error: coordinate ``i`` costs ``eigenvalue_i`` when
pruned, and quantization error adds up across coordinates. With the ``mse`` metric ``A`` is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcal.capture import StreamingMoments
from kvcal.fit.metric import BlockWeights, weighted_columns


@dataclass(frozen=True)
class PcaBasis:
    mean: torch.Tensor  # [p] float32
    basis: torch.Tensor  # [p, r] float32, orthonormal columns in the weighted space
    eigenvalues: torch.Tensor  # [r] float64, variance along each column, decreasing
    total_variance: float  # trace of the weighted covariance: explained-variance fractions divide by it
    weights: BlockWeights

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def encoder(self, rank: int | None = None) -> torch.Tensor:
        """``E`` ``[p, r]`` with ``coords = (x - mean) @ E``: the blockwise weight, then the basis."""
        return weighted_columns(self.weights.weight, self.basis[:, : self.rank if rank is None else rank])

    def decoder(self, rank: int | None = None) -> torch.Tensor:
        """``D`` ``[r, p]`` with ``x = coords @ D + mean``; ``E @ D`` is the identity on the kept coordinates."""
        return weighted_columns(self.weights.inverse, self.basis[:, : self.rank if rank is None else rank]).T

    def project(self, x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        # The encoder is formed on x's device: at 8B/12B shapes it is a [p, r] product of p ~ 40k, slow on a host.
        basis = self.basis[:, : self.rank if rank is None else rank].to(x.device)
        encoder = weighted_columns(self.weights.weight.to(x.device), basis)
        return (x.float() - self.mean.to(x.device)) @ encoder

    def reconstruct(self, coords: torch.Tensor) -> torch.Tensor:
        return coords @ self.decoder(coords.shape[-1]).to(coords.device) + self.mean.to(coords.device)

    def explained_variance(self) -> torch.Tensor:
        """Cumulative fraction of (weighted) variance kept by the first 1..r components."""
        return (self.eigenvalues.cumsum(0) / max(self.total_variance, 1e-30)).clamp(max=1.0)


def fit_pca_basis(moments: StreamingMoments, rank_cap: int | None = None, weights: BlockWeights | None = None,
                  head_dim: int | None = None) -> PcaBasis:
    """Eigendecomposition of the weighted, centred covariance (float64); keeps at most ``rank_cap`` components.

    Without ``weights`` the metric is plain squared error (``head_dim`` then sizes the identity blocks).
    """
    mean, cov = moments.mean_and_covariance()
    if weights is None:
        d = head_dim or cov.shape[0]
        weights = BlockWeights.identity(cov.shape[0] // d, d)
    cov = weights.apply_to_covariance(cov)
    cov = cov + cov.T
    cov.div_(2)
    total_variance = float(cov.diagonal().sum())
    evals, evecs = torch.linalg.eigh(cov)
    del cov  # [p, p] temporaries are 13 GB each at 12B shapes: only the kept columns are reordered and signed
    order = torch.argsort(evals, descending=True)
    r = evals.numel() if rank_cap is None else min(rank_cap, evals.numel())
    evals, evecs = evals[order].clamp_min(0), evecs[:, order[:r]]
    # eigh's eigenvector signs are arbitrary; fix them (largest entry positive) so refits give identical bytes.
    signs = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    return PcaBasis(
        mean=mean.float().cpu(),
        basis=evecs.float().cpu().contiguous(),
        eigenvalues=evals[:r].cpu(),
        total_variance=total_variance,
        weights=BlockWeights(weights.weight.cpu(), weights.inverse.cpu()),
    )
