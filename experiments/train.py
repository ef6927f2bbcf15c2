"""The training loop: ``train_and_evaluate(config, workdir)``, read top to bottom.

One call: check the config (``run_config``), take the workdir (``rundir``: lock, metadata),
build the model, optimiser (``optim``) and jitted steps (``steps``), restore the newest intact
checkpoint (``checkpointing``), then train, evaluating, logging (``metrics``), checkpointing
and checking for preemption at the steps ``is_time`` says, and finally test and write
``results.json``. Evaluation uses precise BatchNorm statistics (``precise_bn_batches`` > 0: BN
statistics re-estimated for the current weights over training batches, also saved in the final
checkpoint) or the running averages.

Never losing work, never reporting a broken model: checkpoints every N steps and at each
epoch end; SIGTERM -> checkpoint and exit 0; every checkpoint write is checked, and a failed
one stops the run with an error; parameters, BN statistics and optimiser state are checked
for non-finite values (flags computed inside the jitted step) before every save and at the
end, and a non-finite state stops the run naming the step and the first bad leaf, with no
checkpoint of it (so keep-last-K never rotates out the newest finite one).

No empty or repeated results: a config that resolves to 0 steps is refused before any work,
and rerunning a finished run (same total steps, results written) returns its
``results.json`` without training, testing or writing anything.
"""

import contextlib
import dataclasses
import itertools
import json
import math
import signal
import time
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from experiments import checkpointing, compiler_memory, optim, progress, run_config, rundir
from experiments import metrics as metrics_lib
from experiments import steps as steps_lib
from experiments.data import prepare as prepare_lib
from rknet_jax import checkpoint as rk_ckpt
from rknet_jax import preprocessing as rk_preprocessing

clock = time.time  # wall clock of the run's training time (tests replace it)


def is_time(step: int, every: int, total: int, *, last: bool = True) -> bool:
  """Whether a periodic action (log, evaluate, save, preemption check) is due after ``step``.

  Due every ``every`` steps (``every <= 0``: never periodically) and, when ``last``, after the
  final step ``total``.
  """
  return (every > 0 and step % every == 0) or (last and step == total)


class NonFiniteError(FloatingPointError):
  """The training loss or state became non-finite; nothing of it was checkpointed."""


def _finite_guard(leaf_names, ckpts):
  """``check(step, host_metrics)`` raising ``NonFiniteError`` on a non-finite loss or state."""

  def check(step, m):
    finite = np.asarray(m["finite"], bool)
    if np.isfinite(m["loss"]) and finite.all():
      return
    bad = [n for n, ok in zip(leaf_names, finite) if not ok]
    what = (
      f"first non-finite leaf {bad[0]} ({len(bad)} of {len(finite)} state arrays non-finite)"
      if bad
      else "the state arrays are still finite"
    )
    kept = (
      "no checkpoint was written yet"
      if ckpts.last_saved is None
      else f"the newest checkpoint, step {ckpts.last_saved}, is finite and kept"
    )
    raise NonFiniteError(
      f"non-finite training state at step {step} (batch {step - 1}): loss "
      f"{float(m['loss'])}, {what}. Stopping without checkpointing this state; {kept}. "
      "Check the input data for non-finite or extreme values (labels, pixel scale), or "
      "try a lower learning rate or float32."
    )

  return check


