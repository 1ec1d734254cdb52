"""The pages and the JSON the page polls."""

from __future__ import annotations

from collections.abc import Mapping

from flask import abort
from flask import Blueprint
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from .extensions import db
from .models import Analysis
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


def _text() -> str:
    data = request.get_json(silent=True) if request.is_json else request.form
    text = str(data.get("text", "") if isinstance(data, Mapping) else "").strip()
    if not text:
        abort(400, "Give a text to analyse.")
    if len(text) > MAX_TEXT:
        abort(400, f"The text is longer than {MAX_TEXT} characters.")
    return text


@bp.get("/")
def index() -> ResponseReturnValue:
    recent = db.session.scalars(
        select(Analysis).order_by(Analysis.id.desc()).limit(20)
    ).all()
    return render_template("index.html", analyses=[a.to_dict() for a in recent])


@bp.post("/analyses")
def create() -> ResponseReturnValue:
    """The form: submit, then back to the page, which shows it."""
    submit(_text())
    return redirect(url_for(".index"), 303)


@bp.get("/api/analyses")
def list_json() -> ResponseReturnValue:
    """The 20 most recent, which the page polls."""
    query = select(Analysis).order_by(Analysis.id.desc()).limit(20)
    return {"analyses": [a.to_dict() for a in db.session.scalars(query)]}


@bp.post("/api/analyses")
def create_json() -> ResponseReturnValue:
    analysis = submit(_text())
    location = url_for(".show_json", id=analysis.id)
    return analysis.to_dict(), 201, {"Location": location}


@bp.get("/api/analyses/<int:id>")
def show_json(id: int) -> ResponseReturnValue:
    return db.get_or_404(Analysis, id).to_dict()
