"""Test-wide setup and the shared fixtures.

Eight virtual CPU devices, so data-parallel sharding is tested on a one-CPU machine
(set before JAX is imported by any test module). Fixtures: ``tiny_config`` (the runner config
of every end-to-end test), ``resumable_config`` (the same for runs that stop and resume),
``data_config`` (the same on another dataset), ``digits_splits`` and ``write_image_folder``
(datasets made from scikit-learn's digits), ``run_python`` (a command in a child process).
"""

import faulthandler
import functools
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the AOT tests compile for compile-only TPU devices) takes a machine-wide lock file
# unless told other processes may load it too (parallel test workers, other jobs).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# TensorFlow (tf.data only) must stay quiet and off accelerators.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402  (after the environment above, like every JAX import)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CRASH_DIR = os.environ.setdefault(
  "RKNET_TEST_CRASH_DIR", os.path.join(tempfile.gettempdir(), f"rknet-test-crashes-{os.getpid()}")
)


def pytest_sessionstart(session):
  """Every test process writes a fatal error's stacks (all threads) to a file of its own, so
  a worker that dies in C code (XLA, TensorFlow) is explained in the summary of the process
  that survives it, not lost with the worker's output."""
  os.makedirs(_CRASH_DIR, exist_ok=True)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  # After pytest's own faulthandler set-up (configure time), which writes to the worker's
  # stderr that pytest-xdist does not relay when the worker dies.
  session.config._crash_log = open(os.path.join(_CRASH_DIR, f"{worker}.log"), "w")
  faulthandler.enable(file=session.config._crash_log, all_threads=True)


def _crash_report(text: str) -> str:
  """faulthandler's dump, shortened: the fatal error line and the innermost frames of every
  other thread, then more of the crashing thread's (last, next to the test summary)."""
  blocks = text.strip().split("\n\n")

  def head(block, n):
    return "\n".join(line for line in block.splitlines()[:n] if "/pluggy/" not in line)

  current = [head(b, 24) for b in blocks if b.startswith("Current thread")]
  others = [head(b, 4) for b in blocks if not b.startswith("Current thread")]
  return "\n\n".join(others + current) + "\n"


def pytest_terminal_summary(terminalreporter):
  for name in sorted(os.listdir(_CRASH_DIR)) if os.path.isdir(_CRASH_DIR) else ():
    with open(os.path.join(_CRASH_DIR, name)) as f:
      text = f.read()
    if text.strip():
      terminalreporter.section(f"fatal error in test process {name[:-4]}")
      terminalreporter.write(_crash_report(text))
  if "PYTEST_XDIST_WORKER" not in os.environ:  # the process that started the others
    shutil.rmtree(_CRASH_DIR, ignore_errors=True)


# What the tiny config changes in the digits quickstart (experiments/configs/digits.py).
_TINY_OVERRIDES = {
  "model": "ERKNet-1x1 1x1",
  "growth_rate": 4,
  "eval_batch_size": 64,
  "num_epochs": 300,  # the default's (num_train_steps decides the length)
  "num_train_steps": 12,
  "precise_bn_batches": 4,  # the runner's default (50) is what test_precise_bn checks
  "log_every_steps": 4,
  "checkpoint_every_steps": 5,
  "prefetch": 1,
}


def _tiny_config(**overrides):
  """ERKNet-1x1 1x1, k = 4, on digits: compiles and trains in about a second."""
  from experiments.configs import digits

  c = digits.get_config()
  for k, v in {**_TINY_OVERRIDES, **overrides}.items():
    c[k] = v
  return c


@pytest.fixture(scope="session")
def tiny_config():
  """The runner config of every end-to-end test: ``tiny_config(**overrides)``."""
  return _tiny_config


@pytest.fixture(scope="session")
def resumable_config():
  """``resumable_config(**overrides)``: the tiny config with no hold-out and a constant
  learning rate, so a run stopped, resumed or continued takes the steps one run would (the
  checkpoint and run-safety tests)."""
  return functools.partial(_tiny_config, validation_size=0, lr_schedule="constant")


@pytest.fixture(scope="session")
def data_config():
  """``data_config(dataset, **overrides)``: the tiny config on ``dataset`` with no hold-out,
  6 steps and no mid-run checkpoint (the data-source tests)."""

  def make(dataset, **overrides):
    defaults = dict(
      dataset=dataset,
      validation_size=0,
      batch_size=32,
      num_train_steps=6,
      log_every_steps=3,
      checkpoint_every_steps=100,
    )
    return _tiny_config(**{**defaults, **overrides})

  return make


@pytest.fixture
def digits_splits():
  """scikit-learn's digits as the runner loads them: (train, test) splits, no hold-out."""
  from experiments import input_pipeline

  splits = input_pipeline.load_splits({"dataset": "digits", "batch_size": 8, "validation_size": 0})
  return splits.train, splits.test


def _write_image_folder(root, splits, *, mode="L", ext="png", size=None):
  """splits: {split: (uint8 images [N, H, W] or [N, H, W, 3], labels)} -> PATH/split/c<l>/."""
  from PIL import Image

  for split, (images, labels) in splits.items():
    for i, (image, label) in enumerate(zip(images, labels)):
      folder = root / split / f"c{label}"
      folder.mkdir(parents=True, exist_ok=True)
      picture = Image.fromarray(image).convert(mode)
      if size:
        picture = picture.resize(size)
      picture.save(folder / f"{i:04d}.{ext}")
  return f"folder:{root}"


@pytest.fixture(scope="session")
def write_image_folder():
  """``write_image_folder(root, splits, mode=, ext=, size=)`` -> the ``folder:`` dataset."""
  return _write_image_folder


def _run_python(*args, env=None, unset=(), timeout=300, check=False):
  """``python *args`` in a child process from the repository root, on the CPU: its
  ``CompletedProcess`` with the output as text. ``env`` sets variables, ``unset`` removes them
  (XLA_FLAGS, for one CPU device instead of this process's eight)."""
  environ = {k: v for k, v in os.environ.items() if k not in unset}
  environ.update({"JAX_PLATFORMS": "cpu", **(env or {})})
  command = [sys.executable, *args]
  return subprocess.run(
    command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=timeout, check=check
  )


@pytest.fixture(scope="session")
def run_python():
  """``run_python(*args, env=None, unset=(), timeout=300, check=False)``: ``python *args``
  from the repository root with JAX on the CPU (the command-line tests)."""
  return _run_python
