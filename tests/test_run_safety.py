"""Runs that never lie or lose work: the non-finite guard, checksums, the workdir
lock and metadata, outputs kept aside, clear errors for bad numbers and damaged files.

In-process runs of a tiny ERKNet on digits (the ``tiny_config`` fixture of conftest.py).
"""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpointing, input_pipeline, run_config, rundir, train
from experiments import steps as steps_lib
import rknet_jax
from rknet_jax import checkpoint as rk_ckpt


def checkpoint_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def strip_model_spec_from_checkpoints(workdir):
  """Makes the checkpoints look like ones from before the spec was stored in their meta."""
  for step, meta in checkpointing.checkpoint_metas(workdir).items():
    meta.pop(checkpointing.MODEL_SPEC_KEY)
    with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata"), "w") as f:
      json.dump(meta, f)


def assert_all_finite(tree):
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------- non-finite guard
def overflow_running_variances_after(bad_step, monkeypatch):
  """Wraps the train step so every BN running variance overflows to inf after ``bad_step``.

  Train-mode BN normalises with batch statistics, so the loss stays finite: what a too-high
  learning rate does to digits, made deterministic.
  """
  make = steps_lib.make_train_step

  def overflowing(*args):
    step = make(*args)

    def wrapped(state, batch):
      state, m = step(state, batch)
      if int(state.step) == bad_step:
        state = state.replace(
          batch_stats=jax.tree_util.tree_map_with_path(
            lambda p, x: x * jnp.inf if "var" in jax.tree_util.keystr(p) else x, state.batch_stats
          )
        )
      return state, m

    return wrapped

  monkeypatch.setattr(steps_lib, "make_train_step", overflowing)
  monkeypatch.setattr(train, "_FN_CACHE", {})


def test_finite_loss_with_non_finite_bn_statistics_stops_the_run_without_a_result(
  resumable_config, tmp_path, monkeypatch
):
  """What learning_rate=100 does on digits: running variances overflow, the loss does not.

  The step is wrapped to overflow the running variances after step 3 (train-mode BN uses
  batch statistics, so the loss stays finite): the guard must stop at step 4, name a
  ``batch_stats .../var`` leaf, write no result and no checkpoint of the broken state.
  """
  overflow_running_variances_after(3, monkeypatch)
  workdir = str(tmp_path / "run")
  config = resumable_config(num_train_steps=8, checkpoint_every_steps=2, log_every_steps=4)
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert "at step 4" in message
  assert "first non-finite leaf batch_stats/" in message and "/var" in message
  assert "newest checkpoint, step 2, is finite and kept" in message
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  assert checkpoint_steps(workdir) == [2]
  _, variables, _ = rknet_jax.load_checkpoint(workdir)
  assert_all_finite(variables)
  assert not os.path.exists(os.path.join(workdir, "run.lock"))  # released on the way out


@pytest.mark.slow
def test_a_resumed_run_that_breaks_keeps_the_good_checkpoints(
  resumable_config, tmp_path, monkeypatch
):
  """A regression: a good run resumed with a huge learning rate wrote NaN checkpoints, and
  keep-last-K deleted the good ones. The state breaks (finite loss) after step 9 here."""
  workdir = str(tmp_path / "run")
  config = resumable_config(num_train_steps=8, checkpoint_every_steps=2, keep_checkpoints=2)
  train.train_and_evaluate(config, workdir)
  assert checkpoint_steps(workdir) == [6, 8]
  good = {s: rknet_jax.load_checkpoint(workdir, step=s)[1] for s in (6, 8)}
  overflow_running_variances_after(9, monkeypatch)
  config.num_train_steps = 20
  with pytest.raises(train.NonFiniteError, match="at step 10 .*step 8, is finite and kept"):
    train.train_and_evaluate(config, workdir)
  assert checkpoint_steps(workdir) == [6, 8]
  for s, variables in good.items():
    _, kept, _ = rknet_jax.load_checkpoint(workdir, step=s)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(kept)):
      np.testing.assert_array_equal(a, b)
  # A huge learning rate from the good state: stopped too, nothing finite rotated out.
  monkeypatch.undo()
  config.learning_rate = 1e6
  with pytest.raises(train.NonFiniteError):
    train.train_and_evaluate(config, workdir)
  for s in checkpoint_steps(workdir):
    assert_all_finite(rknet_jax.load_checkpoint(workdir, step=s)[1])
  assert checkpoint_steps(workdir)[-1] >= 8


