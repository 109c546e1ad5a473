"""ALPS (Meng et al. 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for
Large Language Models"): the layer-wise problem solved by ADMM, then a refit of the kept weights.

The problem: min_W' ||X (W - W')^T||^2 subject to W' having the wanted sparsity (per row, or
N:M). ADMM splits W' into a dense W and a sparse D with the constraint W = D and a scaled
dual V:  W <- (W0 H + rho (D - V)) (H + rho I)^-1,  D <- the projection of W + V onto the
sparse set (its largest magnitudes),  V <- V + W - D, with the penalty rho growing each
step so the support settles. With the support fixed, preconditioned conjugate gradients
refit the kept weights (min (w - w0)^T H (w - w0) per row), the paper's PCG step.

H is the SparseGPT Hessian (2/n) X^T X, damped by `damp` times its mean diagonal. We run
ADMM in the coordinates where H has a unit diagonal (W_ij * sqrt(H_jj)), so the projection
keeps the largest Wanda-like scores rather than the largest raw weights.
"""
from __future__ import annotations

import torch

from ..allocate import keep_mask
from ..errors import MissingData
from .engine import LLMConfig, register_method
from .stats import LayerStats

ADMM_STEPS = 40
RHO_START, RHO_GROWTH = 0.1, 1.2  # rho ends near 150: the support has settled
PCG_STEPS = 40


def admm_support(dense: torch.Tensor, h: torch.Tensor, keep) -> torch.Tensor:
    """The bool support ADMM settles on for `dense` under the (scaled) Hessian `h`."""
    eigenvalues, q = torch.linalg.eigh(h.double())
    eigenvalues, q = eigenvalues.float(), q.float()
    target = dense @ h  # W0 H
    support = keep(dense.abs())
    d = dense * support
    v = torch.zeros_like(dense)
    rho = RHO_START
    for _ in range(ADMM_STEPS):
        w = (((target + rho * (d - v)) @ q) / (eigenvalues + rho)) @ q.t()
        z = w + v
        support = keep(z.abs())
        d = z * support
        v = z - d
        rho *= RHO_GROWTH
    return support


def refit(dense: torch.Tensor, h: torch.Tensor, support: torch.Tensor, start: torch.Tensor,
          steps: int = PCG_STEPS) -> torch.Tensor:
    """The weights on `support` minimising each row's (w - w0)^T H (w - w0), by batched PCG from `start`."""
    inverse_diag = 1 / h.diagonal().clamp_min(1e-12)
    w = start * support
    residual = ((dense - w) @ h) * support
    z = residual * inverse_diag
    p = z
    rz = (residual * z).sum(1)
    for _ in range(steps):
        hp = (p @ h) * support
        curvature = (p * hp).sum(1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        w = w + alpha.unsqueeze(1) * p
        residual = residual - alpha.unsqueeze(1) * hp
        z = residual * inverse_diag
        rz_next = (residual * z).sum(1)
        p = z + (rz_next / rz.clamp_min(1e-30)).unsqueeze(1) * p
        rz = rz_next
    return w * support


@register_method("alps", statistic="hessian")
def prune_alps(weight: torch.Tensor, stats: LayerStats | None, config: LLMConfig,
               name: str) -> tuple[torch.Tensor, str]:
    """Return `weight` ([out, in]) pruned by ADMM with its kept weights refit, and an empty note."""
    if stats is None or stats.hessian is None:
        raise MissingData(f"method 'alps': layer {name} never ran on the calibration data")
    h = stats.hessian.to(weight.device).float()
    # in the coordinates where H has a unit diagonal, W * ||X_j||, the projection's largest
    # magnitudes are the largest Wanda scores; damping keeps dead inputs invertible
    h = h + config.damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], device=h.device)
    scale = h.diagonal().sqrt()
    h = h / scale.unsqueeze(0) / scale.unsqueeze(1)
    w = weight.float() * scale

    def keep(magnitude: torch.Tensor) -> torch.Tensor:
        return keep_mask(magnitude, config.sparsity, config.nm, config.compare, name)

    support = admm_support(w, h, keep)
    return refit(w, h, support, w) / scale, ""
