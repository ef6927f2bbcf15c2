"""What a training config means: its checks, its identity, and the model it builds.

``validate_config`` only checks: it reads (an existing ``run.json``) but never creates or
writes anything. The side effects of starting a run (creating the workdir, probing that it is
writable, taking its lock) live in ``experiments/rundir.py``.
"""

import json
import math

from absl import logging
import jax
from jax.sharding import Mesh
import ml_collections

from experiments import rundir
from rknet_jax import checkpoint as rk_ckpt
from rknet_jax import optim as rk_optim

LR_SCHEDULES = ("step", "cosine", "constant")
WEIGHT_DECAY_PARAMS = rk_optim.WEIGHT_DECAY_PARAMS
TEST_MODELS = ("final", "best")
# Fields recorded in run.json as what a workdir holds. A restart is refused when the
# dataset differs or the resolved model spec differs from the one the checkpoints were
# trained as (recorded in each checkpoint; else the workdir's model.json): the checkpoint
# would not fit, or would silently mean something else.
IDENTITY_FIELDS = ("model", "growth_rate", "stem", "model_kwargs", "dataset")
# Fields that define the data stream: a resume with other values continues, with a warning
# (the run is then no longer the same as an uninterrupted one).
STREAM_FIELDS = ("seed", "batch_size", "validation_size", "split_seed", "augment")
# The optimiser and its schedule (``optim.py``). Like the stream, a resume with other values
# continues with them, with a warning (lowering the learning rate after a non-finite stop
# is a fix, not a mistake), and ``run.json`` records each session's values and every change
# with the step it applies from (``rundir.write_run_file``): never one value for the whole run.
RECIPE_FIELDS = (
  "learning_rate",
  "lr_schedule",
  "lr_decay_fractions",
  "lr_decay_every_epochs",
  "lr_decay_factor",
  "warmup_epochs",
  "momentum",
  "nesterov",
  "weight_decay",
  "weight_decay_params",
)

NO_VALIDATION_FOR_BEST = (
  "config.test_model='best' needs a validation split (config.validation_size > 0, or "
  "npz/folder data with a validation split of their own); the test set is never used to "
  "select"
)

# Numeric fields: (name, kind, lower, lower_inclusive, upper, upper_inclusive, meaning).
# ``kind`` "int" accepts Python ints only; "real" accepts finite ints and floats.
_INF = math.inf
NUMERIC_FIELDS = (
  ("batch_size", "int", 1, True, _INF, False, "global training batch"),
  ("eval_batch_size", "int", 1, True, _INF, False, "global evaluation batch"),
  ("checkpoint_every_steps", "int", 1, True, _INF, False, "steps between checkpoints"),
  ("keep_checkpoints", "int", 1, True, _INF, False, "checkpoints kept"),
  ("log_every_steps", "int", 1, True, _INF, False, "steps between log lines"),
  ("eval_every_epochs", "int", 1, True, _INF, False, "epochs between validations"),
  ("num_train_steps", "int", -1, True, _INF, False, "steps (-1: use num_epochs)"),
  ("num_epochs", "real", 0, True, _INF, False, "training epochs"),
  ("learning_rate", "real", 0, False, _INF, False, "base learning rate"),
  ("momentum", "real", 0, True, 1, False, "SGD momentum"),
  ("weight_decay", "real", 0, True, _INF, False, "L2 weight decay"),
  ("warmup_epochs", "real", 0, True, _INF, False, "linear warm-up epochs"),
  ("lr_decay_factor", "real", 0, False, 1, True, "step-decay factor"),
  ("lr_decay_every_epochs", "real", 0, True, _INF, False, "epochs between step decays"),
  ("prefetch", "int", 1, True, _INF, False, "batches prepared ahead"),
  (
    "implicit_residual_tolerance",
    "real",
    0,
    False,
    _INF,
    False,
    "implicit-solve residual above which the run warns",
  ),
  ("shuffle_buffer", "int", 1, True, _INF, False, "ImageNet shuffle buffer"),
  (
    "precise_bn_batches",
    "int",
    0,
    True,
    _INF,
    False,
    "training batches of the precise BatchNorm statistics, 0 = off",
  ),
)