# ------------------------------------------------------------------------- checksums
def rot_one_bit_of_the_saved_weights(workdir, step):
  """Silent bit rot: one bit of one stored weight of ``step`` changes; orbax reads it fine.

  (Re-written through orbax, so its own format checks pass: only the checksums recorded at
  save time can tell.)
  """
  import orbax.checkpoint as ocp

  spec = rk_ckpt.read_model_spec(workdir)
  target = rk_ckpt.abstract_variables(rk_ckpt.model_from_spec(spec), spec["input_shape"])
  item = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "model")
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.restore(item, target)
  leaves, treedef = jax.tree.flatten(tree)
  bits = np.array(leaves[0]).view(np.uint32)
  bits.flat[0] ^= 1 << 20
  leaves[0] = bits.view(np.float32)
  checkpointer.save(item, jax.tree.unflatten(treedef, leaves), force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()


def test_a_flipped_bit_in_the_newest_checkpoint_is_detected_and_the_previous_used(
  resumable_config, tmp_path, caplog
):
  workdir = str(tmp_path / "run")
  config = resumable_config(num_train_steps=8, checkpoint_every_steps=4)
  train.train_and_evaluate(config, workdir)
  _, final, _ = rknet_jax.load_checkpoint(workdir, step=8)
  _, previous, _ = rknet_jax.load_checkpoint(workdir, step=4)
  rot_one_bit_of_the_saved_weights(workdir, 8)
  with pytest.raises(rk_ckpt.ChecksumError, match=r"step 8: the restored model array"):
    rknet_jax.load_checkpoint(workdir, step=8)
  _, fallback, _ = rknet_jax.load_checkpoint(workdir)  # skips the damaged step, warns
  for a, b in zip(jax.tree.leaves(previous), jax.tree.leaves(fallback)):
    np.testing.assert_array_equal(a, b)
  # The runner moves it aside, resumes from step 4 and ends with the same weights.
  os.remove(os.path.join(workdir, "results.json"))
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, workdir)
  assert "Resumed from checkpoint step 4" in caplog.text
  assert any(d.startswith("8-") for d in os.listdir(os.path.join(workdir, "damaged_checkpoints")))
  _, again, _ = rknet_jax.load_checkpoint(workdir, step=8)
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_checksums_are_recorded_for_every_array_and_catch_any_change():
  tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.int32(7)}}
  sums = rk_ckpt.checksums(tree)
  assert set(sums) == {"['a']", "['b']['c']"} and sums["['a']"].startswith("float32[2, 3]:")
  restored = {"model": tree, "meta": {"checksums": {"model": sums}}}
  rk_ckpt.verify_checksums(3, restored)
  bits = tree["a"].view(np.uint32).copy()
  bits[1, 2] ^= 1  # the lowest mantissa bit of one value
  restored["model"] = {"a": bits.view(np.float32), "b": tree["b"]}
  with pytest.raises(rk_ckpt.ChecksumError, match=r"step 3: .*\['a'\]"):
    rk_ckpt.verify_checksums(3, restored)


