"""A small LLaMA-architecture causal LM trained on the KJV, for real pruning checks offline.

`tiny_llama()` trains it once (about 12 minutes on 2 CPU threads, fixed seed) and caches a
`save_pretrained` folder, tokenizer included, keyed by the recipe: a byte-level BPE
tokenizer trained with `tokenizers` on the training books, and a LlamaConfig with
grouped-query attention (8 query heads sharing 4 key/value heads). Held-out books never
reach the tokenizer or the model (see `data.kjv_split`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import cache
from .data import kjv_split, read_lines, tokenize_file

# v2 trains 2.5x longer than v1 (600 steps, lr 2e-3, weight decay 0.1), at a higher rate and
# without weight decay: v1 stayed so close to its initialisation that 50% magnitude pruning
# cost it under 1 perplexity point and Wanda could not beat magnitude (BENCHMARKS.md).
RECIPE: dict[str, Any] = {
    "arch": "tiny-llama-kjv-v2", "seed": 0, "vocab": 4096,
    "hidden": 256, "layers": 4, "heads": 8, "kv_heads": 4, "intermediate": 688, "seq": 256,
    "batch": 8, "steps": 1500, "lr": 3e-3, "min_lr": 2e-4, "warmup": 30, "weight_decay": 0.0,
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
RECIPE_FILE = "secateurs_recipe.json"


def _cache_root() -> Path:
    return cache.cache_dir()


def train_tokenizer(lines: list[str], vocab: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style) trained on `lines`, as a transformers tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([line + "\n" for line in lines], trainer=trainer)
    # <s> before every text, like LLaMA's tokenizer; calibration windows get it too
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=RECIPE["seq"])


def build_tiny_llama(tokenizer: Any, recipe: dict[str, Any] | None = None) -> torch.nn.Module:
    """A randomly initialized LlamaForCausalLM of the recipe's shape (default: RECIPE)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    recipe = recipe or RECIPE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe["hidden"], intermediate_size=recipe["intermediate"],
        num_hidden_layers=recipe["layers"], num_attention_heads=recipe["heads"],
        num_key_value_heads=recipe["kv_heads"], max_position_embeddings=recipe["seq"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(recipe["seed"])
    return LlamaForCausalLM(config)


def _learning_rate(step: int, recipe: dict[str, Any]) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < recipe["warmup"]:
        return recipe["lr"] * (step + 1) / recipe["warmup"]
    progress = (step - recipe["warmup"]) / max(1, recipe["steps"] - recipe["warmup"])
    return recipe["min_lr"] + 0.5 * (recipe["lr"] - recipe["min_lr"]) * (1 + math.cos(math.pi * progress))


def train_model(model: torch.nn.Module, tokens: torch.Tensor, recipe: dict[str, Any] | None = None,
                on_step: Callable[[int, float], Any] | None = None) -> torch.nn.Module:
    """Next-token training on random windows of `tokens` with AdamW (seeded)."""
    recipe = recipe or RECIPE
    generator = torch.Generator().manual_seed(recipe["seed"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe["lr"], betas=(0.9, 0.95))
    model.train()
    for step in range(recipe["steps"]):
        starts = torch.randint(0, len(tokens) - recipe["seq"], (recipe["batch"],), generator=generator)
        ids = torch.stack([tokens[s:s + recipe["seq"]] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, recipe)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    return model.eval()


def _recipe_key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _progress(step: int, loss: float) -> None:
    if step % 25 == 0:
        print(f"tiny_llama: training step {step}, loss {loss:.3f}", file=sys.stderr, flush=True)


def tiny_llama(cache_dir: str | os.PathLike | None = None, recipe: dict[str, Any] | None = None,
               on_step: Callable[[int, float], Any] | None = _progress) -> Path:
    """The folder of the trained tiny LLaMA (`from_pretrained` loads model and tokenizer).

    Trained on first use and cached under `cache_dir` (default $SECATEURS_CACHE or
    ~/.cache/secateurs); the folder also holds the recipe and the training time.
    """
    recipe = recipe or RECIPE
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    folder = root / f"{recipe['arch']}-{_recipe_key(recipe)}"
    if (folder / RECIPE_FILE).is_file():
        return folder
    split = kjv_split(root / "kjv-split-v1")
    started = time.perf_counter()
    tokenizer = train_tokenizer(read_lines(split.train), recipe["vocab"])
    model = build_tiny_llama(tokenizer, recipe)
    model = train_model(model, tokenize_file(tokenizer, split.train), recipe, on_step)
    seconds = time.perf_counter() - started
    tmp = root / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / RECIPE_FILE).write_text(json.dumps({"recipe": recipe, "train_seconds": round(seconds, 1),
                                               "threads": torch.get_num_threads()}, indent=1))
    if folder.exists():   # another process finished first: keep its copy
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    return folder


__all__ = ["RECIPE", "build_tiny_llama", "tiny_llama", "train_model", "train_tokenizer"]
