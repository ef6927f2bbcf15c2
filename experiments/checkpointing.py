"""Training-side checkpoints: save every N steps and each epoch, keep last K + best, resume.

Layout (shared with ``rknet_jax.checkpoint``, which reads it): ``workdir/checkpoints/<step>``
holds the orbax items ``model`` (``params``, ``batch_stats``), ``train`` (``opt_state``,
``step``, ``rng``) and ``meta`` (JSON). The step is the number of completed optimiser
steps; because the input pipeline makes batch ``s`` a pure function of ``(seed, s)``, the
step is also the position in the data stream, and resuming at it replays exactly the
batches an uninterrupted run would see.

Every saved array's checksum (``rknet_jax.checkpoint.checksums``) goes into the step's ``meta``
item and is verified on restore, so flipped bits are caught like truncated files. The ``meta``
item also holds the resolved model spec the step was trained with (``model_spec``: what
``model.json`` holds), so a workdir's identity does not depend on ``model.json`` surviving,
and a ``model.json`` edited or copied from another run is named as such
(``check_model_file``).

Damaged checkpoints (a committed step whose files are truncated or missing, or whose arrays
fail their checksum) are skipped with a warning and moved to ``workdir/damaged_checkpoints/`` --
never deleted, never used -- and the run resumes from the previous intact one. Moving
them out of the way keeps orbax's "last K" bookkeeping and later saves of the same step
number working. If no checkpoint restores at all, the run stops with an error and moves
nothing (a changed model definition looks like that; starting over would bury the work).
A checkpoint that cannot be *read* (permissions) is not damaged: the run stops naming it.

A failed write (read-only or full disk, permissions; orbax reports it from its background
thread) stops the run with ``CheckpointWriteError`` within a step of being reported, and
``close`` shuts orbax's threads down even then, so the process exits instead of hanging.
"""

import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from experiments import rundir
from rknet_jax import checkpoint as rk_ckpt

