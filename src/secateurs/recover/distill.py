"""Knowledge distillation: train the pruned student to match the dense teacher.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network": soften
both models' logits with a temperature T and minimise

    alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * task loss

(the T^2 keeps the soft term's gradients on the scale of the hard one as T grows).
Optionally, chosen intermediate outputs are matched too (MSE, as in FitNets, Romero et
al. 2015). A structurally pruned student has fewer channels there than its teacher, so
each mismatched pair goes through a learned linear projection of the student's channels
to the teacher's, on the one dimension where the shapes differ, fitted by least squares
on the first batch and then trained with the student. A projection needs no record of
which channels were kept, and it also works when the kept channels have drifted during
fine-tuning; it is used only for the loss and is returned, not added to the student.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import LossFn, eval_mode, model_device, split_batch, to_device
from ..errors import IncompatibleLayer, InvalidArgument, MissingData
from ..sparsity import keep_sparse
from .distributed import (average_gradients, broadcast_module, is_distributed, is_wrapped, mean_over_ranks,
                          parallel_training, unwrap)
from .finetune import OPTIMIZERS, check_hooks_follow


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a Tensor, `.logits` (Hugging Face), a dict's "logits", or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InvalidArgument(f"cannot find logits in a model output of type {type(output).__name__}; "
                          "expected a Tensor, an object with .logits, or a tuple starting with the logits")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over samples (or tokens).

    Logits are [..., classes]; every leading position is one sample. `mask` (shaped like
    the leading dims, e.g. an attention mask) keeps only the positions where it is nonzero.
    """
    if student_logits.shape != teacher_logits.shape:
        raise InvalidArgument(f"student logits {tuple(student_logits.shape)} and teacher logits "
                              f"{tuple(teacher_logits.shape)} must have the same shape")
    classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, classes).float()
    teacher = teacher_logits.reshape(-1, classes).float()
    if mask is not None:
        keep = mask.reshape(-1).bool()
        student, teacher = student[keep], teacher[keep]
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


# ------------------------------------------------------------------------ hidden states

def _hidden_tensor(output: Any, name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "last_hidden_state", None) is not None:
        return output.last_hidden_state
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise IncompatibleLayer(f"hidden-state module {name!r} returns {type(output).__name__}; expected a Tensor")


