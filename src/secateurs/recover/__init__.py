"""Getting accuracy back after pruning."""
from .finetune import evaluate_accuracy, finetune
from .regularize import SparsityPenalty, threshold_prune

__all__ = ["SparsityPenalty", "evaluate_accuracy", "finetune", "threshold_prune"]
