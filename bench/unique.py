"""What ``unique_for`` adds to a send and to a worker's run: instructions
counted by callgrind, and statements counted by SQLAlchemy's events.

Run from the repository root::

    python bench/unique.py              # 3 memory layouts, about 2 minutes
    python bench/unique.py --layouts 5

It needs valgrind and no server: the app of ``unique_child.py`` sends to
kombu's in-memory broker and keeps its keys in a SQLite file. The package
measured is the one installed (the working tree, in the project's venv). It
writes ``unique.json``, ``unique.md`` and ``unique.rst`` to ``bench/results``
(or ``--out``); the docs' Unique sends page includes the last.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import typing as t
from datetime import datetime
from datetime import timezone
from importlib.metadata import version
from pathlib import Path
from tempfile import TemporaryDirectory

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from instructions import dumps  # noqa: E402
from instructions import layout_env  # noqa: E402
from instructions import log  # noqa: E402
from instructions import valgrind  # noqa: E402
from run import git  # noqa: E402
from unique_child import CELLS  # noqa: E402

CHILD = str(BENCH / "unique_child.py")

#: The rows of the table: a label, the cell, and the cell it is compared to.
ROWS = (
    ("`apply_async()`, no option", "send", None),
    ("`apply_async(unique_for=...)`, a new key: claimed, then published", "send-unique", "send"),
    ("`apply_async(unique_for=...)`, a key held: not published", "send-duplicate", "send"),
    ("worker hot path, a message without a key", "worker", None),
    ("worker hot path, a message with a key: released", "worker-unique", "worker"),
)  # fmt: skip


def run_layout(
    tool: str, layout: int, n1: int, n2: int, directory: Path
) -> dict[str, float]:
    """Instructions per call of each cell in one memory layout."""
    url = f"sqlite:///{directory / f'unique-{layout}.sqlite'}"
    out = directory / f"unique-{layout}.cg"
    command = [
        tool, "--tool=callgrind", f"--callgrind-out-file={out}",
        "--dump-before=getloadavg", sys.executable, CHILD, url, str(n1), str(n2),
    ]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", **layout_env(layout)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"layout {layout} failed:\n{done.stderr[-3000:]}")
    counts = dumps(out)
    return {
        cell: (counts[2 + 3 * i] - counts[1 + 3 * i]) / (n2 - n1)
        for i, cell in enumerate(CELLS)
    }


def statements(directory: Path) -> dict[str, float]:
    url = f"sqlite:///{directory / 'statements.sqlite'}"
    done = subprocess.run(
        [sys.executable, CHILD, url, "--statements"],
        capture_output=True,
        text=True,
        check=True,
    )
    found: dict[str, float] = json.loads(done.stdout)
    return found


def report(result: dict[str, t.Any]) -> tuple[str, str]:
    """The table, in Markdown and in reST."""
    samples = result["instructions"]
    mean = {cell: sum(values) / len(values) for cell, values in samples.items()}
    rows = []
    for label, cell, base in ROWS:
        values = samples[cell]
        if base is None:
            shown = f"{mean[cell]:,.0f} [{min(values):,.0f}, {max(values):,.0f}]"
        else:
            extra = [v - b for v, b in zip(values, samples[base], strict=True)]
            shown = (
                f"{mean[cell] - mean[base]:+,.0f}"
                f" [{min(extra):+,.0f}, {max(extra):+,.0f}]"
            )
        rows.append((label, shown, f"{result['statements'][cell]:g}"))
    header = (
        "per call",
        "instructions (+: over the same without a key)",
        "SQL statements",
    )
    note = (
        f"Mean over {result['layouts']} memory layouts, [min, max] across them;"
        f" each the difference between {result['n2']} and {result['n1']} calls,"
        f" divided by {result['n2'] - result['n1']}. SQLite file, kombu's"
        " memory:// broker, Flask-SQLAlchemy."
    )
    meta = (
        f"Commit {result['commit']}, {result['date']}, `{result['command']}`."
        f" Python {result['python']}, celery {result['celery']}, SQLAlchemy"
        f" {result['sqlalchemy']}."
    )
    md = [
        "# What `unique_for` adds",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        note,
        "",
        meta,
        "",
    ]
    rst_rows = [(row[0].replace("`", "``"), *row[1:]) for row in rows]
    width = [max(len(row[i]) for row in [header, *rst_rows]) for i in range(3)]
    line = "  ".join("=" * w for w in width)

    def shown(row: t.Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, width, strict=True)).rstrip()

    rst = [
        line,
        shown(header),
        line,
        *(shown(row) for row in rst_rows),
        line,
        "",
        note,
        "",
        meta.replace("`", "``"),
        "",
    ]
    return "\n".join(md), "\n".join(rst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", type=int, default=3)
    parser.add_argument("--n1", type=int, default=20)
    parser.add_argument("--n2", type=int, default=80)
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    tool = valgrind()
    started = time.monotonic()
    samples: dict[str, list[float]] = {cell: [] for cell in CELLS}
    with TemporaryDirectory() as tmp:
        for layout in range(args.layouts):
            for cell, value in run_layout(
                tool, layout, args.n1, args.n2, Path(tmp)
            ).items():
                samples[cell].append(value)
            log(f"layout {layout}: done")
        counted = statements(Path(tmp))
    result = {
        "instructions": samples,
        "statements": counted,
        "layouts": args.layouts,
        "n1": args.n1,
        "n2": args.n2,
        "commit": git("describe", "--always", "--dirty"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(["bench/unique.py", *sys.argv[1:]]),
        "python": platform.python_version(),
        "celery": version("celery"),
        "sqlalchemy": version("sqlalchemy"),
        "seconds": round(time.monotonic() - started),
    }
    md, rst = report(result)
    args.out.mkdir(exist_ok=True)
    (args.out / "unique.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "unique.md").write_text(md)
    (args.out / "unique.rst").write_text(rst)
    print(md)


if __name__ == "__main__":
    main()
