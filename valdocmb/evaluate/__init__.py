"""Scoring with the official VALDO Task 2 rules: `scoring` (the one scoring core), `folders` (pairing a reference
folder with a prediction folder) and the command `valdocmb-evaluate` (`python -m valdocmb.evaluate`)."""

from .scoring import CaseScore, missing_score, score_case, score_components, summarize

__all__ = ["CaseScore", "missing_score", "score_case", "score_components", "summarize"]
