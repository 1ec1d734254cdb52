"""What an outage costs a view: the latency of a request that commits K
sends with ``delay_on_commit``, the broker healthy, refusing connections,
silent (a listener that accepts and never answers), or a host that drops the
packets of a connect (a listener whose full queue makes the kernel drop its
SYNs), and the Redis result backend refusing while the broker is healthy;
K = 1, 12 and 100, in one run.

Each request goes through Flask's test client to ``tests/outboxapp.py``'s
view, which commits K orders and sends a task for each, on a SQLite file.
The healthy broker is a private ``redis-server`` on a free port. For a
broker down, the first commit makes the bounded attempt; the commits after
it, within the hold of :mod:`flask_celery_ctx.outbox.publish`, make none:
both are reported. Nothing here asserts a time; the table goes to
``results/outage.md`` and ``results/outage.json``.

    python bench/outage.py [--repeat N] [--only CASE] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from sqlalchemy import create_engine  # noqa: E402

import outboxapp  # noqa: E402
from flask_celery_ctx.outbox import publish  # noqa: E402

COUNTS = (1, 12, 100)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def silent(port: int) -> socket.socket:
    """A listener on ``port`` that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", port))
    server.listen(256)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server


def dropping(port: int) -> list[socket.socket]:
    """A listener on ``port`` whose queue of connections not yet accepted
    is full: the kernel drops the packets of a new connect, which waits for
    its timeout. Close the sockets returned to end it."""
    server = socket.socket()
    server.bind(("127.0.0.1", port))
    server.listen(0)
    return [server, socket.create_connection(("127.0.0.1", port), timeout=5)]


def redis_server(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def measure(
    workdir: Path, name: str, settings: dict[str, t.Any], repeat: int
) -> list[dict[str, t.Any]]:
    """The latencies of commits of K sends, for each K, with ``settings``."""
    rows = []
    for count in COUNTS:
        database = workdir / f"{name}-{count}.sqlite"
        url = f"sqlite:///{database}"
        engine = create_engine(url)
        outboxapp.Base.metadata.create_all(engine)
        engine.dispose()
        app = outboxapp.create_app(
            {"SQLALCHEMY_DATABASE_URI": url, "SECRET_KEY": "bench", **settings}
        )
        client = app.test_client()
        client.post("/orders/warm?count=1")  # the outbox table, imports
        times = []
        publish.forget()
        for _ in range(repeat + 1):
            started = time.perf_counter()
            assert client.post(f"/orders/bench?count={count}").status_code == 200
            times.append(time.perf_counter() - started)
        first, after = times[0], times[1:]
        rows.append(
            {
                "case": name,
                "sends": count,
                "first_ms": round(first * 1000, 1),
                "then_median_ms": round(statistics.median(after) * 1000, 1),
                "then_max_ms": round(max(after) * 1000, 1),
            }
        )
        print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--only", help="measure this case alone, e.g. healthy")
    args = parser.parse_args()
    logging.getLogger("flask_celery_ctx").setLevel(logging.ERROR)
    queue = {"CELERY_TASK_DEFAULT_QUEUE": "fcc-bench-outage"}
    healthy_port, refused_port, silent_port = free_port(), free_port(), free_port()
    dropping_port = free_port()
    server = redis_server(healthy_port)
    listener = silent(silent_port)
    dropped = dropping(dropping_port)
    healthy = f"redis://127.0.0.1:{healthy_port}/0"
    cases = {
        "healthy": {"CELERY_BROKER_URL": healthy},
        "refused": {"CELERY_BROKER_URL": f"redis://127.0.0.1:{refused_port}/0"},
        "silent": {"CELERY_BROKER_URL": f"redis://127.0.0.1:{silent_port}/0"},
        "packets dropped": {
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{dropping_port}/0"
        },
        "result backend refused": {
            "CELERY_BROKER_URL": healthy,
            "CELERY_RESULT_BACKEND": f"redis://127.0.0.1:{refused_port}/1",
        },
    }
    rows: list[dict[str, t.Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="fcc-outage-") as tmp:
            for name, settings in cases.items():
                if args.only and name != args.only:
                    continue
                rows += measure(Path(tmp), name, settings | queue, args.repeat)
    finally:
        listener.close()
        for sock in dropped:
            sock.close()
        server.terminate()
        server.wait(20)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "outage.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| Broker | Sends in the commit | First commit (ms) | Next commits,"
        " median (ms) | Next commits, max (ms) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['sends']} | {row['first_ms']}"
            f" | {row['then_median_ms']} | {row['then_max_ms']} |"
        )
    (args.out / "outage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
