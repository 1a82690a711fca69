"""Evaluation: language-aware answer normalization and QA metrics (EM, token F1)."""