def _implicit_residual_watch(tolerance: float, model, input_shape):
  """``check(step, host_metrics)`` warning once per run when an implicit tableau's stage
  solve ended with a final residual above ``tolerance`` (``config.implicit_residual_tolerance``):
  which solve, at which step, and what makes it converge.

  Only tableau RKNets are judged: their fixed-point iterations are meant to solve the stage
  equations. A clique block (IRKNet, CliqueNet) runs the paper's fixed number of alternate
  updates of learned maps that need not contract (section 3.3.2); its residual is logged, not
  warned about, since no setting makes it converge. Explicit models report nothing."""
  if not hasattr(model.spec(), "tableau"):
    return lambda step, m: None
  warned = False

  def check(step, m):
    nonlocal warned
    if warned or not m.get(steps_lib.IMPLICIT_RESIDUAL_MAX, 0.0) > tolerance:
      return
    warned = True
    residuals = np.asarray(m[steps_lib.IMPLICIT_RESIDUALS], np.float64)
    paths = steps_lib.implicit_solve_paths(model, input_shape)
    worst = int(np.argmax(residuals))
    solve = paths[worst] if len(paths) == len(residuals) else f"number {worst + 1}"
    logging.warning(
      "Step %d: the implicit stage solve of block %s did not converge: its final residual "
      "(max |change| of the stage values in the last iteration) is %.3g > "
      "config.implicit_residual_tolerance=%g (%d of %d solves above it). The block computes "
      "an approximation of its implicit Runge-Kutta step, not the step. To converge: more "
      "fixed-point iterations (config.model_kwargs.implicit_iterations), a smaller step size "
      "(config.model_kwargs.step_size: the iteration contracts when the step size times the "
      "vector field's Lipschitz constant is small), or an explicit tableau. Warned once per "
      "run; metrics.jsonl records %s at every logged step.",
      step,
      solve,
      residuals[worst],
      tolerance,
      int(np.sum(residuals > tolerance)),
      len(residuals),
      steps_lib.IMPLICIT_RESIDUAL_MAX,
    )

  return check


def _checks(*checks):
  """One ``check(step, host_metrics)`` running ``checks`` in order."""

  def check(step, m):
    for c in checks:
      c(step, m)

  return check


# Errors with which a run stops itself (the CLI prints their message and exits 1).
RUN_STOPPED = (
  NonFiniteError,
  checkpointing.CheckpointWriteError,
  checkpointing.RestoreError,
  rundir.WorkdirBusy,
  rk_ckpt.CheckpointUnreadable,
  prepare_lib.DownloadUnavailableError,
)


# ------------------------------------------------------------------------- preemption
def _install_sigterm():
  flag = {"set": False}

  def handler(signum, frame):
    flag["set"] = True
    logging.warning("SIGTERM received: checkpointing after the current step, then exiting")

  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread
    return flag, None
  return flag, previous


def _preempted(flag) -> bool:
  """True on every process once any process received SIGTERM."""
  if jax.process_count() == 1:
    return flag["set"]
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.asarray(flag["set"], np.int32))
  return bool(np.any(flags))


# ------------------------------------------------------------------------ precise BN
def precise_bn_batches(config, steps_per_epoch: int) -> int:
  """Training batches precise BatchNorm averages over: ``config.precise_bn_batches``, at most
  one epoch (0: off, the running averages are evaluated)."""
  return min(int(config.get("precise_bn_batches", 0)), int(steps_per_epoch))


def precise_bn_first_batch(step: int, steps_per_epoch: int) -> int:
  """First training batch of the precise statistics of the model after ``step`` steps.

  The batches are the first ones of the epoch of the last batch trained on (batch
  ``step - 1``): a pure function of ``(seed, step)`` like the whole data stream, so a
  resumed run and ``experiments.evaluate`` recompute the same statistics, and a streamed
  source starts them at an epoch boundary (nothing to skip).
  """
  return (max(int(step), 1) - 1) // steps_per_epoch * steps_per_epoch


def precise_model_vars(
  config,
  model_vars,
  step: int,
  steps_per_epoch: int,
  bn_stats_step,
  mesh,
  *,
  stats=None,
  data=None,
) -> dict:
  """``model_vars`` with BatchNorm statistics re-estimated for its parameters over
  ``precise_bn_batches`` training batches (``steps.precise_batch_stats``) of ``data`` (the
  run's ``input_pipeline.RunData``; None: built from ``config``), standardised with ``stats``
  (the run's ``data.json`` mean/std; None: the data's own)."""
  from experiments import input_pipeline

  data = input_pipeline.load(config) if data is None else data
  it = data.train_iterator(
    start_step=precise_bn_first_batch(step, steps_per_epoch),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    stats=stats,
  )
  try:
    bn_stats = steps_lib.precise_batch_stats(
      bn_stats_step,
      model_vars,
      itertools.islice(it, precise_bn_batches(config, steps_per_epoch)),
      mesh,
      config.batch_size,
    )
  finally:
    it.close()
  return {"params": model_vars["params"], "batch_stats": bn_stats}


