"""Weight magnitude (Han et al. 2015): small weights matter least. L1 |w|, L2 w^2.

For single weights both rank alike; they differ once scores are summed over a group
(sum of |w| is the group's L1 norm, sum of w^2 its squared L2 norm).
"""
from __future__ import annotations

import torch
from torch import nn

from ..select import Target
from .base import Calibration, Criterion, Scores


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|w|: the one magnitude score, of the unstructured criteria and the LLM engine alike."""
    return weight.abs()


class L1Magnitude(Criterion):
    name = "l1"
    summary = "|w|"

    def compute(self, model: nn.Module, targets: list[Target], calibration: Calibration) -> Scores:
        return {t.name: magnitude_scores(t.param.detach()) for t in targets}


class L2Magnitude(Criterion):
    name = "l2"
    summary = "w^2"

    def compute(self, model: nn.Module, targets: list[Target], calibration: Calibration) -> Scores:
        return {t.name: t.param.detach().pow(2) for t in targets}
