"""What to install when the client library of a broker's transport is
missing: kombu imports it only when a URL of its kind is first used, and
fails then with whatever the missing module causes, not always an
``ImportError`` (``redis://`` without the ``redis`` package raises
``AttributeError: 'NoneType' object has no attribute 'Redis'``)."""

from __future__ import annotations

from importlib.metadata import metadata
from importlib.metadata import PackageNotFoundError

from kombu.transport import TRANSPORT_ALIASES
from kombu.utils.url import maybe_sanitize_url


def transport_name(url: str, transport: str | None = None) -> str:
    """The name of the transport of a broker URL: ``redis`` for
    ``redis://...``, ``sqla`` for ``sqla+sqlite:///...``.

    :param url: The broker URL.
    :param transport: Celery's ``broker_transport`` setting, which wins.
    """
    if transport:
        return transport
    scheme = url.split("://", 1)[0] if "://" in url else "amqp"
    return scheme.split("+", 1)[0]


def bundle(transport: str) -> str | None:
    """The extra of Celery, or else of kombu, that installs what a transport
    needs: ``celery[redis]`` for ``redis``, ``rediss`` and ``sentinel``.

    :param transport: The transport's name, as in a URL.
    """
    target = TRANSPORT_ALIASES.get(transport, "")
    if not target.startswith("kombu.transport."):
        return None
    module = target.removeprefix("kombu.transport.").replace(":", ".").split(".")[0]
    for dist in ("celery", "kombu"):
        try:
            extras = metadata(dist).get_all("Provides-Extra") or []
        except PackageNotFoundError:  # pragma: no cover
            continue
        if module.lower() in extras:
            return f"{dist}[{module.lower()}]"
    return None


def missing_driver(url: str, transport: str | None, error: BaseException) -> str:
    """A message that says what to install for a broker whose transport
    could not be loaded.

    :param url: The broker URL; its password is not shown.
    :param transport: Celery's ``broker_transport`` setting.
    :param error: The error raised while loading the transport.
    """
    name = transport_name(url, transport)
    shown = maybe_sanitize_url(url)
    if name not in TRANSPORT_ALIASES and "." not in name and ":" not in name:
        known = ", ".join(sorted(TRANSPORT_ALIASES, key=str.lower))
        return (
            f"The broker URL {shown} names the transport {name!r}, which kombu"
            f" does not know. Use one of {known}"
        )
    extra = bundle(name)
    missing = getattr(error, "name", None) if isinstance(error, ImportError) else None
    if extra is not None:
        what = f'Install it: pip install "{extra}"'
    elif missing:
        what = f"Install the package that provides the module {missing!r}"
    else:
        what = "Install the library that the error names"
    return (
        f"The broker URL {shown} needs the client library of the {name!r}"
        f" transport, which is not installed or fails to import"
        f" ({type(error).__name__}: {error}). {what}"
    )
