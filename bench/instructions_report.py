"""The tables of the instruction count, from ``instructions.json``.

``python bench/instructions_report.py bench/results`` writes them again.
"""

from __future__ import annotations

import json
import statistics
import sys
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
        f"Mean over {meta['layouts']} memory layouts (PYTHONHASHSEED,"
        " environment size and database path), [min, max] across them; each"
        " the difference"
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


def plot(results: dict[str, t.Any], path: Path) -> None:
    """Each Flask variant's extra instructions per task over plain Celery,
    per cell, with the spread across memory layouts."""
    from report import _figure
    from report import _save
    from report import COLORS
    from report import SHORT

    table = overheads(results["samples"])
    fig, ax = _figure()
    width = 0.26
    for j, v in enumerate(FLASK_VARIANTS):
        rows = [table[cell][v] for cell in table]
        ax.bar(
            [i + (j - 1) * width for i in range(len(rows))],
            [r["mean"] / 1000 for r in rows],
            width,
            yerr=[
                [(r["mean"] - r["min"]) / 1000 for r in rows],
                [(r["max"] - r["mean"]) / 1000 for r in rows],
            ],
            capsize=3,
            color=COLORS[v],
            label=SHORT[v],
            edgecolor="black" if v == "ctx" else "none",
            linewidth=0.8,
        )
    labels = [CELL_NAMES[c].replace(", ", "\n").replace("``", "") for c in table]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("thousand instructions per task")
    ax.set_title("Extra instructions over plain Celery (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", fontsize=10)
    meta = results["meta"]
    _save(
        fig,
        path,
        f"Mean over {meta['layouts']} memory layouts, bars: min to max."
        f" Commit {meta['commit']}, {meta['date']}.",
    )


def write_instructions(results: dict[str, t.Any], out: Path) -> str:
    """Write ``instructions.md``, ``instructions.rst`` and
    ``instructions.png``; return the Markdown."""
    text = markdown(results)
    (out / "instructions.md").write_text(text)
    (out / "instructions.rst").write_text(rst(results))
    plot(results, out / "instructions.png")
    return text


def write_worker(results: dict[str, t.Any], out: Path) -> str:
    """Write ``instructions-worker.md`` and ``.rst``: a real worker's
    instructions per task, and their ratio to plain Celery's."""
    per_task, meta = results["per_task"], results["meta"]
    plain = per_task["plain"]
    rows = []
    for v, values in per_task.items():
        extra = _summary([x - p for x, p in zip(values, plain, strict=True)])
        mean = statistics.fmean(values)
        rows.append(
            (
                NAMES[v],
                _n(mean),
                _spread(extra),
                f"{mean / statistics.fmean(plain):.3f}",
            )
        )
    note = (
        f"A worker (solo pool) consuming no-op tasks from Redis: the difference"
        f" between {meta['calls'][1]} and {meta['calls'][0]} tasks, divided by"
        f" {meta['calls'][1] - meta['calls'][0]}; mean over {meta['layouts']}"
        f" memory layouts, [min, max] across them. Commit {meta['commit']},"
        f" {meta['date']}."
    )
    header = ("worker", "instructions per task", "over plain", "ratio to plain")
    md = [
        "| " + " | ".join(header) + " |",
        "|---|---:|---:|---:|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        note,
        "",
    ]
    (out / "instructions-worker.md").write_text("\n".join(md))
    rst_lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        rst_lines.append(f"   * - {row[0]}")
        rst_lines += [f"     - {cell}" for cell in row[1:]]
    rst_lines += ["", note, ""]
    (out / "instructions-worker.rst").write_text("\n".join(rst_lines))
    return "\n".join(md)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    data = json.loads((out / "instructions.json").read_text())
    print(write_instructions(data, out))
