"""The code blocks of the documentation, read from its pages and run.

Every page, and the docstrings of every module of the package, which the
API page shows, runs in a project of its own: the files that the quickstart and
testing pages show (``myapp/`` and ``tests/``), written to a temporary
directory, in which the page's own blocks then run as a reader runs them:

- a ``python`` block whose first line is a file name, ``# myapp/tasks.py``,
  is that file: it is written to the project, and imported, or collected by
  pytest when its name is ``tests/test_*.py``; a ``toml`` block whose first
  line is ``# pyproject.toml`` is that file, written to the project;
- any other ``python`` block runs as a script, in order, all of the page's
  sharing one namespace; a literal block (``::``) is Python too, as Sphinx
  highlights it;
- a ``console`` block is a shell session: each ``$`` command runs in the
  project and must succeed, and print the lines shown under it (``...``
  matches anything); the variables a command sets, ``task=$(...)``, are
  set in the commands after it, as in one terminal;
- a ``text`` block is output or a figure, never run; a shell session
  (``$ ...``) in one is an error.

README.md runs too: its fenced blocks are read as the blocks of a page,
their language named after the opening fence.

A comment before a block, or before a table of blocks, says how it runs
instead, with the reason (in Markdown, an HTML comment,
``<!-- snippet: skip, why -->``)::

    .. snippet: skip, an excerpt: ``mail`` stands for the app's mail extension

    .. snippet: background

``skip`` leaves it out; ``background`` starts the commands of a ``console``
block and keeps them running for the rest of the page (a worker, a server),
while the commands after it are tried again, for a while, until they
succeed; each must still be running when the page ends.

The commands run with the project's own settings read from the environment
by the quickstart's factory (``FLASK_CELERY_BROKER_URL`` and a queue of
their own on the test Redis) and ``flask run`` on a free port, which
replaces the port ``5000`` of the commands shown.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import typing as t
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

DOCS = Path(__file__).parent.parent / "docs"
#: The pages whose files make the project every page runs in.
PROJECT_PAGES = ("quickstart.rst", "testing.rst")
#: Languages of blocks that are shown and never run.
SHOWN = {"text"}
VERBS = {"skip", "background"}
#: The port of the commands shown, replaced by a free one.
DOCS_PORT = "5000"
#: How long a command is tried again while a background command starts.
RETRY_SECONDS = 60
#: How long a background command must have run when the page ends.
SETTLE_SECONDS = 10

_DIRECTIVE = re.compile(
    r"^(?P<indent>(?:[ *-]*)?)\.\. (?:code-block|code|sourcecode)::\s*(?P<language>\S*)\s*$"
)
_HIGHLIGHT = re.compile(r"^\.\. highlight::\s*(\S+)")
_MARKER = re.compile(
    r"^(?P<indent> *)\.\. snippet:\s*(?P<verb>[\w-]+)\s*(?:,\s*(?P<reason>.*))?$"
)
_MD_MARKER = re.compile(
    r"^<!-- snippet:\s*(?P<verb>[\w-]+)\s*(?:,\s*(?P<reason>.*?))?\s*-->$"
)
_FENCE = re.compile(r"^(?P<fence>```+)(?P<language>\w*)\s*$")
_FILE = re.compile(r"^# (?P<path>[\w./-]+\.(?P<suffix>py|toml))$")
#: The language of the blocks that are files, by the file's suffix.
FILE_LANGUAGES = {"py": "python", "toml": "toml"}


class SnippetError(AssertionError):
    """A block of a page that does not run as shown."""


@dataclass
class Marker:
    verb: str
    reason: str
    line: int


@dataclass
class Block:
    page: str
    #: The line of the page where the block's code starts, from 1.
    line: int
    language: str
    code: str
    marker: Marker | None = None

    @property
    def where(self) -> str:
        return f"{_shown(self.page)}:{self.line}"

    @property
    def path(self) -> str | None:
        """The file the block is, named on its first line."""
        match = _FILE.match(self.code.partition("\n")[0])
        if match and FILE_LANGUAGES[match["suffix"]] == self.language:
            return match["path"]
        return None


def _shown(page: str) -> str:
    """The page's path as a reader of the repository finds it."""
    path = Path(page)
    return (
        str(path.relative_to(DOCS.parent)) if path.is_relative_to(DOCS.parent) else page
    )


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _content(lines: list[str], start: int, column: int) -> tuple[int, int]:
    """The first and past-the-last line of the block body after ``start``,
    indented more than ``column``, options of a directive skipped."""
    i = start + 1
    while (
        i < len(lines)
        and lines[i].strip().startswith(":")
        and _indent(lines[i]) > column
    ):
        i += 1
    first = i
    end = i
    while i < len(lines):
        if lines[i].strip():
            if _indent(lines[i]) <= column:
                break
            end = i + 1
        i += 1
    while first < end and not lines[first].strip():
        first += 1
    return first, end


