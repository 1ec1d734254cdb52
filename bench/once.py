"""What ``once=True`` adds to a task, in instructions counted by callgrind
and in statements.

Run from the repository root::

    python bench/once.py                 # about 2 minutes
    python bench/once.py --layouts 6 --working-tree

``once_child.py`` runs under callgrind as ``instructions_child.py`` does
(see ``instructions.py``, whose workspace, memory layouts and counting it
uses): per task, a cell costs the difference between ``N2`` and ``N1``
messages traced as a worker traces them, divided by ``N2 - N1``. The two
cells are a task that adds a row and commits it, and the same task declared
with ``once=True``, which leaves the commit to the library. It writes
``once.json`` and ``once.md`` to ``bench/results`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from datetime import timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "variants"))
sys.path.insert(0, str(BENCH))

from instructions import dumps  # noqa: E402
from instructions import layout_database  # noqa: E402
from instructions import layout_env  # noqa: E402
from instructions import log  # noqa: E402
from instructions import valgrind  # noqa: E402
from instructions import workspace  # noqa: E402
from once_child import CELLS  # noqa: E402


def run_child(
    tool: str, layout: int, n1: int, n2: int, env: dict[str, str], directory: Path
) -> dict[str, float]:
    """Instructions per task of each cell, in one memory layout."""
    out = directory / f"once-{layout}.cg"
    command = [
        tool,
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        "--dump-before=getloadavg",
        sys.executable,
        str(BENCH / "once_child.py"),
        str(n1),
        str(n2),
    ]
    done = subprocess.run(
        command, env={**env, **layout_env(layout)}, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"layout {layout} failed:\n{done.stderr[-3000:]}")
    counts = dumps(out)
    return {
        cell: (counts[2 + 3 * i] - counts[1 + 3 * i]) / (n2 - n1)
        for i, cell in enumerate(CELLS)
    }


def statements(env: dict[str, str]) -> dict[str, list[str]]:
    """The statements of one task of each cell, without valgrind."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "once_child.py"), "statements"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def report(result: dict[str, t.Any]) -> str:
    write, once = result["samples"]["write"], result["samples"]["write_once"]
    added = [b - a for a, b in zip(write, once, strict=True)]
    statements = result["statements"]

    def cell(values: list[float]) -> str:
        return (
            f"{statistics.mean(values):,.0f} [{min(values):,.0f}, {max(values):,.0f}]"
        )

    lines = [
        "# What once=True adds to a task",
        "",
        "| per task, worker hot path | instructions | statements |",
        "|---|---|---|",
        f"| adds a row and commits | {cell(write)} | {'; '.join(statements['write'])} |",
        f"| the same with `once=True` | {cell(once)} | {'; '.join(statements['write_once'])} |",
        f"| added by `once=True` | {cell(added)} | +{len(statements['write_once']) - len(statements['write'])} |",
        "",
        f"Mean over {len(write)} memory layouts, [min, max] across them; each"
        f" the difference between {result['n2']} and {result['n1']} tasks,"
        f" divided by {result['n2'] - result['n1']}. Flask-Celery-Ctx and"
        " Flask-SQLAlchemy on a SQLite file, every task with a new id.",
        "",
        f"Commit {result['commit']}, {result['date']}, `{result['command']}`."
        f" Python {platform_python()}.",
        "",
    ]
    return "\n".join(lines)


def report_rst(result: dict[str, t.Any]) -> str:
    """The table of :func:`report`, for the docs."""
    markdown = report(result).splitlines()
    rows = [line for line in markdown if line.startswith("|") and "---" not in line]
    notes = [
        f"{line.replace('`', '``')}\n" for line in markdown[len(rows) + 3 :] if line
    ]
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        lines.append(f"   * - {cells[0]}".replace("`", "``"))
        lines.extend(f"     - {cell}".replace("`", "``") for cell in cells[1:])
    return "\n".join([*lines, "", *notes, ""])


def platform_python() -> str:
    return sys.version.split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--n1", type=int, default=20)
    parser.add_argument("--n2", type=int, default=80)
    parser.add_argument("--working-tree", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    tool = valgrind()
    started = time.monotonic()
    # A workspace of its own: instructions.py empties its own when it
    # starts, and may be running.
    own = Path(os.environ.get("TMPDIR", "/tmp")) / "fccb-once"
    own.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(own)
    with workspace(args.working_tree) as (directory, env, commit):
        databases = [layout_database(n, directory) for n in range(args.layouts)]
        found = statements({**env, **databases[0]})
        samples: dict[str, list[float]] = {c: [0.0] * args.layouts for c in CELLS}

        def one(layout: int) -> None:
            per_call = run_child(
                tool, layout, args.n1, args.n2, {**env, **databases[layout]}, directory
            )
            for name, value in per_call.items():
                samples[name][layout] = value
            log(f"layout {layout}: done")

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, range(args.layouts)))
    result = {
        "samples": samples,
        "statements": found,
        "n1": args.n1,
        "n2": args.n2,
        "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "bench/once.py", *sys.argv[1:]]),
        "seconds": round(time.monotonic() - started),
    }
    args.out.mkdir(exist_ok=True)
    (args.out / "once.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "once.md").write_text(report(result))
    (args.out / "once.rst").write_text(report_rst(result))
    print(report(result))


if __name__ == "__main__":
    main()