def _warn_if_too_short_for_momentum(spec, total_steps: int):
  """Running averages still weighted > 1% by their initial values at the end: say so."""
  momentum = getattr(spec, "bn_momentum", None)
  if not momentum or not 0 < momentum < 1:
    return
  needed = math.ceil(math.log(0.01) / math.log(momentum))
  if total_steps < needed:
    logging.warning(
      "BatchNorm momentum %g needs %d steps for the running averages' initial values to "
      "weigh less than 1%%; this run has %d steps, so evaluation would use statistics that "
      "lag the weights. Use --config.precise_bn_batches=50 (precise BatchNorm "
      "statistics) or a lower --config.model_kwargs.bn_momentum.",
      momentum,
      needed,
      total_steps,
    )


# ---------------------------------------------------------------- compiled functions
_FN_CACHE: dict = {}


def _compiled_functions(config, spec, model, tx, schedule, input_shape, mesh, schedule_steps):
  """(init_fn, train_step, eval_step, bn_stats_step), reused by later runs of the same setup.

  Repeated ``train_and_evaluate`` calls (sweeps over seeds, tests, resuming in the same
  process) then skip recompilation; the key holds everything the functions depend on.
  """
  recipe = [config[f] for f in run_config.RECIPE_FIELDS]
  key = json.dumps(
    [
      spec.to_json(),
      list(input_shape),
      recipe,
      list(schedule_steps),
      [d.id for d in mesh.devices.flat],
      list(mesh.axis_names),
    ],
    sort_keys=True,
    default=str,
  )
  if key not in _FN_CACHE:
    if len(_FN_CACHE) >= 8:
      _FN_CACHE.pop(next(iter(_FN_CACHE)))
    init_fn = steps_lib.make_init_fn(model, tx, input_shape, mesh)
    with jax.threefry_partitionable(False):
      example = jax.eval_shape(lambda: init_fn(0))
    _FN_CACHE[key] = (
      init_fn,
      steps_lib.make_train_step(model, tx, schedule, mesh, example),
      steps_lib.make_eval_step(model, mesh),
      steps_lib.make_bn_stats_step(model, mesh),
    )
  return _FN_CACHE[key]


@dataclasses.dataclass(frozen=True)
class RunSteps:
  """The model, optimiser and jitted steps ``train_and_evaluate`` trains and evaluates with."""

  spec: Any
  model: Any
  schedule: Any
  tx: Any
  init_fn: Any
  train_step: Any
  eval_step: Any
  bn_stats_step: Any


def build_steps(
  config, num_classes: int, input_shape, mesh, steps_per_epoch: int, total_steps: int
):
  """The run's model (``run_config``), optimiser and schedule (``optim``) and jitted steps
  (``steps``): the one place they are put together, for ``train_and_evaluate`` and for the
  benchmarks that time what it runs (``benchmarks/runner_steps.py``)."""
  spec = run_config.model_spec(config, num_classes)
  model = run_config.build_model(config, num_classes)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = optim.make_optimizer(config, schedule)
  fns = _compiled_functions(
    config, spec, model, tx, schedule, input_shape, mesh, (steps_per_epoch, total_steps)
  )
  return RunSteps(spec, model, schedule, tx, *fns)


# -------------------------------------------------------------------------- the run
def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, mesh: Mesh | None = None
) -> dict:
  """Trains ``config.model`` on ``config.dataset`` in ``workdir``; returns ``results.json``.

  Resumes automatically from the newest intact checkpoint in ``workdir`` (to the config's
  total steps, also when that total changed). Returns the results dict (also written to
  ``workdir/results.json``), or ``{"preempted": True, "step": s}`` when SIGTERM stopped the
  run after checkpointing step ``s``.

  Args:
    config: see ``experiments/configs/default.py`` for the fields.
    workdir: where checkpoints, metrics, TensorBoard events and results go (any path
      ``etils.epath`` and orbax support, e.g. ``gs://bucket/run``).
    mesh: the device mesh (default: every device, axis ``"data"``).
  """
  from experiments import input_pipeline

  run_config.validate_config(config, workdir, mesh)  # pure: raises before any side effect
  compiler_memory.install()  # peak RSS: the compiler's freed memory goes back to the OS
  data = input_pipeline.load(config)  # the run's data: read once, asked everything
  data.preflight()
  run_config.total_steps(config, data.steps_per_epoch())  # 0 steps: refused
  rundir.prepare(workdir, subdirs=(rk_ckpt.CHECKPOINT_SUBDIR,))
  lock = _take_workdir(workdir)
  try:
    return _run(config, workdir, steps_lib.make_mesh() if mesh is None else mesh, data)
  finally:
    lock.release()