# ------------------------------------------------------------------ one run per workdir
def test_a_live_holder_refuses_a_second_run_and_a_stale_lock_is_taken_over(
  resumable_config, tmp_path, caplog
):
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock_file = workdir / rundir.LOCK_FILE
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    record = {"host": socket.gethostname(), "pid": holder.pid, "started": "2026-01-01T00:00"}
    lock_file.write_text(json.dumps(record))
    config = resumable_config(num_train_steps=4)
    with pytest.raises(
      rundir.WorkdirBusy,
      match=rf"host {record['host']}, pid {holder.pid}, "
      r"started 2026-01-01T00:00",
    ):
      train.train_and_evaluate(config, str(workdir))
    assert not (workdir / rundir.RUN_FILE).exists()  # the refused run wrote nothing
    assert json.loads(lock_file.read_text()) == record
    # Another host's lock is never taken over (its pid means nothing here).
    lock_file.write_text(json.dumps(dict(record, host="another-host", pid=1)))
    with pytest.raises(rundir.WorkdirBusy, match="another-host"):
      rundir.WorkdirLock(str(workdir)).acquire()
  finally:
    holder.kill()
    holder.wait(30)
  lock_file.write_text(json.dumps(record))  # the holder is gone: stale
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(config, str(workdir))
  assert results["steps"] == 4
  assert f"stale lock {lock_file} of pid {holder.pid}" in caplog.text
  assert not lock_file.exists()


def test_metadata_is_written_only_after_the_restore_succeeded(resumable_config, tmp_path):
  workdir = tmp_path / "run"
  config = resumable_config(num_train_steps=4)
  train.train_and_evaluate(config, str(workdir))
  model_json = (workdir / rk_ckpt.MODEL_FILE).read_text()
  (workdir / rundir.RUN_FILE).unlink()
  other = resumable_config(num_train_steps=4, model="ERKNet-2x1 1x1")
  # model.json is compared as a resolved spec before anything is touched.
  with pytest.raises(ValueError, match=r"different model .*stages: workdir has \[1, 1\]"):
    train.train_and_evaluate(other, str(workdir))
  assert (workdir / rk_ckpt.MODEL_FILE).read_text() == model_json
  assert not (workdir / rundir.RUN_FILE).exists()
  # With model.json gone too, the checkpoints' own spec (in their meta) tells.
  (workdir / rk_ckpt.MODEL_FILE).unlink()
  with pytest.raises(
    ValueError,
    match=r"different model \(checkpoint step 4: .*stages: "
    r"workdir has \[1, 1\]",
  ):
    train.train_and_evaluate(other, str(workdir))
  # Checkpoints written before they recorded their spec: only the restore can tell; it
  # fails, nothing is written.
  strip_model_spec_from_checkpoints(str(workdir))
  with pytest.raises(
    checkpointing.RestoreError, match="none of the checkpoints .* can be restored"
  ):
    train.train_and_evaluate(other, str(workdir))
  assert not (workdir / rk_ckpt.MODEL_FILE).exists()
  assert not (workdir / rundir.RUN_FILE).exists()
  assert checkpoint_steps(str(workdir)) == [4]


def test_outputs_without_checkpoints_are_moved_aside_never_overwritten(resumable_config, tmp_path):
  workdir = tmp_path / "run"
  config = resumable_config(num_train_steps=4)
  train.train_and_evaluate(config, str(workdir))
  old_results = (workdir / "results.json").read_text()
  old_metrics = (workdir / "metrics.jsonl").read_text()
  for s in checkpoint_steps(str(workdir)):  # deleted to free disk
    shutil.rmtree(workdir / "checkpoints" / str(s))
  train.train_and_evaluate(config, str(workdir))
  (kept,) = list((workdir / rundir.PREVIOUS_OUTPUTS_SUBDIR).iterdir())
  assert (kept / "results.json").read_text() == old_results
  assert (kept / "metrics.jsonl").read_text() == old_metrics
  assert json.loads((workdir / "results.json").read_text())["steps"] == 4
  # A folder holding someone else's files of those names: kept aside as well.
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "results.json").write_text('{"theirs": true}')
  train.train_and_evaluate(config, str(foreign))
  (kept,) = list((foreign / rundir.PREVIOUS_OUTPUTS_SUBDIR).iterdir())
  assert json.loads((kept / "results.json").read_text()) == {"theirs": True}


