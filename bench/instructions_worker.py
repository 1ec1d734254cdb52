"""Instructions per task of a real worker, end to end through Redis.

A worker of each variant, started as its users start it (solo pool), runs
under ``valgrind --tool=callgrind --dump-before=getloadavg`` and consumes a
queue filled before it starts: a mark task, ``N1`` no-op tasks, a mark, ``N2``
no-op tasks, a mark. Each mark task calls ``os.getloadavg()``, which makes
callgrind write the instructions counted since the previous mark; per task,
the worker costs the difference between the two counts divided by
``N2 - N1``: fetching, decoding, acknowledging and tracing the message, and
running the task.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "variants"))

import redis  # noqa: E402
from _common import MARK  # noqa: E402
from _common import NOOP  # noqa: E402
from celery import Celery  # noqa: E402


def command(variant: str, queue: str) -> list[str]:
    """How the variant's users start a worker, with ``python -m``."""
    if variant == "ctx":
        base = ["-m", "flask", "--app", "ctx:create_app", "celery"]
    else:
        base = ["-m", "celery", "-A", f"{variant}:celery_app"]
    return [
        sys.executable, *base, "worker",
        "--pool", "solo", "--queues", queue,
        "--hostname", f"{variant}-{uuid.uuid4().hex[:6]}@bench",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def worker_per_task(
    tool: str,
    variant: str,
    n1: int,
    n2: int,
    env: dict[str, str],
    directory: Path,
    redis_url: str,
    timeout: float = 900,
) -> float:
    """The instructions a worker of ``variant`` spends per no-op task."""
    queue = f"fccb-instr-{uuid.uuid4().hex[:8]}-{variant}"
    client = Celery("bench-client")
    client.config_from_object(
        {"broker_url": redis_url, "broker_connection_retry_on_startup": True}
    )
    with client.producer_or_acquire() as producer:
        for name, count in ((MARK, 1), (NOOP, n1), (MARK, 1), (NOOP, n2), (MARK, 1)):
            for _ in range(count):
                client.send_task(name, queue=queue, producer=producer)
    out = directory / f"worker-{variant}.cg"
    log = directory / f"worker-{variant}.log"
    settings = {"broker_url": redis_url, "redis_url": redis_url, "queue": queue}
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                tool,
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                "--dump-before=getloadavg",
                *command(variant, queue),
            ],
            cwd=BENCH / "variants",
            env={**env, "FCC_BENCH": json.dumps({**settings, **_db(env)})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout
            # Dumps .1 to .3: to the first mark, the N1 tasks, the N2 tasks.
            while not Path(f"{out}.3").exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"worker {variant} stopped or timed out:\n"
                        + log.read_text()[-3000:]
                    )
                time.sleep(0.5)
            time.sleep(1)  # the dump is being written
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            client.close()
            redis.Redis.from_url(redis_url).delete(queue, f"_kombu.binding.{queue}")
    counts = []
    for i in (2, 3):
        for line in Path(f"{out}.{i}").read_text().splitlines():
            if line.startswith("totals:"):
                counts.append(int(line.split()[1]))
    for path in directory.glob(f"{out.name}*"):
        path.unlink()
    log.unlink()
    return (counts[1] - counts[0]) / (n2 - n1)


def _db(env: dict[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in json.loads(env.get("FCC_BENCH", "{}")).items()
        if k == "database_url"
    }
