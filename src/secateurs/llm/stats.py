"""Calibration statistics of one linear layer, accumulated batch by batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerStats:
    """Per-input-feature sums of squares and, when asked, the Hessian H = (2/n) sum x x^T.

    Both are updated one batch at a time, so no activations are kept: H is rescaled by
    n_old / n_new before the new batch is added, which keeps it an average throughout.
    """

    columns: int
    with_hessian: bool = False
    tokens: int = 0
    sumsq: torch.Tensor | None = None
    hessian: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add one batch of inputs (any leading shape, features last)."""
        rows = x.detach().reshape(-1, self.columns).float()
        total = self.tokens + rows.shape[0]
        if self.sumsq is None:
            self.sumsq = torch.zeros(self.columns, device=rows.device)
        self.sumsq += rows.pow(2).sum(0)
        if self.with_hessian:
            if self.hessian is None:
                self.hessian = torch.zeros(self.columns, self.columns, device=rows.device)
            self.hessian *= self.tokens / total
            self.hessian.addmm_(rows.t(), rows, alpha=2.0 / total)
        self.tokens = total

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 of each input feature j over every calibration token."""
        return self.sumsq.sqrt()
