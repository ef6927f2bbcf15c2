"""Experiments: input pipelines, training, evaluation and the paper's tables (see docs/design.md)."""
