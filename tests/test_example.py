"""The example application, started as the README says: ``make example``.

A text is submitted over HTTP and its analysis watched until it is done, by
the worker the example runs as its child process; then the example is
stopped, with Ctrl-C as a person stops it or with SIGTERM, and nothing of it
may be left running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing as t
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import RABBITMQ_URL
from conftest import REDIS_URL
from conftest import require
from conftest import TESTS

ROOT = TESTS.parent
TEXT = "One fish. Two fish! Red fish, blue fish? " * 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command() -> list[str]:
    """``make example`` when this runs in the environment that ``make``
    creates; the command it runs otherwise, as under tox."""
    if Path(sys.prefix).resolve() == (ROOT / ".venv").resolve() and shutil.which(
        "make"
    ):
        return ["make", "--no-print-directory", "example"]
    return [sys.executable, "-m", "example_app"]


class Example:
    """The example, in a session of its own so that all its processes can be
    found, as a terminal's Ctrl-C finds them."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "example.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command(),
            cwd=ROOT,
            env={
                **os.environ,
                "EXAMPLE_PORT": str(self.port),
                "EXAMPLE_INSTANCE_PATH": str(tmp / "instance"),
                "EXAMPLE_STEP_SECONDS": "0.1",
                "FLASK_CELERY_TASK_DEFAULT_QUEUE": f"example-{uuid.uuid4().hex[:8]}",
                **env,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.group = self.process.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, path: str, data: dict[str, t.Any] | None = None) -> t.Any:
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(
            self.url + path, body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def wait_up(self, timeout: float = 120) -> None:
        """Wait until the page is served and the worker is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"the example exited with {self.process.returncode}:\n{self.log}"
                )
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2):
                    pass
                if " ready." in self.log:
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"the example did not start in {timeout}s:\n{self.log}")

    def running(self) -> bool:
        """Whether any process of the example is left."""
        self.process.poll()  # reap it once it exits: a zombie is still found
        try:
            os.killpg(self.group, 0)
        except ProcessLookupError:
            return False
        return True

    def wait_gone(self, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                return True
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        if self.running():
            os.killpg(self.group, signal.SIGKILL)
        self.process.wait()
        self._log.close()


@pytest.fixture
def example(
    request: pytest.FixtureRequest, tmp_path: Path
) -> t.Iterator[t.Callable[[dict[str, str]], Example]]:
    started: list[Example] = []

    def start(env: dict[str, str]) -> Example:
        example = Example(tmp_path, env)
        started.append(example)
        example.wait_up()
        return example

    yield start
    for example in started:
        example.kill()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def analyse(example: Example) -> list[dict[str, t.Any]]:
    """Submit a text and poll its analysis until it is finished."""
    created = example.request("/api/analyses", {"text": TEXT})
    assert created["status"] == "queued"
    seen = [created]
    deadline = time.monotonic() + 60
    while seen[-1]["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, f"{seen[-1]}\n{example.log}"
        time.sleep(0.05)
        seen.append(example.request(f"/api/analyses/{created['id']}"))
    return seen


def test_make_example_runs_and_stops_with_ctrl_c(example: t.Any) -> None:
    running = example({})
    seen = analyse(running)
    done = seen[-1]
    assert done["status"] == "done", running.log
    assert done["result"]["words"] == 160
    assert done["result"]["top_words"][0] == ["fish", 80]
    # The page saw the progress between the two ends, as it was committed.
    assert any(0 < s["progress"] < 100 for s in seen if s["status"] == "running")
    # The task commits "done" before it returns; Celery logs it a moment later.
    succeeded = f"Task example_app.tasks.analyse[{done['task_id']}] succeeded"
    deadline = time.monotonic() + 10
    while succeeded not in running.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert succeeded in running.log
    # Ctrl-C in the terminal: SIGINT to every process of the foreground group.
    os.killpg(running.group, signal.SIGINT)
    assert running.wait_gone(), running.log
    # The server stopped the worker, and knew it: no "the worker stopped".
    assert "The worker stopped" not in running.log


@pytest.mark.parametrize(
    ("broker", "pool"), [("redis", "prefork"), ("rabbitmq", "gevent")]
)
def test_example_on_postgres_stops_its_worker_on_sigterm(
    example: t.Any, broker: str, pool: str, postgres_url: str
) -> None:
    if broker == "redis":
        require("Redis", REDIS_URL, 6379)
        url = REDIS_URL
    else:
        require("RabbitMQ", RABBITMQ_URL, 5672)
        url = RABBITMQ_URL
    running = example(
        {
            "EXAMPLE_DATABASE_URL": postgres_url,
            "EXAMPLE_BROKER_URL": url,
            "EXAMPLE_WORKER_OPTIONS": f"--pool {pool} --concurrency 2",
        }
    )
    assert analyse(running)[-1]["status"] == "done", running.log
    # SIGTERM to the server alone, as a process manager sends it.
    server = running.process.pid
    if command()[0] == "make":
        [server] = children(server)
    os.kill(server, signal.SIGTERM)
    assert running.wait_gone(), running.log
    assert running.process.returncode == 0, running.log


def test_example_finishes_the_task_of_a_killed_worker(example: t.Any) -> None:
    """The worker is killed mid-task, which stops the example; started again,
    the example's new worker runs the task again and finishes it."""
    queue = {"FLASK_CELERY_TASK_DEFAULT_QUEUE": f"example-{uuid.uuid4().hex[:8]}"}
    first = example({**queue, "EXAMPLE_STEP_SECONDS": "1"})
    created = first.request("/api/analyses", {"text": TEXT})
    deadline = time.monotonic() + 60
    while first.request(f"/api/analyses/{created['id']}")["progress"] == 0:
        assert time.monotonic() < deadline, first.log
        time.sleep(0.1)
    server = first.process.pid
    if command()[0] == "make":
        [server] = children(server)
    [worker] = children(server)
    os.kill(worker, signal.SIGKILL)
    if not first.wait_gone():  # the server stops with its worker
        first.kill()
    first_log = first.log
    assert f"[{created['task_id']}] succeeded" not in first_log

    second = example(queue)
    deadline = time.monotonic() + 120
    seen = second.request(f"/api/analyses/{created['id']}")
    while seen["status"] != "done":
        assert seen["status"] != "failed", second.log
        assert time.monotonic() < deadline, f"{seen}\n{second.log}"
        time.sleep(0.2)
        seen = second.request(f"/api/analyses/{created['id']}")
    assert seen["result"]["words"] == 160
    # Run again once, from the start, by the new worker.
    succeeded = f"Task example_app.tasks.analyse[{created['task_id']}] succeeded"
    deadline = time.monotonic() + 10
    while succeeded not in second.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.log.count(f"[{created['task_id']}] received") == 1
    assert second.log.count(succeeded) == 1
