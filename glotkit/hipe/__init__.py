"""HIPE-2026 person–place relations (issue 5): answer parsing and the official scoring."""