def _check_number(config, name, kind, low, low_incl, high, high_incl, meaning):
  if name not in config:
    return
  v = config[name]
  is_int = isinstance(v, int) and not isinstance(v, bool)
  ok_type = is_int if kind == "int" else (is_int or isinstance(v, float))
  if high == _INF and low_incl and kind == "int" and low in (0, 1):
    allowed = "a positive integer" if low == 1 else "a non-negative integer"
  elif high == _INF and not low_incl and low == 0:
    allowed = "a positive number"
  else:
    lo = ("[" if low_incl else "(") + f"{low:g}"
    hi = (f"{high:g}" if high != _INF else "inf") + ("]" if high_incl else ")")
    allowed = f"{'an integer' if kind == 'int' else 'a finite number'} in {lo}, {hi}"
  if (
    not ok_type
    or not math.isfinite(v)
    or v < low
    or (v == low and not low_incl)
    or v > high
    or (v == high and not high_incl)
  ):
    raise ValueError(f"config.{name} must be {allowed}; got {v!r} ({meaning})")


def mesh_size(mesh: Mesh | None) -> int:
  """Devices of ``mesh`` (every device when None)."""
  return jax.device_count() if mesh is None else mesh.devices.size


def identity(config) -> dict:
  """The config fields that say which model a workdir holds (JSON-able)."""
  out = {}
  for k in IDENTITY_FIELDS:
    v = config.get(k)
    out[k] = v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
  return json.loads(json.dumps(out))


def session_values(config) -> dict:
  """This session's values of the fields a resume may change (``RECIPE_FIELDS`` and
  ``STREAM_FIELDS``), JSON-able: recorded per session in ``run.json``'s history."""
  return json.loads(json.dumps({k: config.get(k) for k in RECIPE_FIELDS + STREAM_FIELDS}))