def _take_workdir(workdir: str) -> rundir.WorkdirLock:
  """Process 0 takes the workdir lock; every process stops if it could not."""
  lock, busy = rundir.WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except rundir.WorkdirBusy as e:
      busy = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    refused = multihost_utils.broadcast_one_to_all(np.int32(busy is not None))
    if busy is None and int(refused):
      busy = rundir.WorkdirBusy(f"process 0 could not take the lock of {workdir!r}; see its log")
  if busy is not None:
    raise busy
  return lock


def _finished_results(config, workdir: str, total_steps: int) -> dict | None:
  """The results of the run ``config`` already finished in ``workdir``, else None.

  Finished: ``run.json`` at ``total_steps`` with the same ``test_model``, and
  ``results.json`` of the newest checkpoint, at or past ``total_steps``. Then nothing is
  trained or tested (no new metrics row, no wall-time growth) and one line says so.
  """
  results, run = rundir.read_results(workdir), rundir.read_run_file(workdir)
  if (
    results is None
    or run is None
    or run.get("total_steps") != total_steps
    or run.get("config", {}).get("test_model") != config.test_model
  ):
    return None
  steps = checkpointing.checkpoint_metas(workdir)
  if not steps or results.get("steps") != max(steps) or max(steps) < total_steps:
    return None
  now = json.loads(config.to_json())
  differ = sorted(k for k in now if run["config"].get(k, now[k]) != now[k])
  logging.warning(
    "%s already holds this run, finished (step %d, total %d; results.json: test top-1 "
    "error %.4f): nothing trained or tested, its results are returned unchanged%s. To "
    "train further raise num_epochs or num_train_steps; for a new run use a new --workdir.",
    workdir,
    results["steps"],
    total_steps,
    results.get("test_top1_error", float("nan")),
    f" (config fields that differ from the run's: {', '.join(differ)})" if differ else "",
  )
  return results


