"""Experiments: input pipelines, training, evaluation and the paper's tables (see DESIGN.md)."""
