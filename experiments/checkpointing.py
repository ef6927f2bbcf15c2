"""Training-side checkpoints: save every N steps and each epoch, keep last K + best, resume.

Layout (shared with ``rknet_jax.checkpoint``, which reads it): ``workdir/checkpoints/<step>``
holds the orbax items ``model`` (``params``, ``batch_stats``), ``train`` (``opt_state``,
``step``, ``rng``) and ``meta`` (JSON). The step is the number of completed optimiser
steps; because the input pipeline makes batch ``s`` a pure function of ``(seed, s)``, the
step is also the position in the data stream, and resuming at it replays exactly the
batches an uninterrupted run would see.

Damaged checkpoints (a committed step whose files are truncated or missing; orbax raises
on restore) are skipped with a warning and moved to ``workdir/damaged_checkpoints/`` --
never deleted, never used -- and the run resumes from the previous intact one. Moving
them out of the way keeps orbax's "last K" bookkeeping and later saves of the same step
number working. If no checkpoint restores at all, the run stops with an error and moves
nothing (a changed model definition looks like that; starting over would bury the work).
"""

import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from rknet_jax import checkpoint as rk_ckpt

DAMAGED_SUBDIR = "damaged_checkpoints"
BEST_METRIC = "validation_top1_error"


class RunCheckpoints:
  """An orbax ``CheckpointManager`` with the run's save/keep/resume policy.

  Keeps the newest ``keep`` checkpoints plus the one with the lowest validation top-1
  error (only checkpoints saved with validation metrics compete for "best"). Saves are
  asynchronous: the arrays are copied off the devices before ``save`` returns, and the
  files are committed atomically (written to a temporary directory, then renamed), so a
  run killed mid-save leaves no half-written committed step.
  """

  def __init__(self, workdir: str, *, keep: int, track_best: bool):
    self.workdir = os.path.abspath(workdir)
    policies = [ocp_managers.LatestN(n=keep)]
    extra = {}
    if track_best:
      policies.append(ocp_managers.BestN(
          get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
          keep_checkpoints_without_metrics=False))
      extra = dict(best_fn=lambda m: m[BEST_METRIC], best_mode="min")
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True,
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies), **extra)
    self.manager = rk_ckpt.checkpoint_manager(self.workdir, read_only=False, options=options)

  @property
  def directory(self) -> str:
    return os.fspath(self.manager.directory)

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, model_vars: Any, train_vars: Any, meta: dict,
           metrics: Optional[dict] = None):
    """Saves (asynchronously) the state after ``step`` completed steps."""
    self.manager.save(
        step, args=ocp.args.Composite(**{
            rk_ckpt.MODEL_ITEM: ocp.args.StandardSave(model_vars),
            rk_ckpt.TRAIN_ITEM: ocp.args.StandardSave(train_vars),
            rk_ckpt.META_ITEM: ocp.args.JsonSave(meta)}),
        metrics=metrics, force=True)

  def _quarantine(self, step: int, error: Exception):
    """Moves a damaged step out of the manager's directory (process 0 only; kept, not deleted)."""
    if jax.process_index() != 0:
      return
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(self.workdir, DAMAGED_SUBDIR)
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    shutil.move(src, dst)
    with open(os.path.join(dst_root, "README.txt"), "a") as f:
      f.write(f"{os.path.basename(dst)}: restore failed with {type(error).__name__}: "
              f"{error}\n")
    logging.warning("Damaged checkpoint step %d moved to %s (not deleted).", step, dst)

  def restore_latest(self, abstract_model: Any, abstract_train: Any):
    """Restores the newest intact checkpoint onto the given (sharded) abstract trees.

    Returns ``(step, model_vars, train_vars, meta)`` or ``(None, None, None, None)``.
    The target shardings come from ``abstract_*``, so a checkpoint written on any device
    count restores onto the current mesh.
    """
    damaged = []

    def make_args(_):
      return ocp.args.Composite(**{
          rk_ckpt.MODEL_ITEM: ocp.args.StandardRestore(abstract_model),
          rk_ckpt.TRAIN_ITEM: ocp.args.StandardRestore(abstract_train),
          rk_ckpt.META_ITEM: ocp.args.JsonRestore()})

    step, restored = rk_ckpt.restore_newest_intact(
        self.manager, make_args, on_damaged=lambda s, e: damaged.append((s, e)))
    if damaged and step is None:
      # Nothing restores: more likely a code/model change than damage everywhere. Refuse
      # to start over (that would bury the work) and leave every checkpoint in place.
      detail = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in damaged)
      raise RuntimeError(
          f"none of the checkpoints in {self.directory} can be restored ({detail}). "
          "Nothing was moved or deleted. If the model code changed, restore it; to start "
          "over, use a new --workdir.")
    if damaged:
      for s, e in damaged:
        self._quarantine(s, e)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices("rknet_quarantine_damaged_checkpoints")
      self.manager.reload()
    if step is None:
      return None, None, None, None
    return (step, restored[rk_ckpt.MODEL_ITEM], restored[rk_ckpt.TRAIN_ITEM],
            restored[rk_ckpt.META_ITEM])

  def restore_model(self, step: int, abstract_model: Any):
    """Restores only the ``model`` item (params, batch_stats) of ``step``."""
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        rk_ckpt.MODEL_ITEM: ocp.args.StandardRestore(abstract_model)}))
    return restored[rk_ckpt.MODEL_ITEM]

  def best_step(self) -> Optional[int]:
    """The kept step with the lowest validation error (None without validation saves)."""
    if self.manager._options.best_fn is None:  # pylint: disable=protected-access
      return None
    step = self.manager.best_step()
    return step

  def wait_until_finished(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
