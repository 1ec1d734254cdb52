"""Every code block of the documentation runs as shown: see ``snippets``."""

from __future__ import annotations

from pathlib import Path

import pytest

import snippets
from conftest import REDIS_URL
from conftest import require
from conftest import RUN

PAGES = [*sorted(snippets.DOCS.glob("*.rst")), snippets.DOCS.parent / "README.md"]
MODULES = sorted((snippets.DOCS.parent / "flask_celery_ctx").rglob("*.py"))


def env() -> dict[str, str]:
    """The project's settings, read by its factory from the environment: a
    queue of this run's own, so that no other worker takes its tasks."""
    return {
        "FLASK_CELERY_BROKER_URL": REDIS_URL,
        "FLASK_CELERY_TASK_DEFAULT_QUEUE": f"fcc-docs-{RUN}",
    }


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_page_runs_as_shown(page: Path, tmp_path: Path) -> None:
    if any(b.language == "console" for b in snippets.read(page)):
        require("Redis", REDIS_URL, 6379)
    snippets.run(page, tmp_path, env())


@pytest.mark.parametrize(
    "module",
    MODULES,
    ids=[str(m.relative_to(snippets.DOCS.parent)) for m in MODULES],
)
def test_docstrings_run_as_shown(module: Path, tmp_path: Path) -> None:
    snippets.run(module, tmp_path, env())


def page(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "page.rst"
    path.write_text(text)
    return path


def test_a_broken_block_fails(tmp_path: Path) -> None:
    broken = page(
        tmp_path,
        "Title\n=====\n\n.. code-block:: python\n\n    from myapp import nothing\n",
    )
    with pytest.raises(
        snippets.SnippetError, match=r"(?s)page.rst\", line 6.*ImportError"
    ):
        snippets.run(broken, tmp_path, env())


def test_a_failing_command_fails(tmp_path: Path) -> None:
    broken = page(
        tmp_path,
        "A list::\n\n    x = 1\n\n.. code-block:: console\n\n    $ flask --app myapp nothing\n",
    )
    with pytest.raises(snippets.SnippetError, match=r"(?s)page.rst:7.*No such command"):
        snippets.run(broken, tmp_path, env())


def test_output_not_printed_fails(tmp_path: Path) -> None:
    broken = page(tmp_path, ".. code-block:: console\n\n    $ echo one\n    two\n")
    with pytest.raises(snippets.SnippetError, match=r"expected \['two'\]"):
        snippets.run(broken, tmp_path, env())


def test_a_skipped_block_says_why(tmp_path: Path) -> None:
    text = ".. snippet: skip\n\n.. code-block:: python\n\n    nothing\n"
    with pytest.raises(snippets.SnippetError, match="say why"):
        snippets.run(page(tmp_path, text), tmp_path, env())
    text = ".. snippet: skip, a fragment\n\n.. code-block:: python\n\n    nothing\n"
    snippets.run(page(tmp_path, text), tmp_path, env())


def test_a_marker_before_a_table_covers_its_blocks(tmp_path: Path) -> None:
    text = """\
.. snippet: skip, a comparison

.. list-table::

   * - .. code-block:: python

          before

     - .. code-block:: python

          after

.. code-block:: python

    ran
"""
    blocks = snippets.read(page(tmp_path, text))
    assert [(b.code, b.marker is not None) for b in blocks] == [
        ("before", True),
        ("after", True),
        ("ran", False),
    ]


def test_a_shell_session_is_run_or_marked(tmp_path: Path) -> None:
    text = ".. code-block:: text\n\n    $ flask --app myapp routes\n"
    with pytest.raises(snippets.SnippetError, match="make it a 'console' block"):
        snippets.run(page(tmp_path, text), tmp_path, env())


def test_a_background_command_that_exits_fails(tmp_path: Path) -> None:
    text = ".. snippet: background\n\n.. code-block:: console\n\n    $ flask --app myapp nothing\n"
    with pytest.raises(
        snippets.SnippetError, match=r"(?s)exited with 2.*No such command"
    ):
        snippets.run(page(tmp_path, text), tmp_path, env())


def test_a_markdown_page_is_read(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text(
        "Text\n\n<!-- snippet: skip, an excerpt -->\n```python\nskipped\n```\n\n"
        "```console\n$ flask --app myapp routes\n```\n\n    indented\n"
    )
    blocks = snippets.read(path)
    assert [(b.line, b.language, b.code) for b in blocks] == [
        (5, "python", "skipped"),
        (9, "console", "$ flask --app myapp routes"),
    ]
    assert [b.marker and b.marker.reason for b in blocks] == ["an excerpt", None]


def test_a_toml_block_is_a_file(tmp_path: Path) -> None:
    text = ".. code-block:: toml\n\n    # pyproject.toml\n    [tool.x]\n"
    snippets.run(page(tmp_path, text), tmp_path, env())
    assert (tmp_path / "project" / "pyproject.toml").read_text() == (
        "# pyproject.toml\n[tool.x]\n"
    )


def test_commands_share_their_variables(tmp_path: Path) -> None:
    text = ".. code-block:: console\n\n    $ name=$(echo ada)\n\n    $ echo $name\n    ada\n"
    snippets.run(page(tmp_path, text), tmp_path, env())
