"""The tables of the instruction count, from ``instructions.json``.

``python bench/instructions_report.py bench/results`` writes them again.
"""

from __future__ import annotations

import json
import statistics
import sys
import typing as t
from pathlib import Path

NAMES = {
    "plain": "plain Celery",
    "flasktask": "FlaskTask (Flask docs)",
    "celeryext": "Flask-CeleryExt",
    "ctx": "Flask-Celery-Ctx",
}
CELL_NAMES = {
    "hot-noop": "worker hot path, no-op task",
    "hot-query": "worker hot path, one SELECT",
    "apply-noop": "``apply()``, no-op task",
    "apply-query": "``apply()``, one SELECT",
}
FLASK_VARIANTS = ("flasktask", "celeryext", "ctx")


def overheads(samples: dict[str, dict[str, list[float]]]) -> dict[str, t.Any]:
    """Per cell: plain Celery's instructions per task, and each Flask
    variant's extra over it, paired by memory layout (the samples are in
    layout order): mean, min and max."""
    table: dict[str, t.Any] = {}
    for cell, plain in samples["plain"].items():
        row: dict[str, t.Any] = {"plain": _summary(plain)}
        for variant in FLASK_VARIANTS:
            extra = [v - p for v, p in zip(samples[variant][cell], plain, strict=True)]
            row[variant] = _summary(extra)
        row["met"] = row["ctx"]["mean"] <= row["flasktask"]["mean"]
        table[cell] = row
    return table


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def _n(value: float, sign: bool = False) -> str:
    return f"{value:+,.0f}" if sign else f"{value:,.0f}"


def _spread(s: dict[str, float]) -> str:
    return f"{_n(s['mean'], sign=True)} [{_n(s['min'], True)}, {_n(s['max'], True)}]"


def markdown(results: dict[str, t.Any]) -> str:
    table = overheads(results["samples"])
    meta = results["meta"]
    header = "| instructions per task | plain Celery | over plain: " + " | ".join(
        NAMES[v] for v in FLASK_VARIANTS
    )
    lines = [
        "# Instructions per task",
        "",
        f"{header} | goal met |",
        "|---|---|---|---|---|---|",
    ]
    for cell, row in table.items():
        cells = [_n(row["plain"]["mean"]), *(_spread(row[v]) for v in FLASK_VARIANTS)]
        met = "yes" if row["met"] else "**no**"
        lines.append(f"| {CELL_NAMES[cell]} | {' | '.join(cells)} | {met} |")
    lines += [
        "",
        goal_sentence(table),
        "",
        f"Mean over {meta['layouts']} memory layouts (PYTHONHASHSEED and"
        " environment size), [min, max] across them; each the difference"
        f" between {meta['calls'][1]} and {meta['calls'][0]} calls, divided by"
        f" {meta['calls'][1] - meta['calls'][0]}.",
        "",
        f"Commit {meta['commit']}, {meta['date']}, `{meta['command']}`,"
        f" {meta['seconds']} s. Python {meta['python']}, {meta['valgrind']}, "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
    ]
    return "\n".join(lines).replace("``", "`")


def goal_sentence(table: dict[str, t.Any]) -> str:
    missed = [CELL_NAMES[c] for c, row in table.items() if not row["met"]]
    if not missed:
        return (
            "Goal met: Flask-Celery-Ctx costs no more instructions over plain"
            " Celery than FlaskTask, in all four cells."
        )
    return "Goal not met in: " + "; ".join(missed) + "."


def rst(results: dict[str, t.Any]) -> str:
    table = overheads(results["samples"])
    meta = results["meta"]
    lines = [
        ".. list-table:: Instructions per task: plain Celery's, and each"
        " variant's extra over it",
        "   :header-rows: 1",
        "   :stub-columns: 1",
        "",
        "   * - ",
        "     - plain Celery",
        *(f"     - {NAMES[v]}" for v in FLASK_VARIANTS),
        "     - goal met",
    ]
    for cell, row in table.items():
        lines.append(f"   * - {CELL_NAMES[cell]}")
        lines.append(f"     - {_n(row['plain']['mean'])}")
        for v in FLASK_VARIANTS:
            s = row[v]
            lines.append(
                f"     - {_n(s['mean'], True)}"
                f" [{_n(s['min'], True)}, {_n(s['max'], True)}]"
            )
        lines.append(f"     - {'yes' if row['met'] else '**no**'}")
    lines += [
        "",
        goal_sentence(table),
        f" Mean over {meta['layouts']} memory layouts, [min, max] across them.",
        "",
        f"Commit ``{meta['commit']}``, {meta['date']}: ``{meta['command']}``."
        f" Python {meta['python']}, {meta['valgrind']}, "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def write_instructions(results: dict[str, t.Any], out: Path) -> str:
    """Write ``instructions.md`` and ``instructions.rst``; return the
    Markdown."""
    text = markdown(results)
    (out / "instructions.md").write_text(text)
    (out / "instructions.rst").write_text(rst(results))
    return text


if __name__ == "__main__":
    out = Path(sys.argv[1])
    data = json.loads((out / "instructions.json").read_text())
    print(write_instructions(data, out))