class ChannelProjection(nn.Module):
    """A linear map from the student's channels to the teacher's along one dimension."""

    def __init__(self, student_width: int, teacher_width: int, dim: int):
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(student_width, teacher_width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.movedim(self.dim, -1)).movedim(-1, self.dim)

    @torch.no_grad()
    def fit(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Start from the least-squares map of this batch, not from noise."""
        s = student.movedim(self.dim, -1).reshape(-1, student.shape[self.dim]).float().cpu()
        t = teacher.movedim(self.dim, -1).reshape(-1, teacher.shape[self.dim]).float().cpu()
        solution = torch.linalg.lstsq(s, t).solution        # [student_width, teacher_width]
        self.linear.weight.copy_(solution.T.to(self.linear.weight))


def _projection_for(student: torch.Tensor, teacher: torch.Tensor, name: str) -> ChannelProjection | None:
    """None when the shapes agree; else a projection on the single dimension where they differ."""
    if student.shape == teacher.shape:
        return None
    same_rank = student.dim() == teacher.dim()
    differ = [d for d in range(student.dim()) if student.shape[d] != teacher.shape[d]] if same_rank else []
    if len(differ) != 1 or differ[0] == 0:
        raise IncompatibleLayer(f"hidden pair {name}: student output {tuple(student.shape)} and teacher output "
                                f"{tuple(teacher.shape)} must differ in one non-batch dimension (the channels) at most")
    projection = ChannelProjection(student.shape[differ[0]], teacher.shape[differ[0]], differ[0])
    projection.to(device=student.device, dtype=student.dtype).fit(student.detach(), teacher.detach())
    return projection


class HiddenMatcher:
    """Forward hooks that capture chosen student / teacher outputs and their MSE. Call `remove()`.

    With `shared` (a student training on every rank) each new projection takes rank 0's fit.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Sequence[tuple[str, str]],
                 shared: bool = False):
        student, self.shared = unwrap(student), shared
        self.pairs = [(s, t) for s, t in pairs]
        self.outputs: dict[tuple[str, str], torch.Tensor] = {}
        self.projections: dict[str, ChannelProjection | None] = {}
        self.new_parameters: list[nn.Parameter] = []
        self.handles = []
        try:
            for s, t in self.pairs:
                self.handles.append(_submodule(student, s, "student").register_forward_hook(self._capture("student", s)))
                self.handles.append(_submodule(teacher, t, "teacher").register_forward_hook(self._capture("teacher", t)))
        except InvalidArgument:
            self.remove()
            raise

    def _capture(self, side: str, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[(side, name)] = _hidden_tensor(output, name)
        return hook

    def loss(self) -> torch.Tensor:
        """Mean over pairs of the MSE between the (projected) student output and the teacher output."""
        terms = []
        for s, t in self.pairs:
            student, teacher = self._take("student", s), self._take("teacher", t).detach()
            key = f"{s}->{t}"
            if key not in self.projections:
                projection = _projection_for(student, teacher, key)
                self.projections[key] = projection
                if projection is not None:
                    if self.shared:
                        broadcast_module(projection)
                    self.new_parameters += list(projection.parameters())
            projection = self.projections[key]
            terms.append(F.mse_loss((projection(student) if projection is not None else student).float(), teacher.float()))
        return torch.stack(terms).mean()

    def _take(self, side: str, name: str) -> torch.Tensor:
        if (side, name) not in self.outputs:
            raise IncompatibleLayer(f"hidden: the {side}'s module {name!r} did not run in the forward pass")
        return self.outputs.pop((side, name))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _submodule(model: nn.Module, name: str, side: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise InvalidArgument(f"hidden: the {side} has no module {name!r}; expected a name from named_modules()") from None


# ------------------------------------------------------------------------ training loop

@dataclass
class DistillHistory:
    """Mean of each loss term per epoch, and the learned hidden-state projections."""

    loss: list[float] = field(default_factory=list)
    kd: list[float] = field(default_factory=list)
    task: list[float] = field(default_factory=list)
    hidden: list[float] = field(default_factory=list)
    projections: dict[str, nn.Module | None] = field(default_factory=dict)


def _check_arguments(student: nn.Module, teacher: nn.Module, epochs: int, lr: float, temperature: float,
                     alpha: float, hidden: Sequence[tuple[str, str]] | None, optimizer: str) -> None:
    if student is teacher:
        raise InvalidArgument("student and teacher are the same module; distil from a copy of the dense model "
                              "(copy.deepcopy(model) before pruning)")
    if optimizer not in OPTIMIZERS:
        raise InvalidArgument(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise InvalidArgument(f"epochs must be an integer >= 0, got {epochs!r}")
    if not lr > 0:
        raise InvalidArgument(f"lr must be > 0, got {lr!r}")
    if not temperature > 0:
        raise InvalidArgument(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgument(f"alpha must be in [0, 1] (the weight of the distillation term), got {alpha!r}")
    for pair in hidden or ():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(n, str) for n in pair)):
            raise InvalidArgument(f"hidden must be a list of (student_module, teacher_module) name pairs, got {pair!r}")


def _teacher_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The teacher needs no labels: without them a Hugging Face model skips its own loss."""
    return args, {k: v for k, v in kwargs.items() if k != "labels"}


def _task_loss(output: Any, logits: torch.Tensor, targets: Any, loss_fn: LossFn) -> torch.Tensor:
    """The model's own `.loss` when it returns one (Hugging Face with labels), else loss_fn(logits, targets)."""
    own = getattr(output, "loss", None)
    if isinstance(own, torch.Tensor):
        return own
    if targets is None:
        raise MissingData("alpha < 1 needs labels for the task loss: batches of (inputs, targets) or dicts "
                          "with 'labels' (or pass alpha=1.0 to train on the teacher alone)")
    return loss_fn(logits, targets)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    epochs: int = 1,
    lr: float = 1e-3,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    hidden: Sequence[tuple[str, str]] | None = None,
    hidden_weight: float = 1.0,
    loss_fn: LossFn = F.cross_entropy,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    on_step: Callable[[int], Any] | None = None,
    parallel: str | None = "auto",
) -> DistillHistory:
    """Train `student` towards `teacher` on `data`; pruned weights stay exactly zero.

    Batches are those of `finetune`: (inputs, targets), or dicts of keyword inputs with
    "labels" (Hugging Face). The teacher runs in eval mode without gradients and is left
    as it was. `hidden` lists (student module, teacher module) names whose outputs are
    matched by MSE, weighted by `hidden_weight`. `on_step(step)` runs after each
    optimizer step (pass `PruningCallback.on_step_end` for gradual pruning). Under
    torchrun the student trains on all processes as in `finetune` (`parallel`), the
    teacher whole on every rank.
    """
    _check_arguments(student, teacher, epochs, lr, temperature, alpha, hidden, optimizer)
    check_hooks_follow(student, parallel, on_step=on_step)
    with parallel_training(student, parallel, data) as (trainee, batches):
        return _train(trainee, teacher, batches, epochs, OPTIMIZERS[optimizer], lr, weight_decay, on_step,
                      hidden, {"temperature": temperature, "alpha": alpha, "loss_fn": loss_fn,
                                "hidden_weight": hidden_weight})


def _train(student: nn.Module, teacher: nn.Module, data: Iterable[Any], epochs: int, make_optimizer: Callable,
           lr: float, weight_decay: float, on_step: Callable[[int], Any] | None,
           hidden: Sequence[tuple[str, str]] | None, loss_options: dict[str, Any]) -> DistillHistory:
    opt = make_optimizer([p for p in student.parameters() if p.requires_grad], lr, weight_decay)
    keeper = keep_sparse(opt, student)
    shared = is_distributed() and is_wrapped(student)
    matcher = HiddenMatcher(student, teacher, hidden, shared=shared) if hidden else None
    projection_params: list[nn.Parameter] = []   # trained alongside, outside any DDP / FSDP wrapper
    student_device, teacher_device = model_device(student), model_device(teacher)
    was_training = student.training
    student.train()
    history, step = DistillHistory(), 0
    sums: dict[str, list[float]] = {"loss": [], "kd": [], "task": [], "hidden": []}
    counts: list[int] = []
    try:
        with eval_mode(teacher):
            for _ in range(epochs):
                epoch = dict.fromkeys(sums, 0.0)
                batches = 0
                for batch in data:
                    terms = _distill_step(student, teacher, batch, student_device, teacher_device,
                                          matcher=matcher, **loss_options)
                    if matcher is not None and matcher.new_parameters:
                        opt.add_param_group({"params": matcher.new_parameters})
                        projection_params += matcher.new_parameters
                        matcher.new_parameters = []
                    opt.zero_grad(set_to_none=True)
                    terms["loss"].backward()
                    if shared:
                        average_gradients(projection_params)
                    opt.step()
                    step += 1
                    if on_step is not None:
                        on_step(step)
                    for key, value in terms.items():
                        epoch[key] += float(value.detach())
                    batches += 1
                for key, value in epoch.items():
                    sums[key].append(value)
                counts.append(batches)
        for key, totals in sums.items():
            setattr(history, key, mean_over_ranks(totals, counts, student))
    finally:
        keeper.remove()
        if matcher is not None:
            matcher.remove()
            history.projections = dict(matcher.projections)
        student.train(was_training)
    return history


def _distill_step(student: nn.Module, teacher: nn.Module, batch: Any, student_device: torch.device,
                  teacher_device: torch.device, temperature: float, alpha: float, loss_fn: LossFn,
                  matcher: HiddenMatcher | None, hidden_weight: float) -> dict[str, torch.Tensor]:
    """The loss terms of one batch (the total under "loss")."""
    args, kwargs, targets = split_batch(to_device(batch, student_device))
    t_args, t_kwargs = _teacher_inputs(*split_batch(to_device(batch, teacher_device))[:2])
    with torch.no_grad():
        teacher_logits = logits_of(teacher(*t_args, **t_kwargs)).to(student_device)
    output = student(*args, **kwargs)
    logits = logits_of(output)
    mask = kwargs.get("attention_mask")
    mask = mask if mask is not None and logits.dim() == 3 and mask.shape == logits.shape[:2] else None
    zero = logits.new_zeros(())
    kd = kd_loss(logits, teacher_logits, temperature, mask) if alpha > 0 else zero
    task = _task_loss(output, logits, targets, loss_fn) if alpha < 1 else zero
    matched = matcher.loss() if matcher is not None else zero
    total = alpha * kd + (1 - alpha) * task + hidden_weight * matched
    return {"loss": total, "kd": kd, "task": task, "hidden": matched}


def distillation_gap(student: nn.Module, teacher: nn.Module, data: Iterable[Any], temperature: float = 1.0) -> float:
    """Mean KL(teacher || student) of the softened outputs over `data` (times T^2), both in eval mode."""
    if not temperature > 0:
        raise InvalidArgument(f"temperature must be > 0, got {temperature!r}")
    total, batches = 0.0, 0
    student_device, teacher_device = model_device(student), model_device(teacher)
    with torch.no_grad(), eval_mode(student), eval_mode(teacher):
        for batch in data:
            args, kwargs, _ = split_batch(to_device(batch, student_device))
            t_args, t_kwargs = _teacher_inputs(*split_batch(to_device(batch, teacher_device))[:2])
            s_logits = logits_of(student(*args, **{k: v for k, v in kwargs.items() if k != "labels"}))
            t_logits = logits_of(teacher(*t_args, **t_kwargs)).to(student_device)
            total += float(kd_loss(s_logits, t_logits, temperature))
            batches += 1
    if not batches:
        raise MissingData("distillation_gap got no batches in data")
    return total / batches


__all__ = ["ChannelProjection", "DistillHistory", "HiddenMatcher", "distill", "distillation_gap", "kd_loss", "logits_of"]
