"""The ``flask`` command, in a process where Flask-SQLAlchemy cannot be
imported: ``python without_flask_sqlalchemy.py --app dbapp celery worker``."""

from __future__ import annotations

import sys
import typing as t


class Block:
    def find_spec(self, name: str, *args: t.Any) -> None:
        if name.split(".")[0] == "flask_sqlalchemy":
            raise ImportError(f"{name} is not installed")


sys.meta_path.insert(0, Block())

from flask.cli import main  # noqa: E402

main()
