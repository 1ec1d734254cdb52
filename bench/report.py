"""Write the tables (Markdown and reStructuredText) and the plot (PNG) of a
benchmark run from its ``results.json``.

``run.py`` calls it at the end of a run; to redo the report of a stored run::

    python bench/report.py bench/results
"""

from __future__ import annotations

import json
import statistics
import sys
import typing as t
from dataclasses import dataclass
from pathlib import Path

LABELS = {
    "plain": "plain Celery (no context)",
    "flasktask": "Flask's FlaskTask pattern",
    "celeryext": "Flask-CeleryExt",
    "ctx": "Flask-Celery-Ctx",
}
SHORT = {
    "plain": "plain Celery",
    "flasktask": "FlaskTask",
    "celeryext": "Flask-CeleryExt",
    "ctx": "Flask-Celery-Ctx",
}
COLORS = {
    "plain": "#9e9e9e",
    "flasktask": "#5b8fd6",
    "celeryext": "#e0a030",
    "ctx": "#2e9e5b",
}
VARIANTS = tuple(LABELS)
#: The end-to-end throughput each variant must reach, as a fraction of plain
#: Celery's.
THROUGHPUT_GOAL = 0.98
SCENARIOS = (
    ("solo", "trivial"),
    ("solo", "insert"),
    ("prefork", "trivial"),
    ("prefork", "insert"),
)
TASK_LABELS = {
    "noop": "no-op task",
    "query": "one SELECT",
    "trivial": "trivial task",
    "insert": "insert one row",
}