def test_rerun_with_more_steps_continues_says_so_and_keeps_the_history(
  resumable_config, tmp_path, caplog, monkeypatch
):
  workdir = str(tmp_path / "run")
  config = resumable_config(num_train_steps=4)
  real, calls = train.clock, []

  def first_session_takes_1000_s():
    calls.append(None)
    return real() + (1000.0 if len(calls) > 1 else 0.0)

  monkeypatch.setattr(train, "clock", first_session_takes_1000_s)
  first = train.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  assert first["train_wall_time_sec"] >= 1000
  config.num_train_steps = 8
  with caplog.at_level(logging.INFO):
    second = train.train_and_evaluate(config, workdir)
  assert "trained toward 4 steps; this config asks for 8" in caplog.text
  assert "continuing from step 4 to 8" in caplog.text
  assert second["steps"] == 8
  run = rundir.read_run_file(workdir)
  assert [(h["start_step"], h["total_steps"]) for h in run["history"]] == [(0, 4), (4, 8)]
  assert run["total_steps"] == 8
  # Wall time accumulates over the sessions (it was reset to the last session's).
  assert second["train_wall_time_sec"] >= 1000


# ------------------------------------------- a run is bound to its recipe and its model
@pytest.mark.slow
def test_a_recipe_change_on_resume_warns_and_run_json_keeps_each_sessions_values(
  resumable_config, tmp_path, caplog
):
  """Changing the optimiser on resume continues (lowering the learning rate after a
  non-finite stop is a fix), warns, and never makes run.json claim one value for the run."""
  workdir = str(tmp_path / "run")
  config = resumable_config(num_train_steps=4)
  train.train_and_evaluate(config, workdir)
  config.num_train_steps = 8
  config.learning_rate, config.momentum = 0.05, 0.8
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(config, workdir)
  assert "config.learning_rate=0.05 (the run so far used 0.1)" in caplog.text
  assert "config.momentum=0.8 (the run so far used 0.9)" in caplog.text
  run = rundir.read_run_file(workdir)
  sessions = [h["session"] for h in run["history"]]
  assert [(s["learning_rate"], s["momentum"]) for s in sessions] == [(0.1, 0.9), (0.05, 0.8)]
  assert run["changes"] == [
    {"step": 4, "field": "learning_rate", "from": 0.1, "to": 0.05},
    {"step": 4, "field": "momentum", "from": 0.9, "to": 0.8},
  ]
  assert results["changes"] == run["changes"]
  # Another session with the same values changes nothing more; a weight-decay change is
  # recorded from its own step.
  config.num_train_steps, config.weight_decay = 12, 0.0
  train.train_and_evaluate(config, workdir)
  run = rundir.read_run_file(workdir)
  assert run["changes"][2:] == [{"step": 8, "field": "weight_decay", "from": 1e-4, "to": 0.0}]
  assert len(run["history"]) == 3


@pytest.mark.parametrize("field,value", [("dropout_rate", 0.2), ("bn_momentum", 0.5)])
def test_each_checkpoint_holds_its_model_spec_so_a_deleted_model_json_changes_nothing(
  resumable_config, tmp_path, field, value
):
  workdir = str(tmp_path / "run")
  config = resumable_config(num_train_steps=4, checkpoint_every_steps=2)
  train.train_and_evaluate(config, workdir)
  model_json = rk_ckpt.read_model_spec(workdir)
  metas = checkpointing.checkpoint_metas(workdir)
  assert sorted(metas) == [2, 4]
  assert all(m[checkpointing.MODEL_SPEC_KEY] == model_json for m in metas.values())
  os.remove(os.path.join(workdir, rk_ckpt.MODEL_FILE))
  # The library's loader rebuilds the model from a checkpoint's spec (was: "not a workdir
  # written by experiments.main").
  model, _, _ = rknet_jax.load_checkpoint(workdir)
  assert getattr(model, field) == model_json[field]
  run_json = (tmp_path / "run" / rundir.RUN_FILE).read_text()
  other = resumable_config(num_train_steps=8)
  other.model_kwargs[field] = value
  old = model_json[field]
  with pytest.raises(
    ValueError,
    match=rf"different model \(checkpoint step 4: {field}: "
    rf"workdir has {old}, config has {value}\)",
  ):
    train.train_and_evaluate(other, workdir)
  assert rk_ckpt.read_model_spec(workdir) is None  # not rewritten
  assert (tmp_path / "run" / rundir.RUN_FILE).read_text() == run_json


