"""The run directory through ``etils.epath``: a local workdir and a ``gs://`` one.

The ``gs://`` file system is faked: ``etils.epath.testing.mock_epath`` routes every
``gs://bucket/...`` path to fsspec's in-memory file system (a second, non-``os`` file system),
so the workdir checks, lock, metadata, outputs and metrics are exercised without a network.
"""

import contextlib
import json
import os
import socket
from unittest import mock

from etils.epath import gpath
from etils.epath import testing as epath_testing
import fsspec
import pytest

from experiments import metrics as metrics_lib
from experiments import run_config, rundir
from rknet_jax import checkpoint as rk_ckpt
from rknet_jax import preprocessing


@contextlib.contextmanager
def gs_in_memory():
  """``gs://`` paths served by fsspec's memory file system; other paths untouched."""
  fs = fsspec.filesystem("memory", skip_instance_cache=True)
  fs.store.clear()
  fs.pseudo_dirs[:] = [""]

  def on_gs(fn_name, memory_fn):
    def call(original, path, *args, **kwargs):
      if not os.fspath(path).startswith("gs://"):
        return original(path, *args, **kwargs)
      return memory_fn(os.fspath(path)[len("gs:/") :], *args, **kwargs)

    call.__name__ = fn_name
    return call

  def makedirs(p, exist_ok=False):
    if fs.exists(p) and not exist_ok:
      raise FileExistsError(p)
    fs.makedirs(p, exist_ok=True)

  def rename(p, dst):
    fs.mv(p, os.fspath(dst)[len("gs:/") :], recursive=True)

  # With TensorFlow imported, epath sends gs:// to tf.io.gfile, past the mocked backends.
  with (
    mock.patch.object(gpath, "_is_tf_installed", lambda: False),
    epath_testing.mock_epath(
      open=on_gs("open", fs.open),
      exists=on_gs("exists", fs.exists),
      isdir=on_gs("isdir", fs.isdir),
      listdir=on_gs(
        "listdir", lambda p: [os.path.basename(x.rstrip("/")) for x in fs.ls(p, detail=False)]
      ),
      makedirs=on_gs("makedirs", makedirs),
      mkdir=on_gs("mkdir", lambda p, exist_ok=False: makedirs(p, exist_ok)),
      remove=on_gs("remove", fs.rm_file),
      rename=on_gs("rename", rename),
      replace=on_gs("replace", rename),
      rmtree=on_gs("rmtree", lambda p: fs.rm(p, recursive=True)),
    ),
  ):
    yield fs


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would land here
  if request.param == "local":
    yield str(tmp_path / "run"), None
    return
  with gs_in_memory() as fs:
    yield "gs://bucket/run", fs
  assert os.listdir(tmp_path) == []  # nothing went to the local disk


