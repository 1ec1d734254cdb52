"""The example application, started as the README says: ``make example``.

A text is submitted over HTTP and its analysis watched until it is done, by
the worker the example runs as its child process; then the example is
stopped, with Ctrl-C as a person stops it or with SIGTERM, and nothing of it
may be left running.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import typing as t
import urllib.error
import urllib.request
import uuid
from contextlib import closing
from contextlib import suppress
from pathlib import Path

import pytest

from conftest import CI
from conftest import RABBITMQ_URL
from conftest import REDIS_URL
from conftest import require
from conftest import RUN
from conftest import TESTS

ROOT = TESTS.parent
TEXT = "One fish. Two fish! Red fish, blue fish? " * 20
#: What the example must never print, whatever stops it.
UNCLEAN = ("Traceback", "Unrecoverable error", "make: ***", "KeyboardInterrupt")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_example() -> list[str]:
    """``make example`` when this runs in the environment that ``make``
    creates; the command it runs otherwise, as under tox."""
    if Path(sys.prefix).resolve() == (ROOT / ".venv").resolve() and shutil.which(
        "make"
    ):
        return ["make", "--no-print-directory", "example"]
    return [sys.executable, "-m", "example_app"]


def descendants(pid: int) -> set[int]:
    """The processes started by ``pid``, and by them, that are running."""
    found: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with suppress(OSError):
            for child in map(int, path.read_text().split()):
                found |= {child, *descendants(child)}
    return found


def children(pid: int) -> list[int]:
    """The processes that ``pid`` started and that are running."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie, dead and not reaped yet, does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Example:
    """The example, in a session of its own as a terminal runs it: a Ctrl-C
    sends SIGINT to its process group, the foreground one. The worker runs in
    a session of its own, and is found as the server's child."""

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str],
        command: list[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.instance = tmp / "instance"
        self.log_path = tmp / f"example-{len(list(tmp.glob('example-*.log')))}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command or make_example(),
            cwd=ROOT,
            env={
                **os.environ,
                "EXAMPLE_PORT": str(self.port),
                "EXAMPLE_INSTANCE_PATH": str(self.instance),
                "EXAMPLE_STEP_SECONDS": "0.1",
                "FLASK_CELERY_TASK_DEFAULT_QUEUE": f"example-{uuid.uuid4().hex[:8]}",
                **env,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.group = self.process.pid
        #: Every process of the example, once it is up.
        self.pids: set[int] = set()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, path: str, data: dict[str, t.Any] | None = None) -> t.Any:
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(
            self.url + path, body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            content = response.read()
            if response.headers.get_content_type() == "application/json":
                return json.loads(content)
            return content.decode()

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
                    self.pids = {self.process.pid, *descendants(self.process.pid)}
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"the example did not start in {timeout}s:\n{self.log}")

    def ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: SIGINT to the foreground group."""
        os.killpg(self.group, signal.SIGINT)

    def running(self) -> list[int]:
        """The processes of the example that are left."""
        self.process.poll()  # reap it once it exits: a zombie is still found
        return sorted(pid for pid in self.pids if alive(pid))

    def wait_exit(self, timeout: float = 60) -> str:
        """Wait for the command to exit, as the shell waits for it before it
        shows its prompt again; return what the example printed by then."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the example did not stop in {timeout}s:\n{self.log}")
        return self.log

    def wait_gone(self, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                return True
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        for pid in {self.process.pid, *self.pids, *descendants(self.process.pid)}:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()


@pytest.fixture
def example(
    request: pytest.FixtureRequest, tmp_path: Path
) -> t.Iterator[t.Callable[..., Example]]:
    started: list[Example] = []

    def start(
        env: dict[str, str], command: list[str] | None = None, port: int | None = None
    ) -> Example:
        example = Example(tmp_path, env, command, port)
        started.append(example)
        example.wait_up()
        return example

    yield start
    for example in started:
        example.kill()


def submit(example: Example) -> dict[str, t.Any]:
    created: dict[str, t.Any] = example.request("/api/analyses", {"text": TEXT})
    # As it is when the response is written, after the commit: a worker may
    # have started it by then.
    assert created["status"] in ("queued", "running", "done")
    return created


def wait_status(
    example: Example, id: int, statuses: t.Container[str], timeout: float = 60
) -> list[dict[str, t.Any]]:
    """Poll an analysis until its status is one of ``statuses``; return what
    was seen."""
    seen = [example.request(f"/api/analyses/{id}")]
    deadline = time.monotonic() + timeout
    while seen[-1]["status"] not in statuses:
        assert time.monotonic() < deadline, f"{seen[-1]}\n{example.log}"
        time.sleep(0.05)
        seen.append(example.request(f"/api/analyses/{id}"))
    return seen


def analyse(example: Example) -> list[dict[str, t.Any]]:
    """Submit a text and poll its analysis until it is finished."""
    created = submit(example)
    return [created, *wait_status(example, created["id"], ("done", "failed"))]


def status_in_database(example: Example, id: int) -> str:
    """An analysis's status, read from the example's SQLite database once
    the example has stopped."""
    with closing(sqlite3.connect(example.instance / "example.sqlite")) as db:
        [(status,)] = db.execute("SELECT status FROM analysis WHERE id = ?", (id,))
    return str(status)


def assert_stopped_cleanly(example: Example, printed: str) -> None:
    """Nothing of the example is left when its command has exited, nothing
    is printed after, and it printed no traceback."""
    assert example.running() == [], printed
    time.sleep(2)
    assert example.log == printed
    for unclean in UNCLEAN:
        assert unclean not in printed


def test_make_example_runs_and_stops_with_ctrl_c(example: t.Any) -> None:
    running = example({"EXAMPLE_STEP_SECONDS": "0.2"})
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

    # Ctrl-C while a task runs: the server stops at once, and says that the
    # worker finishes the task first, which it does.
    second = submit(running)
    wait_status(running, second["id"], ("running",))
    running.ctrl_c()
    printed = running.wait_exit()
    assert_stopped_cleanly(running, printed)
    stopping = printed.index("Stopping: the worker finishes the task it runs")
    assert printed.index(f"analyse[{second['task_id']}] succeeded") > stopping
    assert status_in_database(running, second["id"]) == "done"
    # The server stopped the worker, and knew it: no "the worker stopped".
    assert "The worker stopped" not in printed
    with pytest.raises(urllib.error.URLError):
        running.request("/api/analyses")
    if make_example()[0] == "make":
        # Its environment has the package, and none of the development tools.
        listed = subprocess.run(
            [ROOT / ".venv-example/bin/python", "-m", "pip", "list", "--format=json"],
            capture_output=True,
            check=True,
        )
        installed = {p["name"].lower() for p in json.loads(listed.stdout)}
        assert "flask-celery-ctx" in installed
        assert not installed & {"mypy", "ruff", "sphinx", "tox", "gevent", "pytest"}


def test_a_second_ctrl_c_stops_at_once(example: t.Any) -> None:
    # A task that would take 100 seconds.
    running = example({"EXAMPLE_STEP_SECONDS": "5"})
    created = submit(running)
    wait_status(running, created["id"], ("running",))
    running.ctrl_c()
    deadline = time.monotonic() + 30
    while "Press Ctrl-C again" not in running.log:
        assert time.monotonic() < deadline, running.log
        time.sleep(0.05)
    running.ctrl_c()
    printed = running.wait_exit(timeout=20)
    assert_stopped_cleanly(running, printed)
    assert "Stopped the worker at once." in printed
    assert "succeeded" not in printed.split("Press Ctrl-C again")[1]
    assert status_in_database(running, created["id"]) == "running"


def test_the_terminal_shows_no_polling(example: t.Any) -> None:
    running = example({}, [sys.executable, "-m", "example_app"])
    analyse(running)
    for _ in range(5):
        running.request("/api/analyses")
    running.request("/favicon.ico")
    with pytest.raises(urllib.error.HTTPError):
        running.request("/api/analyses", {"text": ""})
    running.request("/")
    log = re.sub("\x1b\\[[0-9;]*m", "", running.log)  # Werkzeug's colours
    assert '"GET /api/analyses' not in log
    assert "favicon" not in log
    # What matters is still shown: submissions, refusals, page loads.
    assert '"POST /api/analyses HTTP/1.1" 201' in log
    assert '"POST /api/analyses HTTP/1.1" 400' in log
    assert '"GET / HTTP/1.1" 200' in log


#: jsdom, installed with npm where the tests run, the first time.
JSDOM = "jsdom@26.1.0"
NODE_MODULES = ROOT / ".node" / "node_modules"


def require_jsdom() -> None:
    """Install jsdom if needed; skip, or under ``CI=true`` fail, without
    Node.js and npm."""
    # Written once the install is whole: a test run beside this one may be
    # installing it.
    installed = NODE_MODULES.parent / f".{JSDOM}.installed"
    if installed.exists():
        return
    if not (shutil.which("node") and shutil.which("npm")):
        message = "Node.js and npm are not installed"
        if CI:
            pytest.fail(f"{message} (CI=true: every tool must be there)")
        pytest.skip(f"needs Node.js: {message}")
    # One install at a time: test runs side by side share the checkout.
    NODE_MODULES.parent.mkdir(exist_ok=True)
    with (NODE_MODULES.parent / ".install-lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed.exists():
            return
        # A registry request that stalls is tried again after 30 s, not 5 min.
        subprocess.run(
            ["npm", "install", "--prefix", str(NODE_MODULES.parent), "--no-audit",
             "--no-fund", "--silent", "--fetch-timeout=30000", "--fetch-retries=4",
             JSDOM],
            check=True,
        )  # fmt: skip
        installed.touch()


class Page:
    """The page in a browser: jsdom runs its script, on Node.js, against
    the server (see ``page.js``); what it shows is read as it changes."""

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            ["node", str(TESTS / "page.js"), url],
            env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
            stdout=subprocess.PIPE,
            text=True,
        )
        self.shown: dict[str, t.Any] = {}

    def wait_for(
        self, check: t.Callable[[dict[str, t.Any]], bool], timeout: float = 60
    ) -> dict[str, t.Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                pytest.fail(f"the page's script exited: {self.process.wait()}")
            self.shown = json.loads(line)
            if check(self.shown):
                return self.shown
        pytest.fail(f"the page did not show it in {timeout}s: {self.shown}")

    def close(self) -> None:
        self.process.kill()
        self.process.communicate()


def test_the_page_says_when_the_server_is_gone_and_recovers(example: t.Any) -> None:
    require_jsdom()
    command = [sys.executable, "-m", "example_app"]
    running = example({}, command)
    first = analyse(running)[-1]
    page = Page(running.url + "/")
    try:
        page.wait_for(lambda shown: shown["statuses"] == ["done"])
        assert page.shown["offline"] is None

        running.process.terminate()
        running.wait_exit()
        shown = page.wait_for(lambda shown: shown["offline"] is not None)
        assert shown["offline"].startswith(
            "Cannot reach the server: is the example still running?"
        )
        # What it showed stays, said to be possibly out of date.
        assert "may be out of date" in shown["offline"]
        assert shown["statuses"] == ["done"]

        again = example({}, command, running.port)
        page.wait_for(lambda shown: shown["offline"] is None)
        second = submit(again)
        page.wait_for(lambda shown: shown["statuses"] == ["done", "done"])
        assert [second["id"], first["id"]] == [
            a["id"] for a in again.request("/api/analyses")["analyses"]
        ]
    finally:
        page.close()


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
            # A queue and a node name of this run's: other test runs may
            # share the broker (RabbitMQ refuses a second pidbox queue of a
            # node name that another worker holds).
            "FLASK_CELERY_TASK_DEFAULT_QUEUE": f"fcc-{RUN}-example",
            "EXAMPLE_WORKER_OPTIONS": f"--pool {pool} --concurrency 2"
            f" --hostname fcc-{RUN}@%h",
        },
        # The development environment's: it has gevent.
        [sys.executable, "-m", "example_app"],
    )
    assert analyse(running)[-1]["status"] == "done", running.log
    # SIGTERM to the server alone, as a process manager sends it.
    running.process.terminate()
    printed = running.wait_exit()
    assert_stopped_cleanly(running, printed)
    assert running.process.returncode == 0, printed