def test_a_model_json_that_does_not_match_the_checkpoints_says_so(
  resumable_config, tmp_path, caplog
):
  from experiments import evaluate

  workdir = str(tmp_path / "run")
  config = resumable_config(num_train_steps=4)
  train.train_and_evaluate(config, workdir)
  edited = dict(rk_ckpt.read_model_spec(workdir), growth_rate=[8, 8])
  rk_ckpt.write_model_spec(workdir, rk_ckpt.saved_spec(edited), edited["input_shape"])
  with pytest.raises(
    ValueError,
    match=r"model.json does not match the model the checkpoints "
    r"were trained as \(checkpoint step 4: growth_rate: checkpoint has "
    r"\[4, 4\], model.json has \[8, 8\]\)",
  ):
    evaluate.evaluate_checkpoint(workdir)
  # The library's loader says the same (was: the checkpoint called damaged, then "no intact
  # checkpoint"; an edit that kept the shapes loaded silently).
  with pytest.raises(ValueError, match=r"model.json does not match .* growth_rate: checkpoint"):
    rknet_jax.load_checkpoint(workdir)
  # A model.json that is no spec at all is named too (was: a TypeError traceback).
  model_file = os.path.join(workdir, rk_ckpt.MODEL_FILE)
  good = (tmp_path / "run" / rk_ckpt.MODEL_FILE).read_text()
  with open(model_file, "w") as f:
    json.dump({"family": "DenseNetSpec", "name": "DenseNet-121"}, f)
  for load in (rknet_jax.load_checkpoint, evaluate.evaluate_checkpoint):
    with pytest.raises(ValueError, match=rf"{re.escape(model_file)} is not a model spec .*block"):
      load(workdir)
  with open(model_file, "w") as f:
    f.write(good)
  # Training with the checkpoints' model resumes, names the stale file and rewrites it.
  config.num_train_steps = 6
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, workdir)
  assert "does not match the model the checkpoints were trained as" in caplog.text
  assert rk_ckpt.read_model_spec(workdir)["growth_rate"] == [4, 4]
  assert evaluate.evaluate_checkpoint(workdir)["step"] == 6