def docstrings(module: Path) -> list[str]:
    """The lines of a module that its docstrings span, the others blank:
    the docstrings of the API page, at their lines in the module."""
    source = module.read_text()
    lines = source.splitlines()
    kept = [""] * len(lines)
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            first, last = body[0].lineno - 1, t.cast(int, body[0].end_lineno)
            kept[first + 1 : last - 1] = lines[first + 1 : last - 1]
    return kept


def read_markdown(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, each with the marker, an
    HTML comment ``<!-- snippet: skip, why -->``, that precedes it."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    marker: Marker | None = None
    i = 0
    while i < len(lines):
        if match := _MD_MARKER.match(lines[i]):
            marker = Marker(match["verb"], (match["reason"] or "").strip(), i + 1)
        elif match := _FENCE.match(lines[i]):
            end = i + 1
            while end < len(lines) and lines[end].strip() != match["fence"]:
                end += 1
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            blocks.append(Block(str(page), i + 2, match["language"], code, marker))
            marker = None
            i = end
        i += 1
    return blocks


def read(page: Path) -> list[Block]:
    """The code blocks of a page, or of the docstrings of a module, each with
    the marker that applies to it."""
    if page.suffix == ".md":
        return read_markdown(page)
    lines = docstrings(page) if page.suffix == ".py" else page.read_text().splitlines()
    blocks: list[Block] = []
    markers: list[tuple[Marker, int, int | None]] = []
    literal = "python"
    i = 0
    while i < len(lines):
        line = lines[i]
        if match := _HIGHLIGHT.match(line):
            literal = match[1]
        if match := _MARKER.match(line):
            column = len(match["indent"])
            reason = [match["reason"] or ""]
            i += 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > column:
                reason.append(lines[i].strip())
                i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            # Before a table: its blocks; before anything else: the next block.
            end = None
            if lines[i].lstrip().startswith(".. ") and not _DIRECTIVE.match(lines[i]):
                end = i + 1
                while end < len(lines) and (
                    not lines[end].strip() or _indent(lines[end]) > column
                ):
                    end += 1
            marker = Marker(match["verb"], " ".join(reason).strip(), i + 1)
            markers.append((marker, i, end))
            continue
        directive = _DIRECTIVE.match(line)
        literal_block = (
            not directive
            and line.rstrip().endswith("::")
            and not line.lstrip().startswith("..")
        )
        if directive or literal_block:
            column = len(directive["indent"]) if directive else _indent(line)
            first, end = _content(lines, i, column)
            if end > first:
                code = textwrap.dedent("\n".join(lines[first:end]))
                language = directive["language"] if directive else literal
                blocks.append(Block(str(page), first + 1, language, code))
            i = max(end, i + 1)
            continue
        i += 1
    for marker, start, end in markers:
        scope = [b for b in blocks if b.line - 1 >= start]
        if end is not None:
            scope = [b for b in scope if b.line - 1 < end]
        for block in scope if end is not None else scope[:1]:
            block.marker = marker
    return blocks


def check_markers(blocks: list[Block]) -> None:
    """Every marker is known, says why, and fits its block."""
    for block in blocks:
        marker = block.marker
        if marker is None:
            if block.path is None and re.search(r"^def test_", block.code, re.M):
                raise SnippetError(
                    f"{block.where}: a test runs when its file is named: begin the"
                    " block with '# tests/test_<name>.py'"
                )
            if block.language in SHOWN and re.search(r"^\$ ", block.code, re.M):
                raise SnippetError(
                    f"{block.where}: a shell session: make it a 'console' block,"
                    " run or marked '.. snippet: skip, <why>'"
                )
            if block.language not in SHOWN | {"python", "console"} and not block.path:
                raise SnippetError(
                    f"{block.where}: a {block.language!r} block is neither run nor"
                    " shown: make it 'python', 'console' or 'text', or mark it"
                    " '.. snippet: skip, <why>'"
                )
            continue
        if marker.verb not in VERBS:
            raise SnippetError(
                f"{_shown(block.page)}:{marker.line}: unknown '.. snippet: {marker.verb}';"
                f" use one of {sorted(VERBS)}"
            )
        if marker.verb == "skip" and not marker.reason:
            raise SnippetError(
                f"{_shown(block.page)}:{marker.line}: say why the block is not run:"
                " '.. snippet: skip, <why>'"
            )
        if marker.verb == "background" and block.language != "console":
            raise SnippetError(
                f"{block.where}: only a 'console' block runs in the background"
            )


@dataclass
class Command:
    line: str
    output: list[str] = field(default_factory=list)

    def matches(self, printed: str) -> bool:
        found = [line.strip() for line in printed.splitlines()]
        for expected in self.output:
            pattern = ".*".join(map(re.escape, expected.strip().split("...")))
            if not any(re.fullmatch(pattern, line) for line in found):
                return False
        return True


def commands(block: Block) -> list[Command]:
    """The ``$`` commands of a console block, each with the output shown."""
    found: list[Command] = []
    continued = False
    for line in block.code.splitlines():
        if continued:
            found[-1].line += "\n" + line
        elif line.startswith("$ "):
            found.append(Command(line[2:]))
        elif found and line.strip():
            found[-1].output.append(line)
        continued = line.endswith("\\")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_SCRIPT = """\
import importlib, json, sys
modules, blocks = json.load(open(sys.argv[1]))
for module in modules:
    importlib.import_module(module)
namespace = {"__name__": "__main__"}
for where, line, code in blocks:
    exec(compile("\\n" * (line - 1) + code, where, "exec"), namespace)
"""


#: A command of a shell session, run with the variables that the commands
#: before it set, as in one terminal.
_SHELL = """\
set -a
[ -f {variables} ] && . {variables}
{line}
status=$?
export -p > {variables}
exit $status
"""


class Project:
    """A directory with the project's files, in which one page runs."""

    def __init__(self, root: Path, env: t.Mapping[str, str]) -> None:
        self.root = root
        self.port = str(free_port())
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            **env,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLASK_RUN_PORT": self.port,
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        for name in (
            "FLASK_APP",
            "CELERY_BROKER_URL",
            "CELERY_RESULT_BACKEND",
            "PYTHONPATH",
        ):
            self.env.pop(name, None)
        self.variables = root.parent / "variables.sh"
        self._background: list[tuple[subprocess.Popen[bytes], Path, Block, str]] = []
        self._started = 0.0

    def write(self, blocks: t.Iterable[Block]) -> list[str]:
        """Write the file blocks; return the files written."""
        written: list[str] = []
        for block in blocks:
            if block.path is None:
                continue
            if block.path in written:
                raise SnippetError(f"{block.where}: {block.path} is shown twice")
            target = self.root / block.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code + "\n")
            written.append(block.path)
        return written

    def run_python(self, modules: list[str], blocks: list[Block]) -> None:
        script = self.root.parent / "snippets.py"
        script.write_text(_SCRIPT)
        data = self.root.parent / "snippets.json"
        code = [(b.page, b.line, b.code) for b in blocks]
        data.write_text(json.dumps([modules, code]))
        done = subprocess.run(
            [sys.executable, str(script), str(data)],
            cwd=self.root,
            # The script is outside the project, whose commands find it as
            # the directory they run in.
            env={**self.env, "PYTHONPATH": str(self.root)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode:
            where = ", ".join(b.where for b in blocks) or "its files"
            raise SnippetError(
                f"the Python of the page ({where}) fails:\n{done.stderr}{done.stdout}"
            )

    def run_console(self, block: Block) -> None:
        for command in commands(block):
            line = command.line.replace(f":{DOCS_PORT}", f":{self.port}")
            if block.marker is not None and block.marker.verb == "background":
                log = self.root.parent / f"background-{len(self._background)}.log"
                with log.open("wb") as out:
                    process = subprocess.Popen(
                        ["bash", "-c", f"exec {line}"],
                        cwd=self.root,
                        env=self.env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                self._background.append((process, log, block, line))
                self._started = time.monotonic()
                continue
            self._run(block, command, line)

    def _run(self, block: Block, command: Command, line: str) -> None:
        deadline = time.monotonic() + (RETRY_SECONDS if self._background else 0)
        while True:
            done = subprocess.run(
                ["bash", "-c", _SHELL.format(line=line, variables=self.variables)],
                cwd=self.root,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode == 0 and command.matches(done.stdout):
                return
            self._check_background()
            if time.monotonic() > deadline:
                raise SnippetError(
                    f"{block.where}: $ {command.line}\nexited with {done.returncode};"
                    f" expected {command.output}, got:\n{done.stdout}{done.stderr}"
                    f"{self.logs()}"
                )
            time.sleep(0.5)

    def _check_background(self) -> None:
        for process, _, block, line in self._background:
            if process.poll() is not None:
                raise SnippetError(
                    f"{block.where}: $ {line}\nexited with {process.returncode}"
                    f"{self.logs()}"
                )

    def logs(self) -> str:
        return "".join(
            f"\n--- {block.where}: $ {line}\n{log.read_text(errors='replace')[-4000:]}"
            for _, log, block, line in self._background
        )

    def run_tests(self, paths: list[str]) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode or re.search(
            r"\d+ (skipped|xfailed|deselected)", done.stdout
        ):
            raise SnippetError(
                f"the tests {paths} do not pass:\n{done.stdout}{done.stderr}"
            )

    def settle(self) -> None:
        """Check that the background commands still run, some seconds after
        the last one started: long enough for a command that cannot start
        (an import error, a wrong option) to have exited."""
        if self._background:
            time.sleep(max(0.0, self._started + SETTLE_SECONDS - time.monotonic()))
            self._check_background()

    def stop(self) -> None:
        """Stop the background commands, as Ctrl-C would, then at once."""
        for process, *_ in self._background:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process, *_ in self._background:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def run(page: Path, root: Path, env: t.Mapping[str, str]) -> None:
    """Run the blocks of ``page`` in a project made in ``root``."""
    blocks = read(page)
    check_markers(blocks)
    project = Project(root / "project", env)
    run_blocks = [b for b in blocks if b.marker is None or b.marker.verb != "skip"]
    base = [
        b
        for name in PROJECT_PAGES
        if DOCS / name != page
        for b in read(DOCS / name)
        if b.path and (b.marker is None or b.marker.verb != "skip")
    ]
    project.write(base)
    written = project.write(run_blocks)
    tests = [p for p in written if Path(p).name.startswith("test_")]
    modules = [
        p.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for p in written
        if p.endswith(".py") and p not in tests and Path(p).name != "conftest.py"
    ]
    scripts = [b for b in run_blocks if b.language == "python" and b.path is None]
    try:
        project.run_python(modules, scripts)
        for block in run_blocks:
            if block.language == "console":
                project.run_console(block)
        if tests:
            project.run_tests(tests)
        project.settle()
    finally:
        project.stop()
