"""``mypy --strict`` in a user's project types sends from the task's
function: wrong arguments are errors, results have the function's type."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flask_celery_ctx

from conftest import TESTS

PROJECT = TESTS / "typed_project"


def expected_errors(source: Path) -> list[str]:
    """The errors that the ``# error:`` comments of a file expect on the
    line under them, as mypy prints them."""
    found = []
    for number, line in enumerate(source.read_text().splitlines(), 1):
        match = re.match(r"# error: (.*)$", line)
        if match:
            found.append(f"{source.name}:{number + 1}: error: {match[1]}")
    return found


def test_mypy_strict_checks_sends(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is in requirements/tests.txt")
    shutil.copytree(PROJECT, tmp_path, dirs_exist_ok=True)
    env = dict(os.environ)
    package = Path(flask_celery_ctx.__file__).parent
    if not (package / "py.typed").is_file():
        pytest.fail("flask_celery_ctx is installed without its py.typed")
    if package.parent.name != "site-packages":
        # An editable install, found by an import hook mypy does not run.
        env["MYPYPATH"] = str(package.parent)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--config-file", "", "--hide-error-context", "--no-pretty",
         "--show-error-codes", "--no-error-summary", "tasks.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.stderr == ""
    errors = [line for line in result.stdout.splitlines() if ": error: " in line]
    assert errors == expected_errors(PROJECT / "tasks.py"), result.stdout