def total_steps(config, steps_per_epoch: int) -> int:
  """The run's optimiser steps: ``num_train_steps`` if set, else ``num_epochs`` epochs of
  ``steps_per_epoch`` (rounded down). ``ValueError`` when that is 0: nothing would train."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  total = int(config.num_epochs * steps_per_epoch)
  if total < 1:
    one_step = math.ceil(1e4 / steps_per_epoch) / 1e4
    raise ValueError(
      f"config.num_epochs={config.num_epochs!r} gives 0 training steps ({config.num_epochs!r}"
      f" x {steps_per_epoch} steps per epoch at batch {config.batch_size}, rounded down): "
      f"nothing would be trained. Use config.num_epochs >= {one_step:g} (one step), or "
      "set config.num_train_steps."
    )
  return total


def model_spec(config, num_classes: int):
  """The model of a config as a spec with every default filled in (what model.json keeps).

  ``config.model`` is a name (ready-made ones bring their rows' values); the config's
  ``growth_rate``, ``stem``, ``dtype``, ``remat`` and ``model_kwargs`` override it where set
  (None = the name's or the model's default). The spec validates every model option (the
  one place they are checked, :mod:`rknet_jax.spec`).
  """
  from rknet_jax import registry

  fields = dict(
    config.model_kwargs.to_dict(),
    growth_rate=config.growth_rate,
    num_classes=int(num_classes),
    stem=config.stem,
    dtype=config.dtype,
    remat=config.remat,
  )
  return registry.resolve(registry.parse_name(config.model, **fields))


def build_model(config, num_classes: int):
  """The only place the runner builds a model (via ``rknet_jax.create_model``)."""
  from rknet_jax import registry

  return registry.create_model(model_spec(config, num_classes))


def config_from_run(run: dict) -> ml_collections.ConfigDict:
  """The config a ``run.json`` recorded, with fields added since then at their defaults."""
  from experiments.configs import default

  config = default.get_config()
  recorded = ml_collections.ConfigDict(run["config"])
  with config.unlocked():
    for key in recorded.keys():
      config[key] = recorded[key]
  return config


def validate_config(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None):
  """Checks the config against itself, the devices and the workdir; changes nothing.

  Raises ``ValueError`` before any data, compilation or file write: unknown model (parsed
  by ``rknet_jax.create_model``, which builds a module object and nothing else), dataset,
  stem, dtype, schedule; every numeric field outside its range (``NUMERIC_FIELDS``); the
  global batch not divisible by the device and process counts; and a workdir that already
  holds a run of another model (its ``run.json``). A changed data-stream field
  (``STREAM_FIELDS``) is only warned about.
  """
  from experiments import input_pipeline

  input_pipeline.check_dataset_name(config.dataset)
  for field in NUMERIC_FIELDS:
    _check_number(config, *field)
  if config.num_train_steps == 0:  # not "unset" (-1): asking for no training at all
    raise ValueError(
      "config.num_train_steps=0 would train nothing: give a positive number of steps, or -1 "
      "to train config.num_epochs epochs"
    )
  if not config.num_epochs > 0 and not config.num_train_steps > 0:
    raise ValueError(
      f"config.num_epochs must be positive (or config.num_train_steps set); "
      f"got num_epochs={config.num_epochs!r}"
    )
  if config.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; allowed: {LR_SCHEDULES}")
  if any(
    not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f < 1
    for f in config.lr_decay_fractions
  ):
    raise ValueError(
      f"config.lr_decay_fractions must lie in (0, 1); got {config.lr_decay_fractions!r}"
    )
  if config.weight_decay_params not in WEIGHT_DECAY_PARAMS:
    raise ValueError(
      f"unknown weight_decay_params {config.weight_decay_params!r}; allowed: {WEIGHT_DECAY_PARAMS}"
    )
  if config.test_model not in TEST_MODELS:
    raise ValueError(f"unknown test_model {config.test_model!r}; allowed: {TEST_MODELS}")
  own_validation_possible = str(config.dataset).startswith(("npz:", "folder:"))
  if (
    config.test_model == "best" and config.validation_size <= 0 and not own_validation_possible
  ):  # npz/folder data: checked once the data is read
    raise ValueError(NO_VALIDATION_FOR_BEST)
  n_dev, n_proc = mesh_size(mesh), jax.process_count()
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % n_dev:
      raise ValueError(
        f"config.{name}={config[name]} (global) is not divisible by the {n_dev} devices; "
        f"use a multiple of {n_dev}"
      )
    if config[name] % n_proc:
      raise ValueError(f"config.{name}={config[name]} is not divisible by the {n_proc} processes")
  model_spec(config, num_classes=10)  # model name and options are checked here (no arrays)
  rundir.check_path(workdir)
  _check_previous_run(config, workdir)


def _json(value):
  return json.loads(
    json.dumps(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
  )


def _check_previous_run(config, workdir: str):
  """Refuses a workdir that holds a run of another model or dataset; warns on a changed data
  stream or recipe.

  The model is compared as resolved specs: this config's against the one the newest
  checkpoint was trained as (its ``meta``), else the workdir's ``model.json``, else the
  name in ``run.json``. Unset config fields that resolve to the same values are the same
  model, and a changed model default is caught rather than silently applied to old
  checkpoints. A ``model.json`` that differs from the checkpoints' spec is named (and
  rewritten from the config once the checkpoint restored).
  """
  from experiments import checkpointing

  previous_run = rundir.read_run_file(workdir)
  saved = rk_ckpt.read_model_spec(workdir)
  trained = checkpointing.trained_spec(workdir)
  diff, source = {}, "run.json"
  if previous_run is not None:
    old_config = previous_run.get("config", {})
    for fields, what in (
      (STREAM_FIELDS, "the data stream changes from here on"),
      (RECIPE_FIELDS, "training continues with the new value, and run.json records the change"),
    ):
      for k in fields:
        old_value, new_value = old_config.get(k, _json(config.get(k))), _json(config.get(k))
        if old_value != new_value:
          logging.warning(
            "Resuming %s with config.%s=%r (the run so far used %r): %s.",
            workdir,
            k,
            new_value,
            old_value,
            what,
          )
    old_dataset = previous_run.get("identity", {}).get("dataset", config.dataset)
    if old_dataset != config.dataset:
      diff["dataset"] = (old_dataset, config.dataset)
  if trained is None and saved is None and previous_run is not None:  # compare the names
    old_model = previous_run.get("identity", {}).get("model", config.model)
    if old_model != config.model:
      diff["model"] = (old_model, config.model)
  reference = trained[1] if trained is not None else saved
  if reference is not None:
    source = f"checkpoint step {trained[0]}" if trained is not None else "model.json"
    old = checkpointing.resolved_spec(reference)
    new = json.loads(model_spec(config, old.get("num_classes", 10)).to_json())
    diff.update(checkpointing.spec_differences(old, new))
  if diff:
    detail = "; ".join(f"{k}: workdir has {a!r}, config has {b!r}" for k, (a, b) in diff.items())
    raise ValueError(
      f"workdir {workdir!r} holds a run of a different model ({source}: {detail}). "
      "Use a new --workdir, or the same model settings to resume."
    )
  if trained is not None and saved is not None:
    try:
      checkpointing.check_model_file(workdir, saved)
    except ValueError as e:
      logging.warning("%s The config matches the checkpoints: model.json is rewritten from it.", e)