# ------------------------------------------------------- no empty or repeated results
def test_a_config_that_trains_zero_steps_is_refused_before_any_work(
  tiny_config, tmp_path, monkeypatch
):
  monkeypatch.setattr(jax, "jit", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
  config = tiny_config(num_train_steps=-1)
  with config.unlocked():  # a config file may give a fraction of an epoch
    del config["num_epochs"]
    config.num_epochs = 0.01
  steps_per_epoch = input_pipeline.steps_per_epoch(config)
  with pytest.raises(
    ValueError,
    match=rf"config.num_epochs=0.01 gives 0 training steps "
    rf"\(0.01 x {steps_per_epoch} steps per epoch at batch 64, rounded down\)"
    r": nothing would be trained. Use config.num_epochs >= \S+ \(one step\), "
    "or set config.num_train_steps",
  ) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  suggested = float(re.search(r">= (\S+) \(one step\)", str(e.value)).group(1))
  config.num_epochs = suggested
  assert run_config.total_steps(config, steps_per_epoch) == 1


def test_rerunning_a_finished_run_changes_nothing_and_returns_its_results(
  resumable_config, tmp_path, caplog, monkeypatch
):
  workdir = tmp_path / "run"
  config = resumable_config(num_train_steps=4)
  first = train.train_and_evaluate(config, str(workdir))
  files = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  monkeypatch.setattr(
    train, "_compiled_functions", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compiled"))
  )
  for change in ({}, {"learning_rate": 0.01, "log_every_steps": 2}):
    for k, v in change.items():
      config[k] = v
    caplog.clear()
    with caplog.at_level(logging.INFO):
      again = train.train_and_evaluate(config, str(workdir))
    assert again == first
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == files
    finished = [
      r.getMessage() for r in caplog.records if "already holds this run" in r.getMessage()
    ]
    assert len(finished) == 1 and "nothing trained or tested" in finished[0]
    assert (
      "config fields that differ from the run's: learning_rate, log_every_steps" in finished[0]
    ) == bool(change)
  # A total below the trained steps: the first rerun tests the step 4 model (and says
  # so); a second one changes nothing.
  monkeypatch.undo()
  config.num_train_steps = 2
  assert train.train_and_evaluate(config, str(workdir))["steps"] == 4
  files = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  train.train_and_evaluate(config, str(workdir))
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == files


# ------------------------------------------------------------------ clear errors
@pytest.mark.parametrize(
  "field,value,match",
  [
    ("momentum", 1.5, r"config.momentum must be a finite number in \[0, 1\); got 1.5"),
    ("momentum", -0.1, "momentum"),
    ("warmup_epochs", -1, r"config.warmup_epochs must be a finite number in \[0, inf\); got -1"),
    ("weight_decay", float("nan"), "config.weight_decay must be .*; got nan"),
    ("weight_decay", -1e-4, "weight_decay"),
    ("learning_rate", float("inf"), "learning_rate must be a positive number; got inf"),
    ("lr_decay_factor", 0.0, r"lr_decay_factor must be a finite number in \(0, 1\]"),
    ("lr_decay_factor", 2.0, "lr_decay_factor"),
    ("lr_decay_every_epochs", -3, "lr_decay_every_epochs"),
    ("num_epochs", -1, r"num_epochs must be a finite number in \[0, inf\)"),
    ("num_train_steps", -5, r"num_train_steps must be an integer in \[-1, inf\)"),
    ("num_train_steps", 0, "num_train_steps=0 would train nothing"),  # was: num_epochs ran
    ("keep_checkpoints", 0, "keep_checkpoints must be a positive integer; got 0"),
    ("log_every_steps", True, "log_every_steps must be a positive integer; got True"),
    ("growth_rate", 0, r"growth_rate=\(0, 0\): every entry must be an int from 1"),
    ("prefetch", 0, "prefetch must be a positive integer; got 0"),
    ("lr_decay_fractions", (0.5, 1.5), "lr_decay_fractions must lie in"),
  ],
)
def test_numeric_fields_out_of_range_fail_before_any_compilation(
  tiny_config, tmp_path, monkeypatch, field, value, match
):
  def forbidden(*a, **k):
    raise AssertionError("compiled or loaded data before validating the config")

  monkeypatch.setattr(jax, "jit", forbidden)
  monkeypatch.setattr(input_pipeline, "steps_per_epoch", forbidden)
  config = tiny_config()
  with config.unlocked():
    config[field] = value
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # checks have no side effects


def test_truncated_run_json_is_named_and_explained(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / rundir.RUN_FILE).write_text('{"identity": {"model": "ERK')
  with pytest.raises(
    ValueError,
    match=r"run.json \(the run's config and history\) is not "
    r"valid JSON .*delete it",
  ):
    run_config.validate_config(tiny_config(), str(workdir))
  from experiments import evaluate

  with pytest.raises(ValueError, match="run.json .* is not valid JSON"):
    evaluate.evaluate_checkpoint(str(workdir))


def test_unreadable_checkpoint_is_not_called_damaged_and_nothing_is_moved(
  resumable_config, tmp_path, monkeypatch
):
  workdir = str(tmp_path / "run")
  config = resumable_config(num_train_steps=4)
  train.train_and_evaluate(config, workdir)
  path = os.path.join(workdir, "checkpoints", "4", "model")

  def denied(self, step, args=None):  # what a chmod 000 gives a non-root user
    raise PermissionError(13, "Permission denied", path)

  import orbax.checkpoint as ocp

  monkeypatch.setattr(ocp.CheckpointManager, "restore", denied)
  os.remove(os.path.join(workdir, "results.json"))  # not finished: it restores
  with pytest.raises(
    rk_ckpt.CheckpointUnreadable, match=r"step 4 .* cannot be read .*Permission denied.*not damaged"
  ):
    train.train_and_evaluate(config, workdir)
  assert checkpoint_steps(workdir) == [4]
  assert not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))


