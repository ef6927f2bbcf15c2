"""Experiments: input pipelines, training, evaluation, the paper's tables (see docs/design.md)."""