DAMAGED_SUBDIR = "damaged_checkpoints"
BEST_METRIC = "validation_top1_error"
MODEL_SPEC_KEY = rk_ckpt.MODEL_SPEC_KEY  # in each step's meta: the resolved spec + input shape


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written; the run stopped (earlier checkpoints are intact)."""


class RestoreError(RuntimeError):
  """No checkpoint restores (or a damaged one cannot be moved aside); nothing was changed."""


class RunCheckpoints:
  """An orbax ``CheckpointManager`` with the run's save/keep/resume policy.

  Keeps the newest ``keep`` checkpoints plus the one with the lowest validation top-1
  error (only checkpoints saved with validation metrics compete for "best"). Saves are
  asynchronous: the arrays are copied off the devices before ``save`` returns, and the
  files are committed atomically (written to a temporary directory, then renamed), so a
  run killed mid-save leaves no half-written committed step.
  """

  def __init__(self, workdir: str, *, keep: int, track_best: bool, model_spec: dict | None = None):
    self.workdir = rundir.path(workdir)
    self.model_spec = model_spec  # stored in every step's meta (``MODEL_SPEC_KEY``)
    self.last_saved: int | None = None  # newest step saved (or restored) by this run
    self._closed = False
    policies = [ocp_managers.LatestN(n=keep)]
    extra = {}
    if track_best:
      policies.append(
        ocp_managers.BestN(
          get_metric_fn=lambda m: m[BEST_METRIC],
          reverse=True,
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
      extra = dict(best_fn=lambda m: m[BEST_METRIC], best_mode="min")
    options = ocp.CheckpointManagerOptions(
      create=True,
      cleanup_tmp_directories=True,
      preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
      **extra,
    )
    self.manager = rk_ckpt.checkpoint_manager(self.workdir, read_only=False, options=options)

  @property
  def directory(self) -> str:
    return os.fspath(self.manager.directory)

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(
    self, step: int, model_vars: Any, train_vars: Any, meta: dict, metrics: dict | None = None
  ):
    """Saves (asynchronously) the state after ``step`` completed steps, with checksums.

    A second save of ``last_saved`` is a no-op. Raises ``CheckpointWriteError`` if this or
    an earlier write failed.
    """
    if step == self.last_saved:
      return
    meta = dict(
      meta,
      checksums={
        rk_ckpt.MODEL_ITEM: rk_ckpt.checksums(model_vars),
        rk_ckpt.TRAIN_ITEM: rk_ckpt.checksums(train_vars),
      },
    )
    if self.model_spec is not None:
      meta[MODEL_SPEC_KEY] = self.model_spec
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(
          **{
            rk_ckpt.MODEL_ITEM: ocp.args.StandardSave(model_vars),
            rk_ckpt.TRAIN_ITEM: ocp.args.StandardSave(train_vars),
            rk_ckpt.META_ITEM: ocp.args.JsonSave(meta),
          }
        ),
        metrics=metrics,
        force=True,
      )
    except Exception as e:
      self._write_failed(e, step)
    self.last_saved = step

  def _write_failed(self, error: Exception, step: int | None = None):
    self.close()
    at = f"step {step} (or the one before)" if step is not None else "a checkpoint"
    raise CheckpointWriteError(
      f"writing {at} to {self.directory} failed: {type(error).__name__}: {error}. The run "
      "stopped; the checkpoints already committed there are intact. Make the directory "
      "writable (or free disk space) and rerun the same command to resume."
    ) from error

  def check_for_errors(self):
    """Raises ``CheckpointWriteError`` if a background write has failed (non-blocking)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:
      self._write_failed(e)

  def _quarantine(self, step: int, error: Exception):
    """Moves a damaged step out of the manager's directory (process 0 only; kept, not deleted)."""
    if jax.process_index() != 0:
      return
    src = self.manager.directory / str(step)
    dst_root = self.workdir / DAMAGED_SUBDIR
    dst = dst_root / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
      dst_root.mkdir(parents=True, exist_ok=True)
      src.rename(dst)
      notes = dst_root / "README.txt"
      old = notes.read_text() if notes.exists() else ""
      notes.write_text(old + f"{dst.name}: restore failed with {type(error).__name__}: {error}\n")
    except OSError as e:
      raise RestoreError(
        f"checkpoint step {step} in {self.directory} is damaged ({type(error).__name__}: "
        f"{error}) and could not be moved aside to {os.fspath(dst)} ({e}). Nothing was "
        "deleted; move that step folder out of the checkpoints folder by hand and rerun."
      ) from e
    logging.warning("Damaged checkpoint step %d moved to %s (not deleted).", step, dst)

  def restore_latest(self, abstract_model: Any, abstract_train: Any):
    """Restores the newest intact checkpoint onto the given (sharded) abstract trees.

    Returns ``(step, model_vars, train_vars, meta)`` or ``(None, None, None, None)``.
    The target shardings come from ``abstract_*``, so a checkpoint written on any device
    count restores onto the current mesh.
    """
    damaged = []

    def make_args(_):
      return ocp.args.Composite(
        **{
          rk_ckpt.MODEL_ITEM: ocp.args.StandardRestore(abstract_model),
          rk_ckpt.TRAIN_ITEM: ocp.args.StandardRestore(abstract_train),
          rk_ckpt.META_ITEM: ocp.args.JsonRestore(),
        }
      )

    step, restored = rk_ckpt.restore_newest_intact(
      self.manager, make_args, on_damaged=lambda s, e: damaged.append((s, e))
    )
    self.last_saved = step
    if damaged and step is None:
      # Nothing restores: more likely a code/model change than damage everywhere. Refuse
      # to start over (that would bury the work) and leave every checkpoint in place.
      detail = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in damaged)
      raise RestoreError(
        f"none of the checkpoints in {self.directory} can be restored ({detail}). "
        "Nothing was moved or deleted. If the model code changed, restore it; to start "
        "over, use a new --workdir."
      )
    if damaged:
      for s, e in damaged:
        self._quarantine(s, e)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("rknet_quarantine_damaged_checkpoints")
      self.manager.reload()
    if step is None:
      return None, None, None, None
    return (
      step,
      restored[rk_ckpt.MODEL_ITEM],
      restored[rk_ckpt.TRAIN_ITEM],
      restored[rk_ckpt.META_ITEM],
    )

  def best_step(self) -> int | None:
    """The kept step with the lowest validation error (None without validation saves)."""
    if self.manager._options.best_fn is None:
      return None
    step = self.manager.best_step()
    return step

  def wait_until_finished(self):
    """Blocks until every write committed; ``CheckpointWriteError`` if one failed."""
    if self._closed:
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:
      self._write_failed(e)

  def close(self):
    """Shuts orbax's threads down (also after a failed write, which ``manager.close`` skips).

    Never raises: errors are logged. Closing twice is a no-op.
    """
    if self._closed:
      return
    self._closed = True
    m = self.manager
    try:
      m.wait_until_finished()
    except Exception as e:
      logging.error("A checkpoint write of %s failed: %s: %s", self.directory, type(e).__name__, e)
    # CheckpointManager.close() stops at a failed wait; close its parts one by one.
    for part in (
      "_checkpointer",
      "_non_blocking_metadata_store",
      "_blocking_metadata_store",
      "_checkpoint_deleter",
    ):
      try:
        getattr(m, part).close()
      except Exception as e:
        logging.error(
          "Closing the checkpoint manager's %s failed: %s: %s", part, type(e).__name__, e
        )


# ------------------------------------------------------------------ what was trained
# Defined with the reader (rknet_jax.checkpoint: load_checkpoint checks model.json too).
checkpoint_metas = rk_ckpt.checkpoint_metas
trained_spec = rk_ckpt.trained_spec
resolved_spec = rk_ckpt.resolved_spec
spec_differences = rk_ckpt.spec_differences
check_model_file = rk_ckpt.check_model_file