def test_a_damaged_checkpoint_that_cannot_be_moved_aside_gives_a_clear_error(
  resumable_config, tmp_path, monkeypatch
):
  workdir = str(tmp_path / "run")
  config = resumable_config(num_train_steps=8, checkpoint_every_steps=4)
  train.train_and_evaluate(config, workdir)
  rot_one_bit_of_the_saved_weights(workdir, 8)
  os.remove(os.path.join(workdir, "results.json"))  # not finished: it restores
  from etils import epath

  def cannot_rename(self, target):
    raise OSError(30, "Read-only file system", os.fspath(self))

  monkeypatch.setattr(type(epath.Path(workdir)), "rename", cannot_rename)
  with pytest.raises(
    RuntimeError,
    match=r"step 8 .* is damaged .*could not be moved aside "
    r".*Read-only file system.*by hand",
  ):
    train.train_and_evaluate(config, workdir)
  assert checkpoint_steps(workdir) == [4, 8]


def test_checkpoints_folder_that_cannot_be_written_is_refused_at_start(
  tiny_config, tmp_path, monkeypatch
):
  monkeypatch.setattr(jax, "jit", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("a file where the checkpoints folder should be")
  with pytest.raises(ValueError, match="checkpoints' cannot be created"):
    train.train_and_evaluate(tiny_config(), str(workdir))
  real = rundir.probe_write
  monkeypatch.setattr(
    rundir,
    "probe_write",
    lambda d: (
      (_ for _ in ()).throw(OSError(30, "Read-only file system"))
      if d.name == "checkpoints"
      else real(d)
    ),
  )
  (workdir / "checkpoints").unlink()
  with pytest.raises(ValueError, match="checkpoints' is not writable: .*Read-only"):
    train.train_and_evaluate(tiny_config(), str(workdir))


def test_is_time_fires_every_n_steps_and_at_the_last():
  assert [s for s in range(1, 11) if train.is_time(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if train.is_time(s, 4, 10, last=False)] == [4, 8]
  assert [s for s in range(1, 11) if train.is_time(s, 0, 10)] == [10]


# ------------------------------------------------------------------ the command line
@pytest.fixture
def run_main(run_python):
  """``python -m experiments.main *args`` on one CPU device."""
  return lambda *args, timeout=300: run_python(
    "-m", "experiments.main", *args, unset=("XLA_FLAGS",), timeout=timeout
  )


@pytest.mark.slow
def test_digits_with_learning_rate_100_exits_1_without_a_result(run_main, tmp_path):
  """A regression: this exited 0 reporting 0.90 test error, with NaN weights in its checkpoint."""
  workdir = str(tmp_path / "run")
  proc = run_main(
    "--config=experiments/configs/digits.py", f"--workdir={workdir}", "--config.learning_rate=100"
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert re.search(
    r"error: non-finite training state at step \d+ .*first "
    r"non-finite leaf \S+.*Check the input data",
    proc.stderr,
  ), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  if os.path.exists(os.path.join(workdir, "checkpoints")) and checkpoint_steps(workdir):
    assert_all_finite(rknet_jax.load_checkpoint(workdir)[1])


def test_a_config_file_that_does_not_exist_is_one_line(run_main, tmp_path):
  proc = run_main(
    "--config=experiments/configs/no_such_config.py", f"--workdir={tmp_path / 'run'}", timeout=120
  )
  assert proc.returncode == 1
  lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
  assert len(lines) == 1, lines
  assert "no such file" in lines[0] and "no_such_config.py" in lines[0]
  assert "experiments/configs/digits.py" in lines[0]
