"""The example's task: analyse a text, a slice at a time, saving progress."""

from __future__ import annotations

import re
import time
import typing as t
from collections import Counter

from flask import current_app

from .extensions import celery
from .extensions import db
from .models import Analysis

#: How many slices a text is analysed in: one progress step each.
STEPS = 20

_WORD = re.compile("[^\\W\\d_]+(?:['\u2019][^\\W\\d_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


@celery.task
def analyse(analysis: Analysis) -> dict[str, t.Any]:
    """Count the words and sentences of a text and find its most frequent
    words of four letters or more, committing the progress after each slice so that the page can show
    it.

    The argument is sent as a reference and arrives as an instance loaded in
    this task's session. ``ANALYSIS_STEP_SECONDS`` slows each slice down, so
    that there is something to watch.
    """
    delay = current_app.config["ANALYSIS_STEP_SECONDS"]
    analysis.status = "running"
    db.session.commit()
    try:
        words = [w.lower() for w in _WORD.findall(analysis.text)]
        counts: Counter[str] = Counter()
        size = max(1, -(-len(words) // STEPS))  # words per slice, rounded up
        slices = [words[i : i + size] for i in range(0, len(words), size)] or [[]]
        for done, piece in enumerate(slices, 1):
            counts.update(piece)
            time.sleep(delay)
            analysis.progress = done * 100 // len(slices)
            db.session.commit()
        sentences = len(_SENTENCE_END.findall(analysis.text.strip() + " ")) or 1
        analysis.result = {
            "words": len(words),
            "distinct_words": len(counts),
            "sentences": sentences,
            "words_per_sentence": round(len(words) / sentences, 1),
            "reading_minutes": round(len(words) / 200, 1),
            "top_words": [
                [word, n] for word, n in counts.most_common() if len(word) > 3
            ][:5],
        }
        analysis.status = "done"
    except Exception as exc:
        db.session.rollback()
        analysis.status = "failed"
        analysis.error = str(exc)
        raise
    finally:
        db.session.commit()
    return analysis.result