@dataclass
class Summary:
    """The median of some samples and their spread."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: t.Sequence[float]) -> Summary:
        ordered = sorted(values)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(
            statistics.median(ordered), q1, q3, ordered[0], ordered[-1], len(ordered)
        )

    def format(self, digits: int = 0) -> str:
        """``median [q1-q3]``."""
        f = f"{{:,.{digits}f}}"
        return f"{f.format(self.median)} [{f.format(self.q1)}-{f.format(self.q3)}]"


def ratios(samples: t.Mapping[str, t.Sequence[float]], variant: str) -> Summary:
    """A variant's samples divided by plain Celery's of the same round."""
    pairs = zip(samples[variant], samples["plain"], strict=True)
    return Summary.of([value / plain for value, plain in pairs])


# Tables ------------------------------------------------------------------


@dataclass
class Table:
    title: str
    note: str
    header: list[str]
    rows: list[list[str]]


def tables(results: t.Mapping[str, t.Any]) -> list[Table]:
    out: list[Table] = []
    inproc = results.get("inprocess")
    if inproc:
        rows = []
        for v in VARIANTS:
            row = [LABELS[v]]
            for kind in ("noop", "query"):
                summary = Summary.of(inproc[kind][v])
                row.append(summary.format(1))
                row.append(f"{summary.low:.1f}")
                row.append(ratios(inproc[kind], v).format(2))
            rows.append(row)
        out.append(
            Table(
                "1. In-process cost per task",
                f"``task.apply()`` with no context active, microseconds per call"
                f" (lower is better): a no-op task ({inproc['calls']['noop']} calls"
                f" per sample) and a task doing one ``SELECT`` on"
                f" {'a SQLite file' if inproc['database'] == 'sqlite' else 'PostgreSQL'}"
                f" ({inproc['calls']['query']} calls per sample);"
                f" {len(inproc['noop']['plain'])} samples per variant, round-robin."
                " Median [interquartile range], the best sample (the cost with"
                " the least interference from the rest of the machine), and the"
                " ratio to plain Celery in the same round.",
                [
                    "Variant",
                    "no-op, µs",
                    "best",
                    "ratio",
                    "one SELECT, µs",
                    "best",
                    "ratio",
                ],
                rows,
            )
        )
    e2e = results.get("e2e")
    if e2e:
        rows = []
        for pool, kind in SCENARIOS:
            if pool not in e2e:
                continue
            data = e2e[pool][kind]
            for v in VARIANTS:
                rows.append(
                    [
                        f"{pool} x{e2e[pool]['concurrency']}",
                        TASK_LABELS[kind],
                        LABELS[v],
                        Summary.of(data[v]).format(0),
                        ratios(data, v).format(3),
                    ]
                )
        some = next(p for p in ("solo", "prefork") if p in e2e)
        out.append(
            Table(
                "2. End-to-end throughput",
                f"Tasks per second (higher is better) through Redis with a real"
                f" worker per variant: {e2e['tasks']['trivial']} trivial tasks or"
                f" {e2e['tasks']['insert']} tasks inserting one row in PostgreSQL"
                f" per sample, queued before the worker starts consuming;"
                f" {len(e2e[some]['trivial']['plain'])} samples per variant, the"
                " variants interleaved. Median [interquartile range]; the ratio"
                " is to plain Celery in the same round.",
                ["Pool", "Task", "Variant", "tasks/s", "ratio"],
                rows,
            )
        )
    extra = [
        ("on_commit", "3. ``delay_on_commit`` against ``delay`` after a commit"),
        ("instances", "4. A task receiving 100 model instances"),
    ]
    for part, title in extra:
        data = results.get(part)
        if data is None:
            continue
        if not data.get("available"):
            out.append(Table(title, f"Not available: {data['reason']}", [], []))
            continue
        out.append(extra_table(part, title, data))
    startup = results.get("startup")
    if startup:
        rows = [
            [
                LABELS[v],
                f"{Summary.of(startup[v]).median:.2f}"
                f" [{Summary.of(startup[v]).low:.2f}-{Summary.of(startup[v]).high:.2f}]",
                ratios(startup, v).format(2),
            ]
            for v in VARIANTS
        ]
        out.append(
            Table(
                "5. Worker start to first task done",
                "Seconds from starting the worker process (solo pool) to the end"
                " of a task that was already queued (lower is better);"
                f" {len(startup['plain'])} starts per variant, interleaved."
                " Median [min-max]; the ratio is to plain Celery in the same"
                " round.",
                ["Variant", "seconds", "ratio"],
                rows,
            )
        )
    return out


def extra_table(part: str, title: str, data: t.Mapping[str, t.Any]) -> Table:
    """Parts 3 and 4: rows of ``data["rows"]``, each a label and samples."""
    rows = []
    for row in data["rows"]:
        cells = [row["label"]]
        for column in data["columns"]:
            value = row.get(column["key"])
            if value is None:
                cells.append("")
            elif isinstance(value, list):
                cells.append(Summary.of(value).format(column.get("digits", 1)))
            else:
                cells.append(str(value))
        rows.append(cells)
    return Table(
        title,
        data["note"],
        ["", *(column["title"] for column in data["columns"])],
        rows,
    )


def goals(results: t.Mapping[str, t.Any]) -> list[str]:
    """Each goal of the benchmark, met or not, with the numbers."""
    lines = []
    e2e = results.get("e2e")
    if e2e:
        for pool, kind in SCENARIOS:
            if pool not in e2e:
                continue
            r = ratios(e2e[pool][kind], "ctx")
            met = r.median >= THROUGHPUT_GOAL
            lines.append(
                f"Throughput, {pool}, {TASK_LABELS[kind]}: {r.median:.3f}"
                f" [{r.q1:.3f}-{r.q3:.3f}] of plain Celery (goal ≥ {THROUGHPUT_GOAL}):"
                f" {'met' if met else 'NOT met'}."
            )
    inproc = results.get("inprocess")
    if inproc:
        for kind in ("noop", "query"):
            ours = Summary.of(inproc[kind]["ctx"])
            others = {v: Summary.of(inproc[kind][v]) for v in VARIANTS[1:3]}
            met = all(ours.median < other.median for other in others.values())
            versus = ", ".join(
                f"{SHORT[v]} {other.median:.1f} (best {other.low:.1f})"
                for v, other in others.items()
            )
            lines.append(
                f"In-process, {TASK_LABELS[kind]}: {ours.median:.1f} µs per call"
                f" (best {ours.low:.1f}) against {versus}:"
                f" {'met' if met else 'NOT met'}."
            )
    instances = results.get("instances")
    if instances and instances.get("available") and "goal" in instances:
        lines.append(instances["goal"])
    return lines


def markdown(results: t.Mapping[str, t.Any]) -> str:
    meta = results["meta"]
    out = [
        "# Benchmark results",
        "",
        *[f"- {line}" for line in header_lines(meta)],
        "",
        "## Goals",
        "",
        *[f"- {line}" for line in goals(results)],
        "",
    ]
    for table in tables(results):
        out += [f"## {table.title}", "", table.note.replace("``", "`"), ""]
        if table.header:
            out.append("| " + " | ".join(table.header) + " |")
            out.append("|" + "|".join("---" for _ in table.header) + "|")
            out += ["| " + " | ".join(row) + " |" for row in table.rows]
            out.append("")
    out += [
        f"![{name}]({name})"
        for name in ("results-inprocess.png", "results-e2e.png", "results-startup.png")
    ]
    out.append("")
    return "\n".join(out).replace("``", "`")


def header_lines(meta: t.Mapping[str, t.Any]) -> list[str]:
    versions = ", ".join(f"{name} {v}" for name, v in meta["versions"].items())
    services = ", ".join(f"{name} {v}" for name, v in meta["services"].items())
    load = " → ".join(
        "/".join(f"{x:.1f}" for x in meta[key]) for key in ("load_before", "load_after")
    )
    return [
        f"Command: ``{meta['command']}`` ({meta['mode']} mode, {meta['seconds']} s)",
        f"Date: {meta['date']}; flask_celery_ctx as of commit {meta['commit']}",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['platform']};"
        f" load average {load}",
        f"Python {meta['python']}; {versions}",
        f"Services: {services}, on the same machine",
    ]


def rst(results: t.Mapping[str, t.Any]) -> str:
    """The tables as reST, for the docs to include; sections use ``^``."""
    meta = results["meta"]
    out = [
        ".. This file is written by bench/report.py: do not edit.",
        "",
        *[f"- {line}" for line in header_lines(meta)],
        "",
        "Goals:",
        "",
        *[f"- {line}" for line in goals(results)],
        "",
    ]
    for table in tables(results):
        out += [table.title, "^" * len(table.title), "", table.note, ""]
        if not table.header:
            continue
        out += [".. list-table::", "   :header-rows: 1", ""]
        for row in [table.header, *table.rows]:
            out.append(f"   * - {row[0] or ' '}")
            out += [f"     - {cell or ' '}" for cell in row[1:]]
        out.append("")
    return "\n".join(out)


# Plot --------------------------------------------------------------------


#: The size of each plot, in inches at ``DPI``: about the width the docs'
#: page shows it at, so that its labels are read at their size.
FIGSIZE = (7.2, 4.2)
DPI = 100


def _figure() -> t.Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12})
    return plt.subplots(figsize=FIGSIZE)


def _save(fig: t.Any, path: Path, caption: str) -> None:
    import matplotlib.pyplot as plt

    fig.text(0.01, 0.01, caption, fontsize=8.5, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _bars(ax: t.Any, groups: list[str], values: dict[str, list[Summary]]) -> None:
    width = 0.2
    for j, v in enumerate(VARIANTS):
        medians = [s.median for s in values[v]]
        errors = [
            [s.median - s.q1 for s in values[v]],
            [s.q3 - s.median for s in values[v]],
        ]
        xs = [i + (j - 1.5) * width for i in range(len(groups))]
        ax.bar(
            xs,
            medians,
            width,
            yerr=errors,
            capsize=3,
            color=COLORS[v],
            label=SHORT[v],
            edgecolor="black" if v == "ctx" else "none",
            linewidth=0.8,
        )
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _legend(ax: t.Any) -> None:
    ax.legend(
        loc="lower center",
        bbox_to_anchor=(0.5, 1.08),
        ncols=len(VARIANTS),
        fontsize=9.5,
        frameon=False,
    )


def plots(results: t.Mapping[str, t.Any], out: Path) -> list[str]:
    """Write one plot per part measured, ``results-PART.png``; return the
    file names."""
    meta = results["meta"]
    caption = f"Medians, bars: IQR. Commit {meta['commit']}, {meta['date']}."
    written = []

    inproc = results.get("inprocess")
    if inproc:
        fig, ax = _figure()
        kinds = ["noop", "query"]
        _bars(
            ax,
            [TASK_LABELS[k] for k in kinds],
            {v: [Summary.of(inproc[k][v]) for k in kinds] for v in VARIANTS},
        )
        ax.set_ylabel("µs per task.apply() (lower is better)")
        ax.set_title("In-process cost per task, wall clock")
        _legend(ax)
        _save(fig, out / "results-inprocess.png", caption)
        written.append("results-inprocess.png")

    e2e = results.get("e2e")
    if e2e:
        fig, ax = _figure()
        scenarios = [s for s in SCENARIOS if s[0] in e2e]
        _bars(
            ax,
            [
                f"{pool} x{e2e[pool]['concurrency']}\n{TASK_LABELS[kind]}"
                for pool, kind in scenarios
            ],
            {v: [ratios(e2e[p][k], v) for p, k in scenarios] for v in VARIANTS},
        )
        ax.axhline(THROUGHPUT_GOAL, color="#c0392b", linestyle="--", linewidth=1)
        ax.text(
            1.0,
            THROUGHPUT_GOAL,
            f" goal\n {THROUGHPUT_GOAL}",
            color="#c0392b",
            fontsize=10,
            ha="left",
            va="center",
            transform=ax.get_yaxis_transform(),
        )
        low = min(
            s.q1 for v in VARIANTS for s in [ratios(e2e[p][k], v) for p, k in scenarios]
        )
        ax.set_ylim(min(0.9, low - 0.02), None)
        ax.set_ylabel("tasks/s, ratio to plain Celery")
        ax.set_title("Throughput through Redis (higher is better)")
        _legend(ax)
        _save(fig, out / "results-e2e.png", caption)
        written.append("results-e2e.png")

    startup = results.get("startup")
    if startup:
        fig, ax = _figure()
        summaries = [Summary.of(startup[v]) for v in VARIANTS]
        ax.bar(
            [SHORT[v] for v in VARIANTS],
            [s.median for s in summaries],
            yerr=[
                [s.median - s.low for s in summaries],
                [s.high - s.median for s in summaries],
            ],
            capsize=3,
            color=[COLORS[v] for v in VARIANTS],
            edgecolor=["black" if v == "ctx" else "none" for v in VARIANTS],
        )
        ax.set_ylabel("seconds (lower is better)")
        ax.set_title("Worker start to first task done")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        _save(
            fig,
            out / "results-startup.png",
            caption.replace("IQR", "min to max"),
        )
        written.append("results-startup.png")
    return written


def write_report(results: t.Mapping[str, t.Any], out: Path) -> None:
    """Write ``results.md``, ``results.rst`` and the plots to ``out``."""
    (out / "results.md").write_text(markdown(results))
    (out / "results.rst").write_text(rst(results))
    (out / "results.png").unlink(missing_ok=True)  # the former, single plot
    plots(results, out)


if __name__ == "__main__":
    directory = Path(
        sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results"
    )
    write_report(json.loads((directory / "results.json").read_text()), directory)
