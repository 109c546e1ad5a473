"""Recovery on 2 CPU processes over gloo, run by test_recover_distributed.py under torchrun.

    torchrun --standalone --nproc_per_node 2 tests/distributed_recovery.py OUT

Every rank runs each scenario and writes what it saw to OUT/rank<r>.json; the test
compares the ranks. A scenario checks on its own rank what needs no comparison (pruned
weights exactly zero in this rank's shard) and returns digests and losses for the rest.
"""
from __future__ import annotations

import functools
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from secateurs import prune
from secateurs.errors import InvalidArgument
from secateurs.io import load_into, load_state
from secateurs.recover import IterativeSchedule, PruningCallback, distill, finetune
from secateurs.recover.distributed import check_consistent, save_checkpoint, state_digest, world
from secateurs.sparsity import _like, masked_params, sparsity_of

STEPS_DATA = {"batches": 8, "batch_size": 4}


def build(hidden: int = 16, norm: bool = True) -> nn.Module:
    """The recipe's model factory too (the recipe names "tests.distributed_recovery:build").

    Without `norm` (no BatchNorm, whose batch statistics depend on how batches are split)
    training on 2 ranks computes what one process computes on their batches joined.
    """
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 16),
                         nn.BatchNorm1d(16) if norm else nn.Identity(), nn.ReLU(), nn.Linear(16, 4))


def batches(batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batches * batch_size, 8, generator=g)
    y = (x[:, :4].sum(1) > 0).long() * 2 + (x[:, 4:].sum(1) > 0).long()
    return list(zip(x.split(batch_size), y.split(batch_size)))


def merged(data: list, size: int) -> list:
    """What one process sees when `size` ranks each take one batch per step: their batches joined."""
    return [tuple(torch.cat(parts) for parts in zip(*data[i:i + size])) for i in range(0, len(data), size)]


def pruned(norm: bool = True) -> nn.Module:
    model = build(norm=norm)
    prune(model, "magnitude", 0.5)
    return model


def zeros_kept(model: nn.Module) -> bool:
    """Every pruned weight is exactly zero in this rank's own copy or shard."""
    found = False
    for mp in masked_params(model):
        weight, mask = mp.param.detach(), _like(mp.mask, mp.param)
        if isinstance(weight, DTensor):
            weight, mask = weight.to_local(), mask.to_local()
        found = True
        if bool(weight[~mask].any()):
            return False
    return found


def state_close(model: nn.Module, reference: nn.Module) -> float:
    """Largest difference between the model's full state and a one-process reference's (0 on other ranks)."""
    from secateurs.recover.distributed import full_state_dict

    state, expected = full_state_dict(model), reference.state_dict()
    if world()[0] != 0:
        return 0.0
    return max(float((state[k].float() - expected[k].float()).abs().max()) for k in expected)


def _one_process(optimizer: str = "adamw") -> nn.Module:
    """The reference: one process training on the ranks' batches joined, as DDP and FSDP2 should."""
    reference = pruned(norm=False)
    finetune(reference, merged(batches(**STEPS_DATA), world()[1]), epochs=2, lr=0.05, optimizer=optimizer,
             weight_decay=0.1, parallel=None)
    return reference


def _checkpoint(model: nn.Module, out: Path, name: str, norm: bool = True) -> dict:
    """Save from rank 0, reload into a fresh model there: the digests of what rank 0 holds and of the reload."""
    path = save_checkpoint(model, out / f"{name}.safetensors")
    digest = check_consistent(model)
    record = {"digest": digest}
    if world()[0] == 0:
        fresh = build(norm=norm)
        load_into(fresh, load_state(path))
        record["reloaded"] = state_digest(fresh.state_dict())
        record["reloaded_sparsity"] = sparsity_of(fresh)
    return record


def _error(call) -> str:
    """The message of the InvalidArgument `call` raises ("" when it raises none)."""
    try:
        call()
    except InvalidArgument as exc:
        return str(exc)
    return ""


def ddp_finetune(out: Path) -> dict:
    model = pruned(norm=False)
    before = model[0].weight.detach().clone()
    losses = finetune(model, batches(**STEPS_DATA), epochs=2, lr=0.05, optimizer="adamw", weight_decay=0.1)
    return {"losses": losses, "zeros_kept": zeros_kept(model), "trained": not torch.equal(before, model[0].weight),
            "wrapped_left": type(model).__name__, "max_diff": state_close(model, _one_process()),
            **_checkpoint(model, out, "ddp", norm=False)}


