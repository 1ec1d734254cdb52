"""Celery's settings come from the Flask config, strictly."""

from __future__ import annotations

import inspect
import re
import typing as t

import pytest
from celery.app import utils as celery_utils
from celery.app.defaults import _TO_NEW_KEY  # type: ignore[attr-defined]
from celery.app.defaults import SETTING_KEYS
from flask import Flask

from flask_celery_ctx import FlaskCelery
from flask_celery_ctx.config import ENVIRONMENT_OVERRIDES


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
        ("CELERY_ALWAYS_EAGER", "Celery 3.*Did you mean CELERY_TASK_ALWAYS_EAGER"),
        ("CELERYD_CONCURRENCY", "Celery 3.*Did you mean CELERY_WORKER_CONCURRENCY"),
        ("BROKER_URL", "Celery 3 setting name.*Did you mean CELERY_BROKER_URL"),
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
        ("always_eager", "did you mean 'task_always_eager'"),
        ("CELERY_ALWAYS_EAGER", "Celery 3 name.*did you mean 'task_always_eager'"),
        ("BROKER_URL", "Celery 3 name BROKER_URL: did you mean 'broker_url'"),
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


def test_every_variable_celery_reads_before_its_config_is_checked() -> None:
    """The variables that Celery's settings read before the config, in the
    installed Celery: a new one in a later Celery fails here first."""
    source = inspect.getsource(celery_utils.Settings)
    read = set(re.findall(r"os\.environ\.get\(\s*['\"](\w+)['\"]", source))
    assert read == set(ENVIRONMENT_OVERRIDES.values())


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


# Every Celery 3 name that today's Celery does not read under any spelling.
OLD_NAMES = sorted(old for old in _TO_NEW_KEY if old.lower() not in SETTING_KEYS)
# As Flask config keys: the ones meant for Celery by their prefix.
OLD_KEYS = [
    old
    for old in OLD_NAMES
    if old.startswith(("CELERY", "BROKER_"))
    and old.removeprefix("CELERY_").lower() not in SETTING_KEYS
]
# Lower-cased in the CELERY dict, with or without their Celery 3 prefix.
OLD_IN_DICT = sorted(
    {(old.lower(), old) for old in OLD_NAMES}
    | {
        (old.split("_", 1)[1].lower(), old)
        for old in OLD_NAMES
        if old.startswith("CELERY") and old.split("_", 1)[1].lower() not in SETTING_KEYS
    }
)


@pytest.mark.parametrize("old", OLD_KEYS)
def test_every_celery3_key_names_its_new_name(old: str) -> None:
    new = _TO_NEW_KEY[old]
    with pytest.raises(ValueError) as info:
        configured({old: 1})
    assert f"{old} is a Celery 3 setting name" in str(info.value)
    assert f"Did you mean CELERY_{new.upper()} (or CELERY[{new!r}])?" in str(info.value)


@pytest.mark.parametrize(("name", "old"), OLD_IN_DICT)
def test_every_celery3_name_in_the_dict_names_its_new_name(name: str, old: str) -> None:
    with pytest.raises(ValueError) as info:
        configured({"CELERY": {name: 1}})
    message = str(info.value)
    assert f"CELERY[{name!r}] is not a Celery setting." in message
    # Some bare names were used by two prefixes: CELERYD_ and CELERY_.
    new = message.partition("did you mean ")[2].rstrip("?")
    assert new.strip("'") in SETTING_KEYS
    if name == old.lower():
        assert f"It is the Celery 3 name {old}: did you mean {_TO_NEW_KEY[old]!r}?" in (
            message
        )


@pytest.mark.parametrize(
    ("key", "old", "new"),
    [
        ("CELERY_CONCURRENCY", "CELERYD_CONCURRENCY", "WORKER_CONCURRENCY"),
        ("CELERY_MAX_TASKS_PER_CHILD", "CELERYD_MAX_TASKS_PER_CHILD",
         "WORKER_MAX_TASKS_PER_CHILD"),
        ("CELERY_SCHEDULE", "CELERYBEAT_SCHEDULE", "BEAT_SCHEDULE"),
    ],
)  # fmt: skip
def test_celery3_names_under_the_celery_prefix(key: str, old: str, new: str) -> None:
    """``CELERYD_CONCURRENCY`` turned into a ``CELERY_`` key."""
    with pytest.raises(
        ValueError,
        match=rf"{key} is not a Celery setting but the Celery 3 name {old}.*"
        rf"Did you mean CELERY_{new}",
    ):
        configured({key: 1})


@pytest.mark.parametrize(
    ("config", "extension", "spelling"),
    [
        ({"CELERY_REDBEAT_REDIS_URL": "redis://"}, "celery-redbeat", "redbeat_redis_url"),
        ({"CELERY": {"redbeat_key_prefix": "x"}}, "celery-redbeat", "redbeat_key_prefix"),
        ({"CELERY_BEAT_DBURI": "sqlite://"}, "sqlalchemy-celery-beat", "beat_dburi"),
        ({"CELERY": {"beat_schema": "x"}}, "sqlalchemy-celery-beat", "beat_schema"),
        ({"CELERY_SINGLETON_BACKEND_URL": "redis://"}, "celery-singleton",
         "singleton_backend_url"),
        ({"CELERY_ONCE": {}}, "celery-once", "ONCE"),
    ],
)  # fmt: skip
def test_settings_of_extensions_say_how_to_name_them(
    config: dict[str, t.Any], extension: str, spelling: str
) -> None:
    with pytest.raises(ValueError) as info:
        configured(config)
    message = str(info.value)
    assert "is not a Celery setting" in message
    assert extension in message
    call = f"FlaskCelery(extra_settings=[{spelling!r}])"
    assert call in message
    # The call it names works.
    conf = configured(config, extra_settings=[spelling])
    assert spelling in conf


def test_unknown_settings_say_how_to_name_them() -> None:
    with pytest.raises(ValueError) as info:
        configured({"CELERY_MY_PLUGIN_OPTION": 1})
    assert "FlaskCelery(extra_settings=['my_plugin_option'])" in str(info.value)
    assert "If the app reads it, rename it" in str(info.value)
    with pytest.raises(ValueError) as info:
        configured({"CELERY": {"MyPluginOption": 1}})
    assert "FlaskCelery(extra_settings=['MyPluginOption'])" in str(info.value)
    # Only CELERY_ keys are read: naming another one would not help.
    with pytest.raises(ValueError) as info:
        configured({"BROKER_SOMETHING": 1})
    assert "extra_settings" not in str(info.value)


def test_celerys_own_beat_settings_are_settings() -> None:
    conf = configured({"CELERY_BEAT_MAX_LOOP_INTERVAL": 5})
    assert conf.beat_max_loop_interval == 5


@pytest.mark.parametrize(
    "key", ["CELERY_CONFIG", "CELERY_CONF", "CELERY_SETTINGS", "CELERY_CONFIGURATION"]
)
def test_a_dict_of_settings_under_another_name(key: str) -> None:
    with pytest.raises(ValueError) as info:
        configured({key: {"broker_url": "redis://"}})
    message = str(info.value)
    assert f"{key} is not a Celery setting" in message
    assert f"rename {key} to CELERY." in message
    with pytest.raises(ValueError, match="a dict, not a module's name"):
        configured({key: "myapp.celeryconfig"})