def test_workdir_checks_lock_metadata_and_outputs_on_any_file_system(tiny_config, workdir):
  path, fs = workdir
  config = tiny_config()
  run_config.validate_config(config, path)  # pure: nothing created
  assert not rundir.path(path).exists()
  rundir.prepare(path, subdirs=("checkpoints",))
  assert rundir.path(path, "checkpoints").is_dir()

  lock = rundir.WorkdirLock(path).acquire()
  holder = json.loads(rundir.path(path, rundir.LOCK_FILE).read_text())
  assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
  with pytest.raises(rundir.WorkdirBusy, match=rf"in use by another run .*pid {os.getpid()}"):
    rundir.WorkdirLock(path).acquire()  # a second run while this one holds it
  lock.release()
  assert not rundir.path(path, rundir.LOCK_FILE).exists()

  run = {"identity": run_config.identity(config), "config": {}, "total_steps": 4}
  rundir.write_run_file(path, run, start_step=0, total_steps=4)
  rundir.write_run_file(path, dict(run, total_steps=8), start_step=4, total_steps=8)
  got = rundir.read_run_file(path)
  assert got["total_steps"] == 8
  assert [(h["start_step"], h["total_steps"]) for h in got["history"]] == [(0, 4), (4, 8)]
  run_config.validate_config(config, path)  # same model: accepted
  with pytest.raises(ValueError, match="different model"):
    run_config.validate_config(tiny_config(model="ERKNet-2x1 1x1"), path)

  log = metrics_lib.MetricsLog(path, resume_step=0)
  log.write(1, "train", {"loss": 2.5, "top1_error": 0.9})
  log.write(2, "train", {"loss": 2.0, "top1_error": 0.8})
  log.close()
  assert [r["loss"] for r in metrics_lib.read_metrics(path)] == [2.5, 2.0]
  assert list(rundir.path(path, rundir.TENSORBOARD_SUBDIR).iterdir())
  metrics_lib.MetricsLog(path, resume_step=1).close()  # a resume drops later records
  assert [r["step"] for r in metrics_lib.read_metrics(path)] == [1]
  metrics_lib.plot_curves(path, rundir.path(path, rundir.CURVES_FILE))
  assert rundir.path(path, rundir.CURVES_FILE).read_bytes()[:4] == b"\x89PNG"
  rundir.write_results(path, {"test_top1_error": 0.1})

  kept = rundir.move_aside_outputs(path)
  assert json.loads((kept / rundir.RESULTS_FILE).read_text()) == {"test_top1_error": 0.1}
  assert not rundir.path(path, rundir.RESULTS_FILE).exists()
  assert not rundir.path(path, rundir.METRICS_FILE).exists()

  # The library's workdir files (model.json, data.json) go through epath too, and a
  # model.json makes the identity check compare resolved specs.
  spec = run_config.model_spec(config, 10)
  rk_ckpt.write_model_spec(path, spec, (8, 8, 1))
  saved = rk_ckpt.read_model_spec(path)
  assert saved["input_shape"] == [8, 8, 1]
  assert rk_ckpt.saved_spec(saved) == spec
  data = {
    "image_shape": [8, 8, 1],
    "num_classes": 10,
    "class_names": list("0123456789"),
    "mean": [4.9],
    "std": [6.0],
  }
  preprocessing.write_data_spec(path, data)
  assert preprocessing.read_data_spec(path) == data
  with pytest.raises(ValueError, match=r"different model .*stages"):
    run_config.validate_config(tiny_config(model="ERKNet-2x1 1x1"), path)

  rundir.path(path, rundir.RUN_FILE).write_text('{"identity": ')
  with pytest.raises(ValueError, match="run.json .* is not valid JSON"):
    run_config.validate_config(config, path)
  if fs is not None:
    assert fs.exists("/bucket/run/run.json")  # the files really are in the fake bucket


def test_a_file_in_the_way_of_the_workdir_is_named(tiny_config, tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(ValueError, match=r"cannot be created: .*/f' is an existing file"):
    run_config.validate_config(tiny_config(), str(tmp_path / "f" / "run"))


# --------------------------------------------------------------- stale lock takeover
def _take_over_in_step(workdir, barrier, results, trials):
  """A worker: per trial, wait for every worker, then try to take the (stale) lock."""
  for _ in range(trials):
    barrier.wait()
    try:
      rundir.WorkdirLock(workdir).acquire()  # never released: a winner holds it
      results.put(1)
    except rundir.WorkdirBusy:
      results.put(0)
    barrier.wait()


def test_concurrent_takeovers_of_a_stale_lock_never_both_win(tmp_path):
  """Many synchronised trials of two (then three) processes taking over a dead run's lock:
  exactly one wins each time (the takeover is atomic, not read-unlink-create)."""
  import multiprocessing
  import subprocess
  import sys

  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()  # a pid that no longer runs: its lock is stale
  stale = json.dumps(
    {"host": socket.gethostname(), "pid": dead.pid, "started": "2026-01-01T00:00:00"}
  )
  lock_file = os.path.join(workdir, rundir.LOCK_FILE)
  ctx = multiprocessing.get_context("fork")
  for workers, trials in ((2, 300), (3, 100)):
    barrier, results = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [
      ctx.Process(target=_take_over_in_step, args=(workdir, barrier, results, trials))
      for _ in range(workers)
    ]
    for p in procs:
      p.start()
    winners = []
    try:
      for _ in range(trials):
        with open(lock_file, "w") as f:
          f.write(stale)
        barrier.wait()  # go
        barrier.wait()  # every worker tried
        winners.append(sum(results.get(timeout=30) for _ in range(workers)))
    finally:
      for p in procs:
        p.join(30)
    assert winners == [1] * trials, (
      f"{workers} workers: {winners.count(0)} trials without "
      f"a winner, {sum(w > 1 for w in winners)} with several"
    )
