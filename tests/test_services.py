"""A test that needs a missing service skips, naming it, or fails under CI."""

from __future__ import annotations

import pytest

import conftest


def test_missing_service_skips_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "CI", False)
    with pytest.raises(
        pytest.skip.Exception, match="needs Redis: Redis is not reachable"
    ):
        conftest.require("Redis", "redis://127.0.0.1:9/0", 6379)


def test_missing_service_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI=true: every service must run"):
        conftest.require("Redis", "redis://127.0.0.1:9/0", 6379)


def test_running_service_is_used() -> None:
    conftest.require("PostgreSQL", conftest.POSTGRES_URL, 5432)
