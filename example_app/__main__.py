"""Run the example: the web server, and a Celery worker as its child process.

``python -m example_app`` (what ``make example`` runs). The worker is
started as a deployment starts it, ``flask --app example_app celery worker``,
and stopped with the server: on Ctrl-C, on SIGTERM, or when the server fails.
If the worker stops on its own, the server stops too.

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
import types

from kombu.utils.url import maybe_sanitize_url

from . import create_app

WORKER_OPTIONS = "--pool threads --concurrency 2 --without-gossip --without-mingle"

#: Set once the server is asked to stop: Ctrl-C, SIGTERM, or the worker gone.
_stopping = threading.Event()


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
    worker = start_worker()
    worker_stopped = threading.Event()
    signal.signal(signal.SIGINT, _exit)
    signal.signal(signal.SIGTERM, _exit)
    threading.Thread(target=_watch, args=(worker, worker_stopped), daemon=True).start()

    print(
        f"\n  The example runs at http://{host}:{port}/"
        f"\n  database: {maybe_sanitize_url(app.config['SQLALCHEMY_DATABASE_URI'])}"
        f"\n  broker:   {maybe_sanitize_url(app.config['CELERY_BROKER_URL'])}"
        "\n  Press Ctrl-C to stop the server and the worker.\n",
        flush=True,
    )
    try:
        app.run(host=host, port=port, use_reloader=False)
    except KeyboardInterrupt:
        pass
    finally:
        _stopping.set()
        stop_worker(worker)
    return 1 if worker_stopped.is_set() else 0


def start_worker() -> subprocess.Popen[bytes]:
    """Start ``flask --app example_app celery worker`` as a child process."""
    options = os.environ.get("EXAMPLE_WORKER_OPTIONS", WORKER_OPTIONS)
    command = [
        sys.executable, "-m", "flask", "--app", "example_app", "celery", "worker",
        "--loglevel", "INFO", "--hostname", "example@%h", *shlex.split(options),
    ]  # fmt: skip
    return subprocess.Popen(command, preexec_fn=_die_with_parent)


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Stop the worker warmly: the running tasks finish first."""
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _watch(worker: subprocess.Popen[bytes], stopped: threading.Event) -> None:
    code = worker.wait()
    # Ctrl-C reaches the worker too, which may exit before the server knows.
    if not _stopping.wait(1):
        stopped.set()
        print(f"The worker stopped (exit code {code}): stopping.", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)


def _exit(signum: int, frame: types.FrameType | None) -> None:
    _stopping.set()
    raise KeyboardInterrupt  # stops the server, then the worker


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
