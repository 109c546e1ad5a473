"""Every Python block in README.md and docs/*.md runs as written, and prints what it says it prints.

Files are found by glob, so a new page in docs/ is tested the day it lands. Each block
runs on its own (a fresh namespace) in a temporary working folder, so relative paths in
the docs write there. Conventions a page may use:

- a first line `# not run: REASON` marks a block the suite does not run (a checkpoint
  folder or a download it needs); the reason is shown as the skip reason. Keep them few;
- a trailing comment `# prints TEXT` on a line asserts that the block's output has a line
  equal to TEXT, so the numbers a page quotes are the numbers the code prints;
- a block importing an optional extra that is not installed (keras, onnx...) is skipped,
  naming the package.
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

from secateurs.errors import SecateursError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "# not run:"
PRINTS = re.compile(r"#\s*prints (.+?)\s*$")
EXTRA_HINT = "pip install 'secateurs["


def _blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of `page`."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, flags=re.S | re.M)]


BLOCKS = [(page, line, code) for page in PAGES for line, code in _blocks(page)]


def _missing_modules(code: str) -> list[str]:
    """Top-level modules the block imports that are not installed (optional extras)."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if n != "secateurs" and importlib.util.find_spec(n) is None)


def test_the_docs_have_python_examples():
    assert len([b for b in BLOCKS if b[0].name == "README.md"]) >= 3
    assert len([b for b in BLOCKS if b[0].name == "pipeline.md"]) >= 2


def test_few_blocks_are_marked_not_run():
    marked = [f"{page.name}:{line}" for page, line, code in BLOCKS if code.startswith(NOT_RUN)]
    assert len(marked) <= max(3, len(BLOCKS) // 5), marked


@pytest.mark.parametrize("page,line,code", BLOCKS, ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _ in BLOCKS])
def test_block_runs_and_prints_what_it_says(page, line, code, tmp_path, monkeypatch):
    if code.startswith(NOT_RUN):
        pytest.skip(f"{page.name}:{line} is marked {code.splitlines()[0]!r}")
    missing = _missing_modules(code)
    if missing:
        pytest.skip(f"{page.name}:{line} needs {', '.join(missing)}, not installed (an optional extra)")
    monkeypatch.chdir(tmp_path)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            exec(compile(code, f"{page.relative_to(ROOT)}, block at line {line}", "exec"), {"__name__": "docs"})
    except ModuleNotFoundError as exc:
        if (exc.name or "secateurs").split(".")[0] == "secateurs":
            raise
        pytest.skip(f"{page.name}:{line} needs {exc.name}, not installed (an optional extra)")
    except SecateursError as exc:
        if EXTRA_HINT not in str(exc):
            raise
        pytest.skip(f"{page.name}:{line}: {exc}")
    printed = [text.strip() for text in output.getvalue().splitlines()]
    for number, source in enumerate(code.splitlines(), start=line):
        quoted = PRINTS.search(source)
        if quoted:
            assert quoted.group(1) in printed, (
                f"{page.name}:{number} says it prints {quoted.group(1)!r}; the block printed:\n"
                + "\n".join(printed))
