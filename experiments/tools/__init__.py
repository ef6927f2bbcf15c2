"""Small command-line tools of the runner (run from a clone: ``python -m experiments.tools.X``)."""
