"""Celery's settings come from the Flask config, strictly."""

from __future__ import annotations

import typing as t

import pytest
from flask import Flask

from flask_celery_ctx import FlaskCelery


def configured(config: dict[str, t.Any], **options: t.Any) -> t.Any:
    app = Flask(__name__)
    app.config.update(config)
    ext = FlaskCelery(app, **options)
    return ext.celery.conf


def test_prefixed_keys() -> None:
    conf = configured(
        {"CELERY_BROKER_URL": "redis://h/1", "CELERY_TASK_ALWAYS_EAGER": True}
    )
    assert conf.broker_url == "redis://h/1"
    assert conf.task_always_eager is True


def test_celery_dict() -> None:
    conf = configured(
        {"CELERY": {"broker_url": "redis://h/2", "task_ignore_result": True}}
    )
    assert conf.broker_url == "redis://h/2"
    assert conf.task_ignore_result is True


def test_both_forms_mixed() -> None:
    conf = configured(
        {
            "CELERY": {"broker_url": "redis://h/3"},
            "CELERY_RESULT_BACKEND": "redis://h/4",
        }
    )
    assert (conf.broker_url, conf.result_backend) == ("redis://h/3", "redis://h/4")


def test_one_setting_both_ways_is_an_error() -> None:
    with pytest.raises(
        ValueError, match=r"'broker_url' is given twice.*CELERY_BROKER_URL"
    ) as raised:
        configured({"CELERY": {"broker_url": "a"}, "CELERY_BROKER_URL": "b"})
    # An app with a CELERY dict that reads the environment: the way to
    # override one of its keys.
    assert "FLASK_CELERY__broker_url into CELERY['broker_url']" in str(raised.value)
    assert "FLASK_CELERY_BROKER_URL into CELERY_BROKER_URL" in str(raised.value)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("CELERY_ALWAYS_EAGER", "Celery 3 setting name.*Use CELERY_TASK_ALWAYS_EAGER"),
        ("CELERYD_CONCURRENCY", "Celery 3 setting name.*Use CELERY_WORKER_CONCURRENCY"),
        ("BROKER_URL", "Celery 3 setting name.*Use CELERY_BROKER_URL"),
        ("CELERY_BROKR_URL", "not a Celery setting. Did you mean CELERY_BROKER_URL"),
        ("CELERY_TASK_ALWAYS_EGER", "Did you mean CELERY_TASK_ALWAYS_EAGER"),
        ("CELERY_NOTHING_LIKE_IT", "not a Celery setting.*configuration.html"),
    ],
)
def test_unknown_prefixed_key(key: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        configured({key: True})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("always_eager", "Did you mean 'task_always_eager'"),
        ("CELERY_ALWAYS_EAGER", "Celery 3 name: use 'task_always_eager'"),
        ("BROKER_URL", "Celery 3 name: use 'broker_url'"),
    ],
)
def test_unknown_name_in_celery_dict(name: str, message: str) -> None:
    with pytest.raises(
        ValueError, match=rf"CELERY\['{name}'\] is not a Celery setting.*{message}"
    ):
        configured({"CELERY": {name: True}})


@pytest.mark.parametrize(
    "key", ["CELERY_RESULT_BACKEND", "CELERY_TASK_SERIALIZER", "CELERY_TIMEZONE"]
)
def test_celery3_names_that_are_also_prefixed_names(key: str) -> None:
    """Some Celery 3 names read the same as a prefixed new name."""
    conf = configured({key: "json" if "SERIALIZER" in key else "UTC"})
    assert conf[key.removeprefix("CELERY_").lower()] in ("json", "UTC")


def test_celery_not_a_dict() -> None:
    with pytest.raises(ValueError, match="CELERY must be a dict"):
        configured({"CELERY": "redis://"})


def test_nothing_else_of_the_flask_config_reaches_celery() -> None:
    conf = configured(
        {
            "SECRET_KEY": "s3cret",
            "SQLALCHEMY_DATABASE_URI": "postgresql://u:pw@db/x",
            "CELERY_BROKER_URL": "redis://h/5",
        }
    )
    text = repr(dict(conf))
    assert "s3cret" not in text
    assert "pw@db" not in text
    assert "SECRET_KEY" not in conf
    assert "secret_key" not in conf


def test_json_only_by_default() -> None:
    conf = configured({})
    assert conf.accept_content == ["json"]
    assert conf.result_accept_content == ["json"]
    assert (conf.task_serializer, conf.result_serializer) == ("json", "json")


def test_defaults_can_be_overridden() -> None:
    conf = configured({"CELERY_ACCEPT_CONTENT": ["json", "msgpack"]})
    assert conf.accept_content == ["json", "msgpack"]


def test_extra_settings_of_plugins() -> None:
    conf = configured({"CELERY": {"ONCE": {"backend": "x"}}}, extra_settings=["ONCE"])
    assert conf.ONCE == {"backend": "x"}
    conf = configured({"CELERY_ONCE": {"backend": "y"}}, extra_settings=["ONCE"])
    assert conf.ONCE == {"backend": "y"}
    with pytest.raises(ValueError, match="not a Celery setting"):
        configured({"CELERY_ONCE": {}})


@pytest.mark.parametrize(
    "variable",
    [
        "CELERY_BROKER_URL",
        "CELERY_BROKER_READ_URL",
        "CELERY_BROKER_WRITE_URL",
        "CELERY_RESULT_BACKEND",
    ],
)
def test_environment_cannot_override_the_config(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """Celery reads these variables before its config, in every process that
    has them: the app would send to one broker and the worker read another."""
    monkeypatch.setenv(variable, "redis://someone:s3cret@elsewhere/1")
    with pytest.raises(ValueError) as info:
        configured({variable: "redis://h/1"})
    message = str(info.value)
    assert f"The environment variable {variable} sets" in message
    assert "'redis://someone:**@elsewhere/1'" in message
    assert "says 'redis://h/1'" in message
    assert "s3cret" not in message
    assert f"Unset the environment variable {variable}" in message
    with pytest.raises(ValueError, match="says nothing"):
        configured({})


@pytest.mark.parametrize(
    "variable", ["CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL"]
)
def test_read_and_write_brokers_default_to_the_broker(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """Celery takes them from broker_url when the config names none."""
    monkeypatch.setenv(variable, "redis://h/1")
    conf = configured({"CELERY_BROKER_URL": "redis://h/1"})
    assert (conf.broker_read_url, conf.broker_write_url) == ("redis://h/1",) * 2
    with pytest.raises(ValueError) as info:
        configured({"CELERY_BROKER_URL": "redis://h/2"})
    assert "says nothing, so Celery uses its broker_url, 'redis://h/2'" in str(
        info.value
    )


def test_environment_may_repeat_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://h/1")
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "")  # Celery ignores it too
    conf = configured({"CELERY": {"broker_url": "redis://h/1"}})
    assert conf.broker_url == "redis://h/1"
