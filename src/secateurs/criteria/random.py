"""Seeded random scores: the baseline every criterion must beat."""
from __future__ import annotations

import torch
from torch import nn

from ..select import Target
from .base import Calibration, Criterion, Scores


class RandomScores(Criterion):
    name = "random"
    summary = "uniform random, seeded"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def compute(self, model: nn.Module, targets: list[Target], calibration: Calibration) -> Scores:
        generator = torch.Generator().manual_seed(self.seed)
        return {t.name: torch.rand(t.param.shape, generator=generator).to(t.param.device)
                for t in targets}
