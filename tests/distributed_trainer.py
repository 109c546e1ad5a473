"""The transformers Trainer with the pruning callback on 2 CPU processes, run by
test_recover_distributed.py under `accelerate launch`:

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_trainer.py OUT

The Trainer wraps the model in DDP; every rank prunes with its own random seed and then
adopts rank 0's masks. Each rank writes what it saw to OUT/trainer-rank<r>.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from secateurs.io import load_into, load_state
from secateurs.recover import IterativeSchedule, PruningCallback, trainer_callback
from secateurs.recover.distributed import check_consistent, state_digest, world
from secateurs.sparsity import sparsity_of


class Classifier(nn.Module):
    """A model as the Trainer takes it: keyword inputs, the loss in the output when labels come."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x, labels=None):
        logits = self.head(self.body(x))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class Examples(torch.utils.data.Dataset):
    def __init__(self, count: int = 64):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(count, 8, generator=g)
        self.y = (self.x[:, :4].sum(1) > 0).long() * 2 + (self.x[:, 4:].sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


def main(out: Path) -> None:
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)
    model = Classifier()
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=0.05, weight_decay=0.1, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0, ddp_backend="gloo")
    rank = args.process_index
    callback = PruningCallback(model, IterativeSchedule(0.5, rounds=2, every=2), {"method": "random", "seed": rank})
    trainer = Trainer(model=model, args=args, train_dataset=Examples(), callbacks=[trainer_callback(callback)])
    before = model.body[0].weight.detach().clone()
    trainer.train()
    pruned = [(m.weight, m.weight_prune_mask) for m in (model.body[0], model.body[2])]
    record = {"world": world(), "wrapped": type(trainer.model_wrapped).__name__,
              "zeros_kept": all(not w[~m].any() for w, m in pruned), "sparsity": sparsity_of(model),
              "trained": not torch.equal(before, model.body[0].weight), "digest": check_consistent(model)}
    trainer.save_model(str(out / "saved"))
    dist.barrier()
    if rank == 0:
        fresh = Classifier()
        load_into(fresh, load_state(out / "saved" / "model.safetensors"))
        record["reloaded"] = state_digest(fresh.state_dict())
    (out / f"trainer-rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
