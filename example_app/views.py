"""The pages and the JSON the page polls."""

from __future__ import annotations

import typing as t
from collections.abc import Mapping

from flask import Blueprint
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from .extensions import db
from .models import Analysis
from .stalls import notice
from .tasks import analyse

bp = Blueprint("analyses", __name__)

#: The longest text accepted, in characters.
MAX_TEXT = 100_000


def submit(text: str) -> Analysis:
    """Save a text to analyse and send its task once the row is committed.

    ``delay_on_commit`` waits for the commit: the worker cannot start before
    the row exists, and a rollback sends nothing.
    """
    analysis = Analysis(text=text)
    db.session.add(analysis)
    analysis.task_id = analyse.delay_on_commit(analysis).id
    db.session.commit()
    return analysis


class InvalidText(ValueError):
    """A submitted text that cannot be analysed; the message says why."""


def _text() -> str:
    data = request.get_json(silent=True) if request.is_json else request.form
    text = str(data.get("text", "") if isinstance(data, Mapping) else "").strip()
    if not text:
        raise InvalidText("Give a text to analyse.")
    if len(text) > MAX_TEXT:
        raise InvalidText(
            f"The text has {len(text):,} characters: at most {MAX_TEXT:,} are"
            " analysed. Shorten it."
        )
    return text


def _page(error: str | None = None, text: str = "") -> str:
    recent = db.session.scalars(
        select(Analysis).order_by(Analysis.id.desc()).limit(20)
    ).all()
    return render_template(
        "index.html",
        analyses=[_shown(a) for a in recent],
        error=error,
        text=text,
        max_text=MAX_TEXT,
    )


def _shown(analysis: Analysis) -> dict[str, t.Any]:
    """An analysis as the page shows it: with a notice when its worker
    stopped mid-task."""
    return {**analysis.to_dict(), "notice": notice(analysis)}


@bp.get("/")
def index() -> ResponseReturnValue:
    return _page()


@bp.post("/analyses")
def create() -> ResponseReturnValue:
    """The form: submit, then back to the page, which shows it; or the page
    again, with the error and the text as it was sent."""
    try:
        submit(_text())
    except InvalidText as error:
        return _page(str(error), request.form.get("text", "")), 400
    return redirect(url_for(".index"), 303)


@bp.get("/api/analyses")
def list_json() -> ResponseReturnValue:
    """The 20 most recent, which the page polls."""
    query = select(Analysis).order_by(Analysis.id.desc()).limit(20)
    return {"analyses": [_shown(a) for a in db.session.scalars(query)]}


@bp.post("/api/analyses")
def create_json() -> ResponseReturnValue:
    try:
        analysis = submit(_text())
    except InvalidText as error:
        return {"error": str(error)}, 400
    location = url_for(".show_json", id=analysis.id)
    return analysis.to_dict(), 201, {"Location": location}


@bp.get("/api/analyses/<int:id>")
def show_json(id: int) -> ResponseReturnValue:
    return _shown(db.get_or_404(Analysis, id))


@bp.get("/favicon.ico")
def favicon() -> ResponseReturnValue:
    """The page's icon is in the page; a browser that asks for this one, as
    for the JSON pages, gets no content rather than a 404."""
    return "", 204