@dataclasses.dataclass
class _Run:
  """One run's pieces, handed from phase to phase: setup, restore, train loop, final test.

  ``state`` is the current ``TrainState`` (replaced by every train step) and ``step`` its
  step; the evaluation helpers below always see the current ones. ``data`` is the run's
  ``input_pipeline.RunData``, built once: every batch, evaluation pass and precise-BN batch
  comes from it.
  """

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  data: Any
  input_shape: tuple
  num_classes: int
  steps_per_epoch: int
  total_steps: int
  split_sizes: dict
  # setup
  spec: Any = None
  model: Any = None
  init_fn: Any = None
  train_step: Any = None
  eval_step: Any = None
  bn_stats_step: Any = None
  n_precise: int = 0
  abstract: Any = None
  ckpts: checkpointing.RunCheckpoints | None = None
  # restore
  state: Any = None
  start_step: int = 0
  wall_time_before: float = 0.0
  restored_precise: bool = False
  previous_run: dict | None = None
  stats: Any = None
  params: int = 0
  gflops: float = 0.0
  # train loop
  step: int = 0
  log: Any = None
  bar: Any = None
  window: Any = None
  t_start: float = 0.0
  precise_cache: dict = dataclasses.field(default_factory=dict)

  @property
  def validation_examples(self) -> int:
    return self.split_sizes["validation"]

  @property
  def has_validation(self) -> bool:
    return self.validation_examples > 0

  def wall_time(self) -> float:
    """Training time of every session that led to this one, this one's so far included."""
    return self.wall_time_before + clock() - self.t_start

  def run_eval(self, variables, split: str) -> dict:
    """Exact metrics of ``variables`` on ``split``."""
    batches = self.data.eval_iterator(
      split,
      batch_size=self.config.eval_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      stats=self.stats,
    )
    return steps_lib.evaluate(
      self.eval_step, variables, batches, self.mesh, self.config.eval_batch_size
    )

  def precise_vars(self, model_vars, step: int) -> dict:
    """``model_vars`` with precise BatchNorm statistics for the model after ``step``."""
    return precise_model_vars(
      self.config,
      model_vars,
      step,
      self.steps_per_epoch,
      self.bn_stats_step,
      self.mesh,
      stats=self.stats,
      data=self.data,
    )

  def evaluated_vars(self, step: int) -> dict:
    """The model as evaluated at ``step``: precise BN statistics, or the running ones."""
    if not self.n_precise:
      return self.state.model_vars()
    if step not in self.precise_cache:
      self.precise_cache.clear()
      # The final model's pass is announced (the last silent gap otherwise); validations are not.
      with _precise_phase(self) if step >= self.total_steps else contextlib.nullcontext():
        self.precise_cache[step] = self.precise_vars(self.state.model_vars(), step)
    return self.precise_cache[step]

  def save(self, step: int, val: dict | None = None):
    """Checkpoints the current state at ``step`` (``val``: its validation metrics)."""
    self.window.flush(step)  # checks the state: a non-finite one is never checkpointed
    # The final checkpoint (the exported model) holds the statistics it is tested with;
    # every other one the running averages a resumed run continues from.
    final = bool(self.n_precise) and step >= self.total_steps
    config = self.config
    self.ckpts.save(
      step,
      self.evaluated_vars(step) if final else self.state.model_vars(),
      self.state.train_vars(),
      {
        "batch_stats": "precise" if final else "running_averages",
        "precise_bn_batches": self.n_precise if final else 0,
        "step": int(step),
        "epoch": step / self.steps_per_epoch,
        "model": config.model,
        "dataset": config.dataset,
        "global_batch": config.batch_size,
        "devices": self.mesh.devices.size,
        "processes": jax.process_count(),
        "train_wall_time_sec": self.wall_time(),
      },
      metrics=None if val is None else {checkpointing.BEST_METRIC: val["top1_error"]},
    )


def _run(config, workdir: str, mesh: Mesh, data) -> dict:
  """``train_and_evaluate`` once the config is checked and the workdir is ours."""
  run = _plan(config, workdir, mesh, data)
  finished = _finished_results(config, workdir, run.total_steps)
  if finished is not None:
    return finished
  _setup(run)
  try:  # orbax's threads are shut down on every way out
    _restore(run)  # the metadata is written only once this succeeded
    _record_run(run)
    preempted = _train(run)
  except BaseException:
    run.ckpts.close()
    raise
  if preempted:
    logging.warning(
      "Preempted: checkpoint at step %d saved; rerun the same command to continue.", run.step
    )
    run.log.close()
    run.ckpts.close()
    return {"preempted": True, "step": run.step}
  return _test(run)


# ---------------------------------------------------------------------- setup
def _plan(config, workdir: str, mesh: Mesh, data) -> _Run:
  """The run's data shapes and sizes (from ``data``, the run's ``input_pipeline.RunData``);
  refuses ``test_model="best"`` without validation."""
  info = data.info
  steps_per_epoch = int(data.steps_per_epoch())
  run = _Run(
    config=config,
    workdir=workdir,
    mesh=mesh,
    data=data,
    input_shape=tuple(info.image_shape),
    num_classes=info.num_classes,
    steps_per_epoch=steps_per_epoch,
    total_steps=run_config.total_steps(config, steps_per_epoch),
    split_sizes=data.split_sizes(),
  )
  if config.test_model == "best" and not run.has_validation:
    raise ValueError(run_config.NO_VALIDATION_FOR_BEST)
  return run