def test_example_finishes_the_task_of_a_killed_worker(example: t.Any) -> None:
    """The worker is killed mid-task: the example starts another, the page
    says that the task will be retried and when, and the new worker runs the
    task again, from the start, once the broker's lease on it ends."""
    require_jsdom()
    running = example({"EXAMPLE_STEP_SECONDS": "1"})
    created = running.request("/api/analyses", {"text": TEXT})
    deadline = time.monotonic() + 60
    while running.request(f"/api/analyses/{created['id']}")["progress"] == 0:
        assert time.monotonic() < deadline, running.log
        time.sleep(0.1)
    server = running.process.pid
    if make_example()[0] == "make":
        [server] = children(server)
    [worker] = children(server)
    page = Page(running.url + "/")
    try:
        page.wait_for(lambda shown: shown["statuses"][0].startswith("running"))
        os.kill(worker, signal.SIGKILL)

        notice = "It will be retried from the start by a worker in about "
        shown = page.wait_for(
            lambda shown: any(notice in d for d in shown["details"]), timeout=20
        )
        assert shown["statuses"][0].startswith("running")
        assert "No progress for " in shown["details"][0]
        assert "when the broker's lease on it ends (30 s after" in shown["details"][0]
        assert running.process.poll() is None, running.log
        [new_worker] = children(server)
        assert new_worker != worker
        assert "The worker was killed (signal 9): starting another." in running.log

        page.wait_for(lambda shown: shown["statuses"] == ["done"], timeout=90)
        assert not any(notice in d for d in page.shown["details"])
    finally:
        page.close()
    seen = running.request(f"/api/analyses/{created['id']}")
    assert seen["result"]["words"] == 160
    assert seen["notice"] is None
    # Run again once, from the start, by the new worker.
    succeeded = f"Task example_app.tasks.analyse[{created['task_id']}] succeeded"
    deadline = time.monotonic() + 10
    while succeeded not in running.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running.log.count(f"[{created['task_id']}] received") == 2
    assert running.log.count(succeeded) == 1
