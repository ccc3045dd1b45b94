"""Scores of the generated long-context tasks (RULER's string match)."""

from __future__ import annotations


def string_match_all(doc, results):
    """Fraction of the reference strings that appear in the generation (case-insensitive)."""
    prediction = results[0].lower()
    refs = doc["outputs"]
    return {"score": sum(r.lower() in prediction for r in refs) / len(refs)}
