"""Benchmarks of rknet_jax (run as ``python -m benchmarks.<name>``)."""
