"""``mypy --strict`` in a user's project types sends from the task's
function: wrong arguments are errors, results have the function's type."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flask_celery_ctx

from conftest import TESTS

PROJECT = TESTS / "typed_project"
ROOT = TESTS.parent


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
    package = Path(flask_celery_ctx.__file__).parent
    if not (package / "py.typed").is_file():
        pytest.fail("flask_celery_ctx is installed without its py.typed")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--config-file", "", "--hide-error-context", "--no-pretty",
         "--show-error-codes", "--no-error-summary", "tasks.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.stderr == ""
    errors = [line for line in result.stdout.splitlines() if ": error: " in line]
    assert errors == expected_errors(PROJECT / "tasks.py"), result.stdout


def test_type_checkers_find_an_editable_install(tmp_path: Path) -> None:
    """``pip install -e .`` of the project, then mypy and pyright in the
    user's project find the package: the install is a path in a ``.pth``
    file, not an import hook, which type checkers do not run."""
    pytest.importorskip("mypy", reason="mypy is in requirements/tests.txt")
    pytest.importorskip("basedpyright", reason="it is in requirements/tests.txt")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "-e", ROOT],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    user = tmp_path / "app.py"
    user.write_text(
        "from flask_celery_ctx import FlaskCelery\n\n"
        "ext: FlaskCelery = FlaskCelery()\n"
        "reveal_type(ext)\n"
    )
    # mypy checks for the environment of --python-executable as the
    # venv's own mypy would.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", "",
         "--no-error-summary", "--python-executable", python, user.name],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.stdout == (
        'app.py:4: note: Revealed type is "flask_celery_ctx.extension.FlaskCelery"\n'
    ), result.stdout + result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "basedpyright", "--pythonpath", python, user.name],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert 'Type of "ext" is "FlaskCelery"' in result.stdout, result.stdout
    assert "0 errors" in result.stdout, result.stdout
