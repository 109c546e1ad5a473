"""Shared tiny models and a private cache so tests never reuse a developer's files."""
from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    import os

    os.environ["SECATEURS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster on a busy 2-core machine and fixes the summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(torch.relu(self.fc1(x.flatten(1))))


def tiny_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN()


def tiny_batches(n: int = 3, batch: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4, 4, 4, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def merge_argv(argv: dict[str, str], extra: list[str]) -> list[str]:
    """`argv` (option -> value) with `extra`'s options replacing their values, its flags appended."""
    argv, flags, i = dict(argv), [], 0
    while i < len(extra):
        if extra[i] in argv:
            argv[extra[i]] = extra[i + 1]
            i += 2
        else:
            flags.append(extra[i])
            i += 1
    return [x for kv in argv.items() for x in kv] + flags
