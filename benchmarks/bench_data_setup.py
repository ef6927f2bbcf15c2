"""How often one ``train_and_evaluate`` call reads its data, and how long its setup takes.

Counts, per run, the calls of the in-memory loader (the official splits read), of
``base.check_official``, of the validation hold-out, of the mean/std pass
(``in_memory.image_summary``) and of the file's SHA-256 (the data fingerprint), with the
seconds spent in each; ``setup_s`` is the wall time from the call to the start summary (data,
model, compiled init, restore, metadata: everything before the first train step), ``run_s``
the whole call. Several runs in one process (``--runs``) show what a sweep or a study pays
per run. The run is the tests' tiny config (ERKNet-1x1 1x1, k = 4, 12 steps, precise BN) on

* ``digits`` (scikit-learn's, 144 held out), or
* ``npz``: ``--images`` random uint8 28x28 training images (and a sixth as many test images)
  written to a temporary .npz, 5,000 held out, 4 steps, eval batch 1,000.

    python -m benchmarks.bench_data_setup --data digits --runs 2
    python -m benchmarks.bench_data_setup --data npz --images 60000 --runs 2
"""

import argparse
import collections
import contextlib
import json
import os
import tempfile
import time
from unittest import mock


def _counting(counts, seconds):
  """``wrap(name, fn)``: fn, counting its calls and the seconds spent in them under ``name``."""

  def wrap(name, fn):
    def wrapper(*args, **kwargs):
      counts[name] += 1
      start = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        seconds[name] += time.perf_counter() - start

    return wrapper

  return wrap


def _config(data: str, root: str, images: int):
  import numpy as np

  from experiments.configs import default

  c = default.get_config()
  c.model, c.growth_rate, c.download, c.prefetch = "ERKNet-1x1 1x1", 4, False, 1
  c.batch_size, c.eval_batch_size = 64, 64
  c.num_train_steps, c.log_every_steps, c.checkpoint_every_steps = 12, 4, 5
  c.dataset, c.validation_size = "digits", 144
  if data == "npz":
    path = os.path.join(root, "data.npz")
    if not os.path.exists(path):
      rng = np.random.default_rng(0)
      test = max(images // 6, 1)
      np.savez(
        path,
        train_images=rng.integers(0, 256, (images, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 10, images),
        test_images=rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        test_labels=rng.integers(0, 10, test),
      )
    c.dataset, c.validation_size, c.eval_batch_size = f"npz:{path}", 5000, 1000
    c.num_train_steps, c.log_every_steps, c.checkpoint_every_steps = 4, 2, 100
  return c


def measure(data: str, runs: int, images: int = 60_000) -> list:
  """One dict per run: ``counts``, ``seconds`` (per counted function), ``setup_s``, ``run_s``."""
  from experiments import input_pipeline, progress, train
  from experiments.data import base, in_memory
  from experiments.data import fingerprint as fingerprint_lib

  counts, seconds, marks = collections.Counter(), collections.Counter(), {}
  wrap = _counting(counts, seconds)
  summary = progress.start_summary

  def start_summary(**kwargs):
    marks["setup"] = time.perf_counter()
    return summary(**kwargs)

  loaders = {k: wrap("load_official", v) for k, v in input_pipeline._IN_MEMORY_LOADERS.items()}
  out = []
  with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as root:
    stack.enter_context(mock.patch.dict(input_pipeline._IN_MEMORY_LOADERS, loaders))
    for module, name, label in (
      (base, "check_official", "check_official"),
      (in_memory, "holdout", "holdout"),
      (in_memory, "image_summary", "mean_std"),
      (fingerprint_lib, "_sha256_of_file", "sha256"),
    ):
      stack.enter_context(mock.patch.object(module, name, wrap(label, getattr(module, name))))
    stack.enter_context(mock.patch.object(progress, "start_summary", start_summary))
    for i in range(runs):
      config = _config(data, root, images)
      counts.clear(), seconds.clear()
      start = time.perf_counter()
      train.train_and_evaluate(config, os.path.join(root, f"run{i}"))
      out.append(
        {
          "data": data,
          "run": i + 1,
          "counts": dict(counts),
          "seconds": {k: round(v, 3) for k, v in seconds.items()},
          "setup_s": round(marks["setup"] - start, 2),
          "run_s": round(time.perf_counter() - start, 2),
        }
      )
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", choices=("digits", "npz"), default="digits")
  parser.add_argument("--runs", type=int, default=2, help="runs in this one process")
  parser.add_argument("--images", type=int, default=60_000, help="npz training images")
  args = parser.parse_args(argv)
  if args.runs < 1:
    parser.error(f"--runs must be >= 1, got {args.runs}")
  if args.data == "npz" and args.images < 10_000:
    parser.error(f"--images must be >= 10000 (5,000 are held out), got {args.images}")
  for row in measure(args.data, args.runs, args.images):
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
