"""Bad input is answered where it was given: in the form, with the text kept,
or as JSON for the API; and nothing is sent."""

from __future__ import annotations

from flask.testing import FlaskClient

from example_app.views import MAX_TEXT
from flask_celery_ctx.testing import OnCommitRecorder


def test_a_blank_text_is_refused_in_the_form(
    client: FlaskClient, celery_on_commit: OnCommitRecorder
) -> None:
    response = client.post("/analyses", data={"text": "  \n "})
    assert response.status_code == 400
    page = response.text
    assert (
        '<p class="error" id="error" role="alert">Give a text to analyse.</p>' in page
    )
    assert 'aria-invalid="true"' in page
    # The page itself, styled, with its form and list.
    assert "<form" in page
    assert 'id="analyses"' in page
    assert celery_on_commit.sent == []


def test_a_text_too_long_is_refused_and_kept(
    client: FlaskClient, celery_on_commit: OnCommitRecorder
) -> None:
    text = "<b>Fish & chips</b> " * (MAX_TEXT // 20) + "one more"
    response = client.post("/analyses", data={"text": text})
    assert response.status_code == 400
    page = response.text
    assert (
        f"The text has {len(text):,} characters: at most {MAX_TEXT:,} are analysed."
        in page
    )
    # The text is back in the textarea, escaped, to be shortened.
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert f">{escaped}</textarea>" in page
    assert f"{len(text)} / 100,000 characters" in page
    assert celery_on_commit.sent == []


def test_the_textarea_is_limited_with_a_counter(client: FlaskClient) -> None:
    page = client.get("/").text
    assert f'maxlength="{MAX_TEXT}"' in page
    assert '<span class="counter" id="counter" aria-live="polite">0 / 100,000' in page
    assert 'aria-invalid="true" autofocus' not in page
    assert 'id="error"' not in page


def test_the_api_answers_bad_input_in_json(
    client: FlaskClient, celery_on_commit: OnCommitRecorder
) -> None:
    response = client.post("/api/analyses", json={"text": ""})
    assert response.status_code == 400
    assert response.json == {"error": "Give a text to analyse."}
    response = client.post("/api/analyses", json={"text": "x" * (MAX_TEXT + 1)})
    assert response.status_code == 400
    assert response.json is not None
    assert response.json["error"].startswith("The text has 100,001 characters")
    assert celery_on_commit.sent == []


def test_the_page_has_its_icon(client: FlaskClient) -> None:
    assert '<link rel="icon" href="data:image/svg+xml,' in client.get("/").text
    response = client.get("/favicon.ico")
    assert response.status_code == 204
