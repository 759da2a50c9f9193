"""The README as typed: its ```python blocks run in order, in one namespace, in an empty directory.

An example in the README cannot rot: each block runs as a reader would paste it, after the
blocks above it, from a fresh temporary working directory.

- ``SLT_JAX_README_SMALL`` (read here only; default ``1``): caps the integer literals of
  ``num_draws=`` and ``num_burnin=`` at 200 before a block runs, so the suite stays fast while the
  README keeps its real sizes; ``SLT_JAX_README_SMALL=0`` runs every block exactly as typed.
- A block preceded by a line ``<!-- readme-test: skip (why) -->`` is a fragment (it names the
  reader's own model or files) and is not run.
- Warnings a block raises (say a ``CalibrationWarning`` on a run shortened by the cap above) are
  shown, not turned into errors: the examples are about the API, and the library's warnings have
  tests of their own.
"""

import os
import re
import traceback
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = os.environ.get("SLT_JAX_README_SMALL", "1") != "0"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b")
CAPPED = re.compile(r"\b(num_draws|num_burnin)=([0-9_]+)")

def python_blocks(text: str):
    """``(line, code, skipped)`` of each ```python block, ``line`` counted from 1."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            start = index + 1
            end = next(i for i in range(start, len(lines)) if lines[i].strip() == "```")
            previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", bool(SKIP.search(previous))))
            index = end
        index += 1
    return blocks


def shrink(code: str) -> str:
    """``num_draws=4000`` → ``num_draws=200`` (and ``num_burnin``), where ``SMALL``."""
    return CAPPED.sub(lambda m: f"{m.group(1)}={min(int(m.group(2)), 200)}", code) if SMALL else code


def test_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    failures, ran = [], 0
    for line, code, skipped in python_blocks(README.read_text(encoding="utf-8")):
        if skipped:
            continue
        first = code.splitlines()[0].strip()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                exec(compile(shrink(code), f"README.md:{line}", "exec"), namespace)
            ran += 1
        except Exception as error:
            where = traceback.extract_tb(error.__traceback__)[-1]
            failures.append(f"README.md block at line {line} ({first!r}) failed at {where.filename}:{where.lineno}: "
                            f"{type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)
    assert ran, "no README block ran"


@pytest.mark.unit
def test_blocks_are_found_and_shrunk():
    blocks = python_blocks("x\n<!-- readme-test: skip (a fragment) -->\n```python\na = 1\n```\n\n```python\n"
                           "f(num_draws=4000, num_burnin=1_000, num_chains=8)\n```\n")
    assert [(line, skipped) for line, _, skipped in blocks] == [(4, True), (8, False)]
    expected = "f(num_draws=200, num_burnin=200, num_chains=8)\n" if SMALL else blocks[1][1]
    assert shrink(blocks[1][1]) == expected