def fsdp_own(out: Path) -> dict:
    """A model the user sharded with fully_shard, trained on this rank's own batches."""
    from torch.distributed.fsdp import fully_shard

    model = pruned(norm=False)
    for layer in (model[0], model[2], model[5]):
        fully_shard(layer)
    fully_shard(model)
    rank, size = world()
    mine = batches(**STEPS_DATA)[rank::size]
    losses = finetune(model, mine, epochs=2, lr=0.05, optimizer="adamw", weight_decay=0.1)
    return {"losses": losses, "zeros_kept": zeros_kept(model), "sharded": type(model[0].weight).__name__,
            "max_diff": state_close(model, _one_process()), **_checkpoint(model, out, "fsdp_own", norm=False),
            "gradual_error": _error(lambda: PruningCallback(model, lambda step: 0.7).on_step_end(1))}


def fsdp_auto(out: Path) -> dict:
    """A plain model: finetune trains a sharded copy and leaves the result in the model on every rank."""
    model = pruned(norm=False)
    losses = finetune(model, batches(**STEPS_DATA), epochs=2, lr=0.05, optimizer="adamw", weight_decay=0.1,
                      parallel="fsdp")
    hooked = functools.partial(finetune, model, batches(**STEPS_DATA), parallel="fsdp", on_step=print)
    return {"hook_error": _error(hooked),"losses": losses, "zeros_kept": zeros_kept(model), "plain": type(model[0].weight).__name__,
            "max_diff": state_close(model, _one_process()), **_checkpoint(model, out, "fsdp_auto", norm=False)}


def ddp_distill(out: Path) -> dict:
    """Distillation with a hidden pair of different widths: its projection must agree across ranks."""
    student, teacher = pruned(), build(hidden=24).eval()
    history = distill(student, teacher, batches(**STEPS_DATA), epochs=2, lr=0.02, hidden=[("1", "1")])
    projection = history.projections["1->1"]
    return {"losses": history.loss, "kd": history.kd, "zeros_kept": zeros_kept(student),
            "projection": state_digest(projection.state_dict()), **_checkpoint(student, out, "distill")}


def fsdp_distill(out: Path) -> dict:
    student, teacher = pruned(), build().eval()
    history = distill(student, teacher, batches(**STEPS_DATA), epochs=1, lr=0.02, parallel="fsdp")
    return {"losses": history.loss, "zeros_kept": zeros_kept(student), **_checkpoint(student, out, "fsdp_distill")}


def ddp_gradual(out: Path) -> dict:
    """Gradual pruning during DDP training with a criterion that differs per rank (random, seeded by rank)."""
    model = build()
    rank = world()[0]
    callback = PruningCallback(model, IterativeSchedule(0.5, rounds=2, every=2), {"method": "random", "seed": rank})
    losses = finetune(model, batches(**STEPS_DATA), epochs=1, lr=0.05, optimizer="adamw", weight_decay=0.1,
                      on_step=callback.on_step_end)
    return {"losses": losses, "zeros_kept": zeros_kept(model), "sparsity": sparsity_of(model),
            **_checkpoint(model, out, "gradual")}


RECIPE = """
model: {factory: "tests.distributed_recovery:build", weights: dense.safetensors}
data: {calibration: calib.safetensors, batch_size: 4}
seed: 1
threads: 1
stages:
  - prune: {sparsity: 0.5}
  - finetune: {epochs: 1, lr: 0.02, optimizer: adamw, weight_decay: 0.1}
  - distill: {epochs: 1, lr: 0.01, parallel: fsdp}
  - evaluate
  - save: {}
"""


def recipe(out: Path) -> dict:
    """run_recipe on every rank: rank 0 writes the run folder, the others a private copy."""
    from safetensors.torch import save_file

    from secateurs.run import run_recipe, without_timing

    project = out / "project"
    if world()[0] == 0:
        project.mkdir()
        save_file(build().state_dict(), str(project / "dense.safetensors"))
        x, y = (torch.cat(parts) for parts in zip(*batches(**STEPS_DATA)))
        save_file({"inputs": x, "targets": y}, str(project / "calib.safetensors"))
        (project / "recipe.yaml").write_text(RECIPE)
    dist.barrier()
    result = run_recipe(project / "recipe.yaml", out / "run")
    checkpoints = sorted((result.out_dir / "checkpoints").iterdir())
    record = {"out_dir": str(result.out_dir), "metrics": without_timing(result.metrics["stages"]),
              "checkpoints": {c.name: state_digest(load_state(c / "state.safetensors")) for c in checkpoints}}
    if world()[0] == 0:
        from secateurs.checkpoint import load
        from secateurs.recover import evaluate_accuracy

        model = load(build(), result.out_dir / "model")
        record["reloaded_accuracy"] = evaluate_accuracy(model, batches(**STEPS_DATA))
        record["zeros_kept"] = zeros_kept(model)
    dist.barrier()   # the other ranks' private folders go at exit: rank 0 reads its own
    return record


SCENARIOS = [ddp_finetune, fsdp_own, fsdp_auto, ddp_distill, fsdp_distill, ddp_gradual, recipe]


def main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    rank = world()[0]
    results = {}
    for scenario in SCENARIOS:
        results[scenario.__name__] = scenario(out)
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
