"""ruff and mypy are part of ``make test``: the code they cover (pyproject.toml's
``[tool.ruff]`` and ``[tool.mypy]``) must be clean. ``make lint`` runs the same two."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The tools installed with the test extra, next to the interpreter running the tests.
BIN = Path(sys.executable).parent


def run_tool(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=110)


def test_ruff_is_clean() -> None:
    done = run_tool("ruff", "check", "--no-fix", "dcn_node", "dcn_train", "tests", "bench")
    assert done.returncode == 0, f"ruff check failed:\n{done.stdout}{done.stderr}"


def test_mypy_is_clean() -> None:
    # The files checked and the settings come from pyproject.toml's [tool.mypy].
    done = run_tool("mypy", "--config-file", "pyproject.toml")
    assert done.returncode == 0, f"mypy failed:\n{done.stdout}{done.stderr}"