def _setup(run: _Run):
  """Model, optimiser, compiled steps, the initial state and the checkpoint manager."""
  config = run.config
  built = build_steps(
    config, run.num_classes, run.input_shape, run.mesh, run.steps_per_epoch, run.total_steps
  )
  run.spec, run.model = built.spec, built.model
  run.init_fn, run.train_step = built.init_fn, built.train_step
  run.eval_step, run.bn_stats_step = built.eval_step, built.bn_stats_step
  run.n_precise = precise_bn_batches(config, run.steps_per_epoch)
  if not run.n_precise:
    _warn_if_too_short_for_momentum(run.spec, run.total_steps)
  run.state = run.init_fn(config.seed)
  replicated = NamedSharding(run.mesh, P())
  run.abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), run.state
  )
  run.ckpts = checkpointing.RunCheckpoints(
    run.workdir,
    keep=config.keep_checkpoints,
    track_best=run.has_validation,
    model_spec=dict(json.loads(run.spec.to_json()), input_shape=list(run.input_shape)),
  )


# -------------------------------------------------------------------- restore
def _restore(run: _Run):
  """The newest intact checkpoint into ``run.state`` (none: a fresh start at step 0)."""
  start_step, model_vars, train_vars, meta = run.ckpts.restore_latest(
    run.abstract.model_vars(), run.abstract.train_vars()
  )
  run.previous_run = rundir.read_run_file(run.workdir)
  # Only the final checkpoint of a finished run holds precise statistics.
  run.restored_precise = bool(meta) and meta.get("batch_stats") == "precise"
  if run.restored_precise and start_step < run.total_steps:
    logging.warning(
      "Checkpoint %d is the final one of a finished run and holds precise BatchNorm "
      "statistics; the running averages continue from them. The parameters train as in "
      "an uninterrupted run (training normalises with batch statistics), only the "
      "running averages differ.",
      start_step,
    )
  if start_step is None:
    run.start_step, run.wall_time_before = 0, 0.0
    if jax.process_index() == 0:
      rundir.move_aside_outputs(run.workdir)
    return
  run.state = steps_lib.TrainState(
    params=model_vars["params"], batch_stats=model_vars["batch_stats"], **train_vars
  )
  if int(run.state.step) != start_step:
    raise ValueError(f"checkpoint {start_step} holds step {int(run.state.step)}")
  run.start_step = start_step
  run.wall_time_before = float(meta.get("train_wall_time_sec", 0.0))
  logging.info("Resumed from checkpoint step %d in %s", start_step, run.ckpts.directory)
  old_total, total_steps = (run.previous_run or {}).get("total_steps"), run.total_steps
  if old_total is not None and old_total != total_steps:
    logging.warning(
      "The run so far trained toward %d steps; this config asks for %d: %s. The "
      "learning-rate schedule follows the new total.",
      old_total,
      total_steps,
      f"continuing from step {start_step} to {total_steps}"
      if start_step < total_steps
      else f"step {start_step} is already past it: no more training, the step "
      f"{start_step} model is tested",
    )


def _record_run(run: _Run):
  """Binds the run's data (fingerprint, mean/std), writes its metadata, prints the summary."""
  config, workdir, start_step = run.config, run.workdir, run.start_step
  # The run's data: its fingerprint must match, and its data.json's mean/std stay.
  data_json, data_change = run.data.bind_data_spec(
    rk_preprocessing.read_data_spec(workdir) if start_step else None,
    allow_change=bool(config.get("allow_data_change", False)),
  )
  if data_change:
    logging.warning("Continuing on new data (config.allow_data_change=True): %s", data_change)
  run.stats = (data_json["mean"], data_json["std"])
  if jax.process_index() == 0:
    rk_ckpt.write_model_spec(workdir, run.spec, run.input_shape)
    rk_preprocessing.write_data_spec(workdir, data_json)
    run_record = {
      "identity": run_config.identity(config),
      "config": json.loads(config.to_json()),
      "num_classes": run.num_classes,
      "input_shape": list(run.input_shape),
      "steps_per_epoch": run.steps_per_epoch,
      "total_steps": run.total_steps,
      "data_fingerprint": data_json["fingerprint"],
    }
    data_changes = list((run.previous_run or {}).get("data_changes", []))  # kept across sessions
    if data_change:
      data_changes.append({"at_step": int(start_step), "change": data_change})
    if data_changes:
      run_record["data_changes"] = data_changes
    rundir.write_run_file(
      workdir,
      run_record,
      start_step=start_step,
      total_steps=run.total_steps,
      session=run_config.session_values(config),
    )
  from rknet_jax.counting import count_flops, count_params

  run.params = count_params(run.model, run.input_shape)
  run.gflops = count_flops(run.model, run.input_shape) / 1e9
  progress.start_summary(
    config=config,
    workdir=workdir,
    start_step=start_step,
    total_steps=run.total_steps,
    steps_per_epoch=run.steps_per_epoch,
    split_sizes=run.split_sizes,
    input_shape=run.input_shape,
    params=run.params,
    gflops=run.gflops,
    num_devices=run.mesh.devices.size,
  )


