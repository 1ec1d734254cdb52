"""Run the example: the web server, and a Celery worker as its child process.

``python -m example_app`` (what ``make example`` runs). The worker is
started as a deployment starts it, ``flask --app example_app celery worker``,
and stopped with the server. Ctrl-C (or SIGTERM) stops the server at once and
the worker warmly: the task it runs finishes first. A second Ctrl-C stops the
worker at once. A worker killed by a signal (``kill -9``, the kernel's
out-of-memory killer) is replaced by a new one, to which the broker gives its
task again; a worker that exits on its own (at its start, on an error in the
settings) stops the server too.

``EXAMPLE_HOST`` and ``EXAMPLE_PORT`` say where the server listens (default
``127.0.0.1:5000``); ``EXAMPLE_WORKER_OPTIONS`` replaces the worker's
options (default ``--pool threads --concurrency 2``). See
:mod:`example_app` for the database and broker settings.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from contextlib import suppress

from kombu.utils.url import maybe_sanitize_url
from werkzeug.serving import make_server
from werkzeug.serving import WSGIRequestHandler

from . import create_app

WORKER_OPTIONS = "--pool threads --concurrency 2 --without-gossip --without-mingle"

#: GET requests not logged when they succeed: the page polls the first
#: twice a second, and the terminal is for the worker's log.
QUIET_PATHS = ("/api/analyses", "/favicon.ico")


class Signals:
    """Counts the stop signals: the first stops warmly, the second at once."""

    def __init__(self) -> None:
        self.count = 0
        self.received = threading.Event()

    def __call__(self, signum: int, frame: types.FrameType | None) -> None:
        self.count += 1
        self.received.set()


class RequestHandler(WSGIRequestHandler):
    """Werkzeug's, without the lines of the page's polling."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = getattr(self, "path", "").split("?")[0]
        succeeded = str(code).startswith(("2", "3"))
        if succeeded and self.command == "GET" and path.startswith(QUIET_PATHS):
            return
        super().log_request(code, size)


def main() -> int:
    host = os.environ.get("EXAMPLE_HOST", "127.0.0.1")
    port = int(os.environ.get("EXAMPLE_PORT", "5000"))
    if not _port_free(host, port):
        print(
            f"Port {port} on {host} is in use. Stop what uses it, or choose"
            f" another port: EXAMPLE_PORT={port + 1} make example",
            file=sys.stderr,
        )
        return 1

    app = create_app()  # creates the tables, before the worker starts
    server = make_server(host, port, app, threaded=True, request_handler=RequestHandler)
    signals = Signals()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signals)
    worker = start_worker()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(
        f"\n  The example runs at http://{host}:{port}/"
        f"\n  database: {maybe_sanitize_url(app.config['SQLALCHEMY_DATABASE_URI'])}"
        f"\n  broker:   {maybe_sanitize_url(app.config['CELERY_BROKER_URL'])}"
        "\n  Press Ctrl-C to stop the server and the worker.\n",
        flush=True,
    )
    while not signals.received.wait(0.2):
        if worker.poll() is None:
            continue
        _kill_group(worker.pid)  # what is left of a prefork pool
        if worker.returncode >= 0:  # it exited, rather than being killed
            server.shutdown()
            print(
                f"The worker stopped (exit code {worker.returncode}): stopping.",
                file=sys.stderr,
            )
            return 1
        print(
            f"\nThe worker was killed (signal {-worker.returncode}): starting"
            " another. The task it was running is retried once the broker"
            " gives it back; the page says when.\n",
            file=sys.stderr,
            flush=True,
        )
        worker = start_worker()
    server.shutdown()
    stop_worker(worker, signals)
    return 0


def start_worker() -> subprocess.Popen[bytes]:
    """Start ``flask --app example_app celery worker`` as a child process.

    It runs in a session of its own: a Ctrl-C in the terminal reaches the
    server alone, which stops the worker as it sees fit.
    """
    options = os.environ.get("EXAMPLE_WORKER_OPTIONS", WORKER_OPTIONS)
    command = [
        sys.executable, "-m", "flask", "--app", "example_app", "celery", "worker",
        "--loglevel", "INFO", "--hostname", "example@%h", *shlex.split(options),
    ]  # fmt: skip
    return subprocess.Popen(
        command, start_new_session=True, preexec_fn=_die_with_parent
    )


def stop_worker(worker: subprocess.Popen[bytes], signals: Signals) -> None:
    """Stop the worker warmly, its running tasks finishing first, or at once
    on the next signal; return when none of its processes is left."""
    if worker.poll() is None:
        print(
            "\nStopping: the worker finishes the task it runs, if any."
            " Press Ctrl-C again to stop it at once.",
            flush=True,
        )
        worker.terminate()  # Celery's warm shutdown
        killed = False
        while worker.poll() is None:
            if signals.count > 1 and not killed:
                _kill_group(worker.pid)
                killed = True
                print("\nStopped the worker at once.", flush=True)
            time.sleep(0.1)
    # Prefork's pool processes, if the worker left any: they die with their
    # group, and are gone once their new parent reaps them.
    _kill_group(worker.pid)
    deadline = time.monotonic() + 10
    while _group_alive(worker.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill_group(group: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _die_with_parent() -> None:
    # Linux: the worker gets SIGTERM if this process dies without stopping it.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
