"""How much a pruned language model lost: perplexity, embedding fidelity, a pair metric.

- Causal LMs: strided perplexity on held-out tokens. Windows of `window` tokens advance
  by `stride`; each window scores only the tokens the previous one did not, so every
  token is scored exactly once, with up to `window - 1` tokens of context
  (the sliding-window evaluation of Hugging Face's perplexity guide).
- Encoders: the mean cosine between the pruned and the dense model's mean-pooled
  sentence embeddings, and, for labelled sentence pairs, Spearman's rank correlation of
  the embeddings' cosine similarities with the labels (the STS metric).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgument


@dataclass(frozen=True)
class Perplexity:
    """exp(nll / tokens): the summed negative log-likelihood over the tokens scored."""

    value: float
    nll: float
    tokens: int
    window: int
    stride: int


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _default_window(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or 512)


def _flat_tokens(tokens: torch.Tensor) -> torch.Tensor:
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1 or tokens.dtype not in (torch.long, torch.int):
        raise InvalidArgument(f"tokens: expected a 1-D LongTensor of token ids, got {tuple(tokens.shape)} "
                              f"{tokens.dtype}")
    if len(tokens) < 2:
        raise InvalidArgument(f"tokens: {len(tokens)} tokens; perplexity needs at least 2")
    return tokens.long()


def _check_window(window: int, stride: int) -> None:
    if window < 2:
        raise InvalidArgument(f"window={window}: expected at least 2 tokens")
    if not 1 <= stride <= window:
        raise InvalidArgument(f"stride={stride}: expected between 1 and window={window}")


def strided_perplexity(model: nn.Module, tokens: torch.Tensor, window: int | None = None,
                       stride: int | None = None) -> Perplexity:
    """Strided perplexity with its parts: NLL sum, tokens scored, window and stride."""
    tokens = _flat_tokens(tokens)
    window = min(window or _default_window(model), len(tokens))
    stride = stride or max(1, window // 2)
    _check_window(window, stride)
    nll, scored, done = 0.0, 0, 1   # done: tokens [0, done) are scored or unscorable
    with _evaluating(model):
        for begin in range(0, len(tokens), stride):
            end = min(begin + window, len(tokens))
            # targets begin at `first`: never before the window's second token (the
            # first has no context inside the window) nor before what is already scored
            first = max(done, begin + 1)
            if first < end:
                ids = tokens[begin:end].unsqueeze(0).to(_device(model))
                logits = _logits(model, ids)[0, first - begin - 1:end - begin - 1].float()
                nll += F.cross_entropy(logits, ids[0, first - begin:], reduction="sum").item()
                scored += end - first
            done = max(done, end)
            if end == len(tokens):
                break
    return Perplexity(math.exp(nll / scored), nll, scored, window, stride)


def perplexity(model: nn.Module, tokens: torch.Tensor, window: int | None = None,
               stride: int | None = None) -> float:
    """exp(mean NLL) of `tokens` (1-D ids) under a causal LM, each token scored once.

    `window` defaults to the model's `max_position_embeddings`, `stride` to half the
    window; a smaller stride gives each token more context at more compute.
    """
    return strided_perplexity(model, tokens, window, stride).value


def unigram_perplexity(train: torch.Tensor, heldout: torch.Tensor, vocab: int) -> float:
    """Perplexity of `heldout` ids under add-one smoothed unigram frequencies of `train` ids.

    The floor a causal LM must beat by far: a model no better than this learned no context.
    """
    train, heldout = _flat_tokens(train), _flat_tokens(heldout)
    top = int(max(train.max(), heldout.max()))
    if not isinstance(vocab, int) or vocab <= top:
        raise InvalidArgument(f"vocab={vocab!r}: expected an integer above the largest token id {top}")
    counts = torch.bincount(train, minlength=vocab).double() + 1  # add-one: unseen ids stay finite
    log_p = (counts / counts.sum()).log()
    return math.exp(-log_p[heldout].mean().item())


# ------------------------------------------------------------------------------ encoders

def _check_sentences(sentences: Sequence[str], name: str = "sentences") -> None:
    if isinstance(sentences, str) or not sentences or not all(isinstance(s, str) for s in sentences):
        raise InvalidArgument(f"{name}: expected a non-empty list of strings")


def sentence_embeddings(model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 32,
                        max_length: int = 128) -> torch.Tensor:
    """[len(sentences), hidden]: the last hidden states mean-pooled over real (unpadded) tokens."""
    _check_sentences(sentences)
    pooled = []
    with _evaluating(model):
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(_device(model))
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float().cpu())
    return torch.cat(pooled)


def embedding_fidelity(dense: nn.Module, pruned: nn.Module, tokenizer: Any, sentences: Sequence[str],
                       batch_size: int = 32, max_length: int = 128) -> float:
    """Mean cosine similarity of the pruned model's sentence embeddings to the dense model's."""
    reference = sentence_embeddings(dense, tokenizer, sentences, batch_size, max_length)
    candidate = sentence_embeddings(pruned, tokenizer, sentences, batch_size, max_length)
    return F.cosine_similarity(reference, candidate, dim=-1).mean().item()


def pair_spearman(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                  labels: Sequence[float], batch_size: int = 32, max_length: int = 128) -> float:
    """Spearman correlation of the cosine similarity of each sentence pair with its label."""
    from scipy.stats import spearmanr

    if len(pairs) != len(labels) or len(pairs) < 2:
        raise InvalidArgument(f"pairs/labels: expected two equally long lists of at least 2, "
                              f"got {len(pairs)} pairs and {len(labels)} labels")
    left = sentence_embeddings(model, tokenizer, [a for a, _ in pairs], batch_size, max_length)
    right = sentence_embeddings(model, tokenizer, [b for _, b in pairs], batch_size, max_length)
    cosines = F.cosine_similarity(left, right, dim=-1)
    return float(spearmanr(cosines.numpy(), list(labels)).statistic)


__all__ = ["Perplexity", "embedding_fidelity", "pair_spearman", "perplexity", "sentence_embeddings",
           "strided_perplexity", "unigram_perplexity"]