# ----------------------------------------------------------------- train loop
def _train(run: _Run) -> bool:
  """Trains from ``run.start_step`` to ``run.total_steps``, logging, evaluating and saving at
  the steps ``is_time`` says; returns whether SIGTERM stopped it (after a checkpoint)."""
  config, total_steps = run.config, run.total_steps
  run.log = metrics_lib.MetricsLog(run.workdir, run.start_step)
  run.bar = progress.ProgressBar(total_steps, run.start_step)
  run.window = metrics_lib.TrainWindow(
    run.log,
    start_step=run.start_step,
    total_steps=total_steps,
    steps_per_epoch=run.steps_per_epoch,
    global_batch=config.batch_size,
    check=_checks(
      _finite_guard(steps_lib.checked_leaf_names(run.state), run.ckpts),
      _implicit_residual_watch(config.implicit_residual_tolerance, run.model, run.input_shape),
    ),
    bar=run.bar,
  )
  train_step = progress.announce_first_call(run.train_step, "compiling the train step", run.bar)
  run.eval_step = progress.announce_first_call(
    run.eval_step, "compiling the evaluation step", run.bar
  )
  run.bn_stats_step = progress.announce_first_call(
    run.bn_stats_step, "compiling the BatchNorm statistics step", run.bar
  )
  run.t_start = clock()
  flag, previous_handler = _install_sigterm()
  preempt_every = 1 if jax.process_count() == 1 else config.log_every_steps
  preempted, it, run.step = False, None, run.start_step
  try:
    it = run.data.train_iterator(
      start_step=run.start_step,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      stats=run.stats,
    )
    while run.step < total_steps:
      local = next(it)
      batch = steps_lib.global_batch(
        {"image": local["image"], "label": local["label"]}, run.mesh, config.batch_size
      )
      run.state, step_metrics = train_step(run.state, batch)
      run.step += 1
      step = run.step
      run.window.add(step, step_metrics)
      if is_time(step, config.log_every_steps, total_steps):
        run.window.flush(step)
        run.ckpts.check_for_errors()  # a failed background write stops the run here
      val = _validate_if_due(run)
      if (
        val is not None
        or is_time(step, run.steps_per_epoch, total_steps)
        or is_time(step, config.checkpoint_every_steps, total_steps)
      ):
        run.save(step, val)
      if is_time(step, preempt_every, total_steps, last=False) and _preempted(flag):
        run.save(step)
        preempted = True
        break
    run.window.flush(run.step)
    if run.step >= total_steps and run.ckpts.last_saved != run.step:
      run.save(run.step)
  finally:
    if it is not None and hasattr(it, "close"):
      it.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
    run.bar.close()
    run.log.flush()
    run.ckpts.wait_until_finished()  # raises CheckpointWriteError if a write failed
  return preempted


def _validate_if_due(run: _Run) -> dict | None:
  """The validation metrics at ``run.step`` when an evaluation is due (logged), else None."""
  step = run.step
  if not run.has_validation or not is_time(
    step, run.config.eval_every_epochs * run.steps_per_epoch, run.total_steps
  ):
    return None
  run.window.flush(step)
  val = run.run_eval(run.evaluated_vars(step), "validation")
  run.log.write(step, "validation", {k: val[k] for k in ("loss", "top1_error", "top5_error")})
  logging.info(
    "step %d validation: top1_err %.4f top5_err %.4f (%d examples)",
    step,
    val["top1_error"],
    val["top5_error"],
    val["examples"],
  )
  return val


