"""Data: readers for QA files, prompts, and the encoding of examples for training."""
