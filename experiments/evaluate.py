"""Evaluates a checkpoint of a training workdir exactly (every example counted once).

  python -m experiments.evaluate --workdir=DIR [--step=N] [--split=test]

Uses the run's own config (``DIR/run.json``) for the data and the model, and its own
preprocessing (``DIR/data.json``: mean/std as in training, never recomputed from the current
data); by default the newest intact checkpoint. Data whose fingerprint differs from the run's
are refused, naming what changed, unless ``--allow_data_change``. Prints one JSON line:
examples, loss, top-1 and top-5 error. A refusal (not a workdir, no such step, changed data,
a model.json that does not match the checkpoints) is one ``error: ...`` line and exit status 1
(``--verbose``: with the traceback). A run trained with precise BatchNorm
(``precise_bn_batches > 0``) is evaluated as the run evaluated it: with BN statistics
re-estimated for the checkpoint's weights over the same training batches.
"""

import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a training run.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: newest intact).")
flags.DEFINE_enum("split", "test", ["test", "validation"], "Which split to evaluate.")
flags.DEFINE_integer("batch_size", None, "Global eval batch (default: the run's).")
flags.DEFINE_string("data_dir", None, "Override the run's data_dir.")
flags.DEFINE_bool(
  "allow_data_change",
  False,
  "Evaluate on data that differ from the run's (its data.json fingerprint).",
)
flags.mark_flags_as_required(["workdir"])


def evaluate_checkpoint(
  workdir: str,
  step=None,
  split: str = "test",
  batch_size=None,
  data_dir=None,
  mesh=None,
  allow_data_change: bool = False,
) -> dict:
  """Exact metrics of checkpoint ``step`` (newest intact if None) of ``workdir`` on ``split``.

  The images are standardised with the run's ``data.json`` mean/std; data whose fingerprint
  differs from the run's raise ``input_pipeline.DataChanged`` unless ``allow_data_change``.
  """
  import jax

  from experiments import input_pipeline, steps

  run, config = _run_and_config(workdir, batch_size, data_dir)
  mesh = steps.make_mesh() if mesh is None else mesh
  if config.eval_batch_size % mesh.devices.size:
    raise ValueError(
      f"eval batch {config.eval_batch_size} is not divisible by the {mesh.devices.size} devices"
    )
  data = input_pipeline.load(config)  # this evaluation's data: read once
  data.preflight()
  stats = _run_data_stats(data, workdir, allow_data_change)
  model = _trained_model(workdir, config, run)
  found, variables, meta = _restore_variables(workdir, model, run, mesh, step)
  # A run with precise BatchNorm evaluated every checkpoint with statistics re-estimated for
  # its weights (the final one holds them): recompute them the same way.
  precise = "precise_bn_batches" in run["config"] and config.precise_bn_batches > 0
  if precise and meta.get("batch_stats") != "precise":
    variables = _precise_variables(config, run, model, variables, int(found), mesh, stats, data)
  eval_step = steps.make_eval_step(model, mesh)
  batches = data.eval_iterator(
    split,
    batch_size=config.eval_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    stats=stats,
  )
  out = steps.evaluate(eval_step, variables, batches, mesh, config.eval_batch_size)
  out.update(
    step=int(found),
    split=split,
    model=config.model,
    dataset=config.dataset,
    batch_stats="precise" if precise else "running_averages",
  )
  return out


def _run_and_config(workdir: str, batch_size, data_dir):
  """The workdir's ``run.json`` and its config, with the evaluation's overrides."""
  from experiments import run_config, rundir

  run = rundir.read_run_file(workdir)
  if run is None:
    raise FileNotFoundError(
      f"{os.fspath(rundir.path(workdir, rundir.RUN_FILE))} not found: not a training workdir"
    )
  config = run_config.config_from_run(run)
  if batch_size is not None:
    config.eval_batch_size = batch_size
  if data_dir is not None:
    config.data_dir = data_dir
  return run, config


def _run_data_stats(data, workdir: str, allow_data_change: bool):
  """The run's mean/std (``data.json``), after checking the data are the run's; None for a
  workdir without ``data.json`` (statistics of the current data, with a warning)."""
  from rknet_jax import preprocessing

  recorded = preprocessing.read_data_spec(workdir)  # (checked: a bad field is an error)
  if recorded is None:
    logging.warning(
      "%s has no data.json (written by an older version): standardising with "
      "statistics of the current data",
      workdir,
    )
    return None
  _, change = data.bind_data_spec(
    recorded,
    allow_change=allow_data_change,
    what="to evaluate",
    fix="pass --allow_data_change (allow_data_change=True) to evaluate on them with the "
    "run's mean/std",
  )
  if change:
    logging.warning("Evaluating on other data than the run's (allow_data_change): %s", change)
  return (recorded["mean"], recorded["std"])


def _trained_model(workdir: str, config, run: dict):
  """The model as trained: the workdir's ``model.json`` (checked against the checkpoints),
  else the run's config."""
  from experiments import checkpointing, run_config, rundir
  from rknet_jax import checkpoint as rk_ckpt

  saved = rk_ckpt.read_model_spec(workdir)  # the model as trained (defaults frozen)
  checkpointing.check_model_file(workdir, saved)  # names an edited or foreign model.json
  if saved is not None:
    return rk_ckpt.model_from_spec(saved, os.fspath(rundir.path(workdir, rk_ckpt.MODEL_FILE)))
  return run_config.build_model(config, run["num_classes"])


def _restore_variables(workdir: str, model, run: dict, mesh, step):
  """``(step, variables, meta)`` of checkpoint ``step`` (None: the newest intact one),
  replicated on ``mesh``, read without writing anything."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from rknet_jax import checkpoint as rk_ckpt

  target = rk_ckpt.abstract_variables(model, run["input_shape"], sharding=NamedSharding(mesh, P()))
  manager = rk_ckpt.checkpoint_manager(workdir, read_only=True)
  try:
    return rk_ckpt.restore_model(manager, target, step=step)
  finally:
    manager.close()


def _precise_variables(config, run: dict, model, variables, step: int, mesh, stats, data):
  """``variables`` with the precise BatchNorm statistics the run evaluated ``step`` with."""
  from experiments import steps, train

  return train.precise_model_vars(
    config,
    variables,
    step,
    int(run["steps_per_epoch"]),
    steps.make_bn_stats_step(model, mesh),
    mesh,
    stats=stats,
    data=data,
  )


def main(argv):
  from experiments import metrics

  metrics.console_logging()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  out = evaluate_checkpoint(
    FLAGS.workdir,
    FLAGS.step,
    FLAGS.split,
    FLAGS.batch_size,
    FLAGS.data_dir,
    allow_data_change=FLAGS.allow_data_change,
  )
  logging.info("%s", out)
  print(json.dumps(out))


if __name__ == "__main__":
  from experiments import cli

  cli.run(main, config_flag=None)
