"""Submitting a text and getting its analysis, the three ways to test a task:
inline, through a worker, and by looking at what was sent on commit."""

from __future__ import annotations

import time
import typing as t

from celery.worker import WorkController
from flask import Flask
from flask.testing import FlaskClient

from example_app.extensions import db
from example_app.models import Analysis
from example_app.tasks import analyse
from example_app.views import submit
from flask_celery_ctx.testing import OnCommitRecorder

TEXT = "The cat sat. The cat sat on the mat! Did the cat sleep? Cats sleep a lot."


def wait_until_finished(client: FlaskClient, id: int) -> dict[str, t.Any]:
    deadline = time.monotonic() + 10
    while True:
        analysis: dict[str, t.Any] = client.get(f"/api/analyses/{id}").json  # type: ignore[assignment]
        if analysis["status"] in ("done", "failed") or time.monotonic() > deadline:
            return analysis
        time.sleep(0.05)


def test_eager_analysis_is_done_when_the_request_returns(
    client: FlaskClient, celery_eager: t.Any
) -> None:
    response = client.post("/api/analyses", json={"text": TEXT})
    assert response.status_code == 201
    analysis = client.get(response.headers["Location"]).json
    assert analysis is not None
    assert analysis["status"] == "done"
    assert analysis["progress"] == 100
    assert analysis["result"] == {
        "words": 17,
        "distinct_words": 10,
        "sentences": 4,
        "words_per_sentence": 4.2,
        "reading_minutes": 0.1,
        "top_words": [["sleep", 2], ["cats", 1]],
    }


def test_worker_analyses_a_submitted_text(
    client: FlaskClient, celery_worker: WorkController
) -> None:
    response = client.post("/analyses", data={"text": TEXT})
    assert response.status_code == 303
    [listed] = client.get("/api/analyses").json["analyses"]  # type: ignore[index]
    analysis = wait_until_finished(client, listed["id"])
    assert analysis["status"] == "done"
    assert analysis["result"]["words"] == 17


def test_submit_sends_the_analysis_on_commit(
    app: Flask, celery_on_commit: OnCommitRecorder
) -> None:
    with app.app_context():
        analysis = submit(TEXT)
        [sent] = celery_on_commit.sent
        assert sent.task == analyse
        assert sent.args == (analysis,)
        assert sent.id == analysis.task_id
        assert repr(sent) == f"example_app.tasks.analyse(Analysis({analysis.id}))"
        assert analysis.status == "queued"
    # Outside the app context, as in a worker: a context and session of its own.
    [result] = celery_on_commit.run()
    assert result.get(timeout=5)["words"] == 17
    with app.app_context():
        assert db.session.get(Analysis, analysis.id).status == "done"  # type: ignore[union-attr]


def test_request_sends_one_task_and_nothing_before_commit(
    client: FlaskClient, celery_on_commit: OnCommitRecorder
) -> None:
    assert client.post("/analyses", data={"text": "  "}).status_code == 400
    assert client.post("/api/analyses", json=["not", "an", "object"]).status_code == 400
    assert celery_on_commit.sent == []
    client.post("/analyses", data={"text": TEXT})
    assert celery_on_commit.names == ["example_app.tasks.analyse"]
    assert client.get("/api/analyses").json["analyses"][0]["status"] == "queued"  # type: ignore[index]
    celery_on_commit.run()
    assert client.get("/api/analyses").json["analyses"][0]["status"] == "done"  # type: ignore[index]


def test_the_page_shows_the_analyses(client: FlaskClient, celery_eager: t.Any) -> None:
    client.post("/analyses", data={"text": TEXT})
    page = client.get("/").text
    assert "Text analysis" in page
    assert '"status": "done"' in page