# ----------------------------------------------------------------- final test
def _test(run: _Run) -> dict:
  """Tests the final model (or the validation-best one if asked); writes ``results.json``."""
  config, step, n_precise = run.config, run.step, run.n_precise
  which, test_step, test_vars = "final", step, run.evaluated_vars(step)
  # The running averages (None: the state holds a finished run's precise statistics).
  running_vars = (
    None if run.restored_precise and run.start_step >= step else (run.state.model_vars())
  )
  best = run.ckpts.best_step() if run.has_validation else None
  if config.test_model == "best" and best is not None and best != step:
    which, test_step = "best", best
    _, test_vars, meta = rk_ckpt.restore_model(
      run.ckpts.manager, run.abstract.model_vars(), step=best
    )
    running_vars = None if meta.get("batch_stats") == "precise" else test_vars
    if n_precise:
      with _precise_phase(run):
        test_vars = run.precise_vars(test_vars, best)
  elif config.test_model == "best" and best is not None:
    which = "best"
  with progress.phase(f"testing the {which} model (step {test_step}) on the test split", run.bar):
    test = run.run_eval(test_vars, "test")
  running_test = test if not n_precise else None
  if n_precise and running_vars is not None:
    with progress.phase("testing the running-average BatchNorm statistics too", run.bar):
      running_test = run.run_eval(running_vars, "test")
  run.log.write(step, "test", {k: test[k] for k in ("loss", "top1_error", "top5_error")})
  run.log.close()
  run.ckpts.close()
  results = _results(run, test, running_test, which=which, test_step=test_step, best=best)
  if jax.process_index() == 0:
    rundir.write_results(run.workdir, results)
    try:
      metrics_lib.plot_curves(run.workdir, rundir.path(run.workdir, rundir.CURVES_FILE))
    except Exception as e:
      logging.warning("could not draw %s: %s", rundir.CURVES_FILE, e)
  logging.info(
    "Done: test top-1 error %.4f, top-5 %.4f on %d examples (%s model, step %d)",
    test["top1_error"],
    test["top5_error"],
    test["examples"],
    which,
    test_step,
  )
  return results


def _precise_phase(run: _Run):
  """A re-estimation of BatchNorm statistics as a logged phase (``progress.phase``)."""
  n = precise_bn_batches(run.config, run.steps_per_epoch)
  return progress.phase(f"re-estimating BatchNorm statistics over {n} training batches", run.bar)


def _results(
  run: _Run, test: dict, running_test: dict | None, *, which: str, test_step: int, best: int | None
) -> dict:
  """The ``results.json`` dict of the tested run."""
  config, step = run.config, run.step
  val_hist = [r for r in metrics_lib.read_metrics(run.workdir) if r["split"] == "validation"]
  return {
    "dataset": config.dataset,
    "model": config.model,
    "growth_rate": config.growth_rate,
    "params": int(run.params),
    "gflops": float(run.gflops),
    "steps": int(step),
    "epochs": step / run.steps_per_epoch,
    "global_batch": config.batch_size,
    "devices": int(run.mesh.devices.size),
    "processes": jax.process_count(),
    "test_examples": test["examples"],
    "test_top1_error": test["top1_error"],
    "test_top5_error": test["top5_error"],
    "test_loss": test["loss"],
    "test_model": which,
    "test_checkpoint_step": int(test_step),
    # Precise BatchNorm: the test numbers above use statistics re-estimated over this many
    # training batches (0: the running averages); the running averages' error is below.
    "precise_bn_batches": run.n_precise,
    "running_averages_test_top1_error": (
      None if running_test is None else running_test["top1_error"]
    ),
    "validation_examples": run.validation_examples,
    "best_validation_step": best,
    "best_validation_top1_error": (min(r["top1_error"] for r in val_hist) if val_hist else None),
    # Training time of every session that led to the final checkpoint.
    "train_wall_time_sec": run.wall_time(),
    # Recipe / data-stream fields a resume changed, with the step they apply from.
    "changes": (rundir.read_run_file(run.workdir) or {}).get("changes", []),
  }
