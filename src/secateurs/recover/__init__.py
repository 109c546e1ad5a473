"""Getting accuracy back after pruning."""
from .batchnorm import recalibrate_bn
from .callbacks import AGPSchedule, Callback, IterativeSchedule, PruningCallback, lightning_callback, trainer_callback
from .distill import DistillHistory, distill, distillation_gap, kd_loss
from .distributed import check_consistent, save_checkpoint
from .finetune import evaluate_accuracy, finetune
from .guard import GuardReport, GuardStep, guarded_prune
from .regularize import GroupLassoPenalty, SlimmingPenalty, SparsityPenalty, threshold_prune

__all__ = ["AGPSchedule", "Callback", "DistillHistory", "GroupLassoPenalty", "GuardReport", "GuardStep",
           "IterativeSchedule", "PruningCallback", "SlimmingPenalty", "SparsityPenalty", "check_consistent", "distill",
           "distillation_gap", "evaluate_accuracy", "finetune", "guarded_prune", "kd_loss", "recalibrate_bn",
           "save_checkpoint", "threshold_prune", "trainer_callback", "lightning_callback"]
