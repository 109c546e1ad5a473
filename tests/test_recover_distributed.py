"""Recovery under torchrun: 2 CPU processes over gloo, with DDP and with FSDP2 (fully_shard).

One torchrun launch runs every scenario of tests/distributed_recovery.py on both ranks;
the tests here compare what the ranks saw. Single-process behaviour of the same helpers
is tested directly below.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from secateurs import prune
from secateurs.errors import InvalidArgument
from secateurs.recover import finetune
from secateurs.recover.distributed import (
    full_state_dict,
    mean_over_ranks,
    resolve_parallel,
    save_checkpoint,
    shard_batches,
    state_digest,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_recovery.py"


def _env() -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks saw, per scenario."""
    out = tmp_path_factory.mktemp("torchrun")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env(), check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("scenario", ["ddp_finetune", "fsdp_own", "fsdp_auto"])
def test_training_on_two_ranks_keeps_masks_and_equals_one_process(ranks, scenario):
    first, second = ranks[0][scenario], ranks[1][scenario]
    assert first["zeros_kept"] and second["zeros_kept"]          # each rank's own copy or shard
    assert first["losses"] == second["losses"]                    # means over both ranks
    assert first["losses"][1] < first["losses"][0]
    # the same steps as one process on both ranks' batches joined: the gradients were averaged
    assert first["max_diff"] < 1e-5
    assert first["digest"] == second["digest"] == first["reloaded"]
    assert first["reloaded_sparsity"] == {"0.weight": 0.5, "2.weight": 0.5}


def test_ddp_model_is_left_plain_and_fsdp_model_sharded(ranks):
    assert ranks[0]["ddp_finetune"]["wrapped_left"] == "Sequential"
    assert ranks[0]["fsdp_own"]["sharded"] == "DTensor"        # trained as given
    assert ranks[0]["fsdp_auto"]["plain"] == "Parameter"       # a sharded copy trained, loaded back


def test_what_fsdp_cannot_do_is_refused_in_one_line(ranks):
    for rank in ranks:
        assert rank["fsdp_own"]["gradual_error"].startswith("gradual pruning needs whole weights and this model "
                                                            "is sharded (FSDP2 fully_shard)")
        assert rank["fsdp_auto"]["hook_error"].startswith("on_step would act on the unsharded model while "
                                                          "parallel='fsdp' trains a sharded copy")


@pytest.mark.parametrize("scenario", ["ddp_distill", "fsdp_distill"])
def test_distillation_on_two_ranks_agrees(ranks, scenario):
    first, second = ranks[0][scenario], ranks[1][scenario]
    assert first["zeros_kept"] and second["zeros_kept"]
    assert first["losses"] == second["losses"]
    # BatchNorm statistics, computed on each rank's own batches, end as rank 0's everywhere
    assert first["digest"] == second["digest"] == first["reloaded"]
    if scenario == "ddp_distill":   # the hidden-state projection is fitted once, on rank 0, and trained on both
        assert first["projection"] == second["projection"]
        assert first["kd"][1] < first["kd"][0]


def test_gradual_pruning_adopts_rank_zero_masks(ranks):
    """Each rank draws random masks with its own seed; after pruning all ranks hold rank 0's."""
    first, second = ranks[0]["ddp_gradual"], ranks[1]["ddp_gradual"]
    assert first["sparsity"] == second["sparsity"] == {"0.weight": 0.5, "2.weight": 0.5}
    assert first["zeros_kept"] and second["zeros_kept"]
    assert first["digest"] == second["digest"] == first["reloaded"]


def test_recipe_under_torchrun_writes_once_and_agrees(ranks):
    first, second = ranks[0]["recipe"], ranks[1]["recipe"]
    assert first["metrics"] == second["metrics"]
    assert list(first["checkpoints"]) == ["00-prune", "01-finetune", "02-distill", "03-evaluate", "04-save"]
    assert first["checkpoints"] == second["checkpoints"]        # rank 0 wrote what every rank holds
    assert first["checkpoints"]["01-finetune"] != first["checkpoints"]["00-prune"]
    assert Path(second["out_dir"]) != Path(first["out_dir"])    # rank 1 wrote only its private copy
    assert not Path(second["out_dir"]).exists()                 # ... removed at exit
    evaluated = next(s for s in first["metrics"] if s["stage"] == "evaluate")
    assert first["reloaded_accuracy"] == evaluated["result"]["accuracy"]
    assert first["zeros_kept"]


@pytest.mark.slow
def test_trainer_callback_under_accelerate_launch(tmp_path):
    """The transformers Trainer (DDP over gloo) on 2 CPU processes, each rank pruning with its own seed."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "tests" / "distributed_trainer.py"), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env(), check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    first, second = (json.loads((tmp_path / f"trainer-rank{rank}.json").read_text()) for rank in range(2))
    assert first["world"] == [0, 2] and second["world"] == [1, 2]
    assert first["wrapped"] == "DistributedDataParallel"
    assert first["trained"] and first["zeros_kept"] and second["zeros_kept"]
    assert first["sparsity"] == second["sparsity"] == {"body.0.weight": 0.5, "body.2.weight": 0.5}
    assert first["digest"] == second["digest"] == first["reloaded"]     # Trainer.save_model wrote the masks too


# ------------------------------------------------------------------------ one process

def test_shard_batches_gives_every_rank_the_same_count():
    data = list(range(5))
    shares = [shard_batches(data, rank, 2) for rank in range(2)]
    assert shares == [[0, 2, 4], [1, 3, 0]]
    assert sorted(shares[0] + shares[1][:2]) == data
    assert shard_batches([], 0, 2) == []


def test_single_process_trains_as_it_is():
    model = nn.Linear(4, 2)
    assert resolve_parallel("auto", model) is None
    assert resolve_parallel("fsdp", model) is None             # no process group: nothing to shard over
    assert mean_over_ranks([3.0, 1.0], [3, 0], model) == [1.0, 1.0]
    with pytest.raises(InvalidArgument, match="parallel must be 'auto', 'ddp', 'fsdp' or None, got 'tp'"):
        finetune(model, [(torch.randn(2, 4), torch.tensor([0, 1]))], parallel="tp")


def test_torchrun_group_is_nothing_in_one_process(monkeypatch):
    import torch.distributed as dist

    from secateurs.recover.distributed import torchrun_group

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with torchrun_group() as rank:
        assert rank == 0 and not dist.is_initialized()


def test_save_checkpoint_in_one_process_reloads_with_masks(tmp_path):
    from secateurs.io import load_into, load_state
    from secateurs.sparsity import sparsity_of

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    prune(model, "magnitude", 0.5)
    path = save_checkpoint(model, tmp_path / "ckpt" / "model.safetensors")
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    load_into(fresh, load_state(path))
    assert state_digest(fresh.state_dict()) == state_digest(full_state_dict(model))
    assert sparsity_of(fresh) == {"0.weight": 0.5}
