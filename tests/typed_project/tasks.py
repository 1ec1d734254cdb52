"""A user's typed project, checked with ``mypy --strict`` by test_typing.py:
the line under each ``# error:`` comment must give exactly that error, and
no other line any. Not imported by the tests."""

from __future__ import annotations

import typing as t

from celery import Task
from celery.result import AsyncResult

from flask_celery_ctx import ContextTask
from flask_celery_ctx import FlaskCelery

ext = FlaskCelery()


@ext.celery.task
def add(x: int, y: int) -> int:
    return x + y


@ext.celery.task(bind=True, max_retries=3)
def retried(self: ContextTask, name: str, *, times: int = 1) -> list[str]:
    if self.request.retries < times:
        raise self.retry(countdown=1)
    return [name] * times


@ext.celery.task(bind=True)
def plain_self(self: Task[t.Any, t.Any], n: int) -> str:
    return str(n)


@ext.celery.task
async def fetch(n: int) -> str:
    return str(n)


@ext.celery.task(bind=True, acks_late=True)
async def bound_fetch(self: ContextTask, n: int) -> bytes:
    return bytes(n)


class Hooked(ContextTask):
    def on_success(
        self, retval: t.Any, task_id: str, args: t.Any, kwargs: t.Any
    ) -> None:
        pass


@ext.celery.task(base=Hooked)
def hooked(n: int) -> int:
    return n


sent: AsyncResult[int] = add.delay(1, 2)
total: int = add.delay(1, 2).get()
committed: AsyncResult[int] = add.delay_on_commit(1, 2)
called: int = add(1, 2)
names: list[str] = retried.delay("a", times=2).get()
fetched: AsyncResult[str] = fetch.delay(1)
got: bytes = bound_fetch.delay(1).get()
hooked.delay("anything")  # the base class decides: no types from the function

# error: Argument 2 to "delay" of "Task" has incompatible type "str"; expected "int"  [arg-type]
add.delay(1, "x")
# error: Missing positional argument "y" in call to "delay_on_commit" of "ContextTask"  [call-arg]
add.delay_on_commit(1)
# error: Missing positional argument "y" in call to "__call__" of "ContextTask"  [call-arg]
add(1)
# error: Incompatible types in assignment (expression has type "AsyncResult[int]", variable has type "AsyncResult[str]")  [assignment]
wrong: AsyncResult[str] = add.delay(1, 2)
# error: Argument 1 to "delay" of "Task" has incompatible type "int"; expected "str"  [arg-type]
retried.delay(1)
# error: Argument "times" to "delay_on_commit" of "ContextTask" has incompatible type "str"; expected "int"  [arg-type]
retried.delay_on_commit("a", times="2")
# error: Too many arguments for "delay" of "Task"  [call-arg]
plain_self.delay(1, 2)
# error: Argument 1 to "delay" of "Task" has incompatible type "str"; expected "int"  [arg-type]
fetch.delay("1")
# error: Incompatible types in assignment (expression has type "bytes", variable has type "str")  [assignment]
fetched_bytes: str = bound_fetch.delay(1).get()
