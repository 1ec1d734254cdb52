"""Where the instructions of a task go, by Python function.

Python 3.12 and later, started with ``-X perf``, call every Python function
through a small trampoline of its own, and write the address and the name of
each to ``/tmp/perf-PID.map``. callgrind sees the trampolines as functions
without a name; their inclusive cost is that of the Python function. This
module runs a variant's child under callgrind that way, asks
``callgrind_annotate`` for the inclusive cost of every function in the two
dumps of a cell, names the trampolines from the map, and returns, per
Python function, the instructions per task: the difference between the two
dumps divided by the difference of their calls.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing as t
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from instructions_child import CELLS  # noqa: E402
from instructions_child import ORDER  # noqa: E402

_LINE = re.compile(r"^\s*([\d,]+) \([^)]*\)\s+\?\?\?:0x([0-9a-f]+) \[\?\?\?\]$")


def inclusive(path: Path, names: dict[int, str]) -> dict[str, int]:
    """The inclusive instructions of each named trampoline in a dump."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    costs: dict[str, int] = {}
    for line in out.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        name = names.get(int(match[2], 16))
        if name is not None:
            # A function with several code objects (rare) sums them.
            costs[name] = costs.get(name, 0) + int(match[1].replace(",", ""))
    return costs


def perf_map(pid: int) -> dict[int, str]:
    """The trampolines' addresses and their functions' names."""
    names = {}
    path = Path(f"/tmp/perf-{pid}.map")
    for line in path.read_text().splitlines():
        address, _, name = line.split(" ", 2)
        names[int(address, 16)] = name.removeprefix("py::")
    path.unlink()
    return names


def profile(
    tool: str,
    python: str,
    variant: str,
    n1: int,
    n2: int,
    env: dict[str, str],
    directory: Path,
) -> dict[str, dict[str, float]]:
    """Per cell, the instructions per task of each Python function that
    costs any, inclusive of what it calls."""
    out = directory / f"profile-{variant}.cg"
    command = [
        tool,
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        "--dump-before=getloadavg",
        python,
        "-X",
        "perf",
        str(BENCH / "instructions_child.py"),
        variant,
        str(n1),
        str(n2),
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"profile of {variant} failed:\n{stderr[-3000:]}")
    # valgrind runs the program in its own process: the map has its pid.
    pid = int(re.findall(r"==(\d+)==", stderr)[0])
    names = perf_map(pid)
    files = sorted(
        directory.glob(f"{out.name}.*"), key=lambda p: int(p.suffix.lstrip("."))
    )
    result = {}
    for i, cell in enumerate(ORDER):
        first = inclusive(files[1 + 3 * i], names)
        second = inclusive(files[2 + 3 * i], names)
        result[cell] = {
            name: (second.get(name, 0) - first.get(name, 0)) / (n2 - n1)
            for name in second
        }
    for path in files:
        path.unlink()
    out.unlink(missing_ok=True)
    return result


def top(
    costs: dict[str, float], limit: int = 25, at_least: float = 200
) -> list[tuple[str, float]]:
    """The costliest functions, without the child's own loop."""
    skip = ("run:", "main:", "<module>:")
    rows = [
        (name, cost)
        for name, cost in costs.items()
        if cost >= at_least and not name.startswith(skip)
    ]
    return sorted(rows, key=lambda row: -row[1])[:limit]


def _short(name: str) -> str:
    """``function (module)`` from the map's ``function:path``."""
    function, _, path = name.partition(":")
    path = re.sub(r"^.*/(site-packages|lib/python3\.\d+|bench|[^/]*-src)/", "", path)
    return f"{function} ({path})"


def write_profile(
    profiles: dict[str, dict[str, dict[str, float]]], meta: dict[str, t.Any], out: Path
) -> None:
    """Write ``instructions-profile.md``: per cell, the Python functions of
    Flask-Celery-Ctx and FlaskTask side by side, inclusive instructions per
    task."""
    lines = [
        "# Instructions per task, by Python function",
        "",
        "Inclusive: a function's own instructions and those of what it calls."
        " Functions not listed for a variant do not run in it, or cost less than"
        " 200 instructions per task. Python 3.12+ `-X perf` under callgrind,"
        f" PYTHONHASHSEED=0; commit {meta['commit']}, {meta['date']}.",
        "",
    ]
    ours, theirs = profiles["ctx"], profiles["flasktask"]
    for cell in CELLS:
        names = dict(top(ours[cell], 30) + top(theirs[cell], 30))
        lines += [
            f"## {cell}",
            "",
            "| function | Flask-Celery-Ctx | FlaskTask |",
            "|---|---:|---:|",
        ]
        for name in sorted(
            names, key=lambda n: -max(ours[cell].get(n, 0), theirs[cell].get(n, 0))
        ):
            lines.append(
                f"| `{_short(name)}` | {ours[cell].get(name, 0):,.0f}"
                f" | {theirs[cell].get(name, 0):,.0f} |"
            )
        lines.append("")
    (out / "instructions-profile.md").write_text("\n".join(lines))
    data = {"meta": meta, "profiles": profiles}
    (out / "instructions-profile.json").write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    # python bench/instructions_profile.py PYTHON: the profile alone, of the
    # package as committed, written to bench/results/instructions-profile.md.
    from datetime import datetime
    from datetime import timezone

    from instructions import layout_database
    from instructions import valgrind
    from instructions import workspace

    with workspace(False) as (directory, env, commit):
        env = {**env, **layout_database(0, directory), "PYTHONHASHSEED": "0"}
        found = {
            variant: profile(valgrind(), sys.argv[1], variant, 20, 80, env, directory)
            for variant in ("flasktask", "ctx")
        }
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_profile(found, {"commit": commit, "date": date}, BENCH / "results")
