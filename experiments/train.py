"""Training and evaluation of RKNets: ``train_and_evaluate(config, workdir)``.

Follows the paper's recipe (section 4.1): SGD with Nesterov momentum 0.9, weight decay
1e-4, learning rate 0.1 divided by 10 at 50% and 75% of training (CIFAR) or every 30
epochs (ImageNet); cosine decay and linear warm-up are options.

Parallelism: one ``jax.jit`` train step over a 1-D ``Mesh`` of every device of every host
(axis ``"data"``). The global batch is sharded along ``"data"``; parameters, BN statistics
and optimiser state are replicated. Because the step is written for the global batch,
batch-norm statistics are computed over the global batch (XLA inserts the all-reduces),
so one device and N devices compute the same function. Each host feeds only its own
slice of the batch (``jax.make_array_from_process_local_data``).

Never losing work: see ``experiments/checkpointing.py`` (save every N steps and at each
epoch end, keep last K + best, resume from the newest intact checkpoint, damaged ones
skipped), plus SIGTERM -> checkpoint and exit 0, and a non-finite loss -> error naming the
step, with no checkpoint of the broken state.
"""

import json
import math
import os
import signal
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments import metrics as metrics_lib
from rknet_jax import checkpoint as rk_ckpt
from rknet_jax import preprocessing as rk_preprocessing

LR_SCHEDULES = ("step", "cosine", "constant")
WEIGHT_DECAY_PARAMS = ("kernels", "all")
TEST_MODELS = ("final", "best")
RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
# Fields that define *which* model a workdir holds: a restart with a different value is
# refused (the checkpoint would not fit, or would silently mean something else).
IDENTITY_FIELDS = ("model", "growth_rate", "stem", "model_kwargs", "dataset")
# Fields that define the data stream: a resume with other values continues, with a warning
# (the run is then no longer the same as an uninterrupted one).
STREAM_FIELDS = ("seed", "batch_size", "validation_size", "split_seed", "augment")


# --------------------------------------------------------------------------- config
def _mesh_size(mesh: Optional[Mesh]) -> int:
  return jax.device_count() if mesh is None else mesh.devices.size


def _identity(config) -> dict:
  out = {}
  for k in IDENTITY_FIELDS:
    v = config.get(k)
    out[k] = v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
  return json.loads(json.dumps(out))


def _probe_write(directory: str):
  """Creates and removes a file: the only reliable writability test (root, read-only mounts)."""
  path = os.path.join(directory, f".write_probe.{os.getpid()}")
  with open(path, "w") as f:
    f.write("ok")
  os.remove(path)


def validate_config(config: ml_collections.ConfigDict, workdir: str,
                    mesh: Optional[Mesh] = None):
  """Checks the config and workdir; raises ``ValueError`` before any data or compilation.

  Checks: known model (parsed by ``rknet_jax.create_model``, which builds a module object
  and nothing else) and dataset; positive batch sizes, learning rate, epochs; the global
  batch divisible by the device count and the process count; a writable workdir; and a
  workdir that, if it already holds a run, holds one of the same model and dataset.
  """
  from experiments import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.check_dataset_name(config.dataset)
  for name in ("batch_size", "eval_batch_size", "checkpoint_every_steps", "keep_checkpoints",
               "log_every_steps", "eval_every_epochs"):
    v = config[name]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"config.{name} must be a positive integer; got {v!r}")
  if not config.num_epochs > 0 and not config.num_train_steps > 0:
    raise ValueError(f"config.num_epochs must be positive; got {config.num_epochs!r}")
  if not (isinstance(config.learning_rate, (int, float)) and config.learning_rate > 0
          and math.isfinite(config.learning_rate)):
    raise ValueError(f"config.learning_rate must be a positive number; got "
                     f"{config.learning_rate!r}")
  if config.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; allowed: {LR_SCHEDULES}")
  if any(not 0 < f < 1 for f in config.lr_decay_fractions):
    raise ValueError(f"config.lr_decay_fractions must lie in (0, 1); got "
                     f"{config.lr_decay_fractions!r}")
  if config.weight_decay < 0:
    raise ValueError(f"config.weight_decay must be >= 0; got {config.weight_decay!r}")
  if config.weight_decay_params not in WEIGHT_DECAY_PARAMS:
    raise ValueError(f"unknown weight_decay_params {config.weight_decay_params!r}; "
                     f"allowed: {WEIGHT_DECAY_PARAMS}")
  if config.test_model not in TEST_MODELS:
    raise ValueError(f"unknown test_model {config.test_model!r}; allowed: {TEST_MODELS}")
  if config.test_model == "best" and config.validation_size <= 0:
    raise ValueError("config.test_model='best' needs a validation split "
                     "(config.validation_size > 0); the test set is never used to select")
  n_dev, n_proc = _mesh_size(mesh), jax.process_count()
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % n_dev:
      raise ValueError(
          f"config.{name}={config[name]} (global) is not divisible by the {n_dev} devices; "
          f"use a multiple of {n_dev}")
    if config[name] % n_proc:
      raise ValueError(f"config.{name}={config[name]} is not divisible by the {n_proc} "
                       "processes")
  build_model(config, num_classes=10)  # model name and options are checked here (no arrays)

  if "://" not in workdir:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise ValueError(f"workdir {workdir!r} cannot be created: {e}") from e
    if not os.path.isdir(workdir) or not os.access(workdir, os.W_OK | os.X_OK):
      raise ValueError(f"workdir {workdir!r} is not a writable directory")
    try:
      _probe_write(workdir)
    except OSError as e:
      raise ValueError(f"workdir {workdir!r} is not writable: {e}") from e
    run_file = os.path.join(workdir, RUN_FILE)
    if os.path.exists(run_file):
      with open(run_file) as f:
        previous_run = json.load(f)
      previous = previous_run.get("identity", {})
      for k in STREAM_FIELDS:
        old_value = previous_run.get("config", {}).get(k, config.get(k))
        if old_value != config.get(k):
          logging.warning("Resuming %s with config.%s=%r (the run so far used %r): the data "
                          "stream changes from here on.", workdir, k, config.get(k), old_value)
      current = _identity(config)
      diff = {k: (previous.get(k), current[k]) for k in current
              if previous.get(k) != current[k]}
      if diff:
        detail = "; ".join(f"{k}: workdir has {a!r}, config has {b!r}"
                           for k, (a, b) in diff.items())
        raise ValueError(
            f"workdir {workdir!r} holds a run of a different model ({detail}). "
            "Use a new --workdir, or the same model settings to resume.")


# ---------------------------------------------------------------------------- model
def model_spec(config, num_classes: int):
  """The model of a config as a spec with every default filled in (what model.json keeps).

  ``config.model`` is a name (ready-made ones bring their rows' values); the config's
  ``growth_rate``, ``stem``, ``dtype``, ``remat`` and ``model_kwargs`` override it where set
  (None = the name's or the model's default).
  """
  from rknet_jax import registry  # pylint: disable=g-import-not-at-top
  fields = dict(config.model_kwargs.to_dict(), growth_rate=config.growth_rate,
                num_classes=int(num_classes), stem=config.stem, dtype=config.dtype,
                remat=config.remat)
  return registry.resolve(registry.parse_name(config.model, **fields))


def build_model(config, num_classes: int):
  """The only place the runner builds a model (via ``rknet_jax.create_model``)."""
  from rknet_jax import registry  # pylint: disable=g-import-not-at-top
  return registry.create_model(model_spec(config, num_classes))


# ------------------------------------------------------------------------ optimiser
def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int):
  """Per-step learning rate (section 4.1): step decay, cosine or constant, + warm-up."""
  base = float(config.learning_rate)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.lr_schedule == "step":
    if config.lr_decay_every_epochs > 0:
      every = int(config.lr_decay_every_epochs * steps_per_epoch)
      boundaries = list(range(every, total_steps, every))
    else:
      boundaries = [int(round(f * total_steps)) for f in config.lr_decay_fractions]
    main = optax.piecewise_constant_schedule(
        base, {b: float(config.lr_decay_factor) for b in boundaries if b > 0})
  elif config.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(base, max(total_steps - warmup, 1))
  else:
    main = optax.constant_schedule(base)
  if warmup <= 0:
    return main
  if config.lr_schedule == "cosine":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base, warmup), main], [warmup])
  # step/constant: boundaries are absolute steps, so warm-up only scales the start.
  return lambda step: main(step) * jnp.minimum(1.0, step / warmup)


def weight_decay_mask(params, which: str):
  """True for the parameters weight decay applies to.

  ``"kernels"``: the ``kernel`` leaves (all conv and dense weights); BN scale/bias and
  dense biases are not decayed. ``"all"``: every trainable parameter.
  """
  if which == "all":
    return jax.tree.map(lambda _: True, params)
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def make_optimizer(config, schedule):
  """SGD + Nesterov momentum with L2 weight decay added to the gradient (as torch SGD)."""
  return optax.chain(
      optax.add_decayed_weights(
          config.weight_decay,
          mask=lambda p: weight_decay_mask(p, config.weight_decay_params)),
      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))


# ------------------------------------------------------------------- state and steps
@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs: params, BN statistics, optimiser state, step, RNG."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

  def model_vars(self):
    return {"params": self.params, "batch_stats": self.batch_stats}

  def train_vars(self):
    return {"opt_state": self.opt_state, "step": self.step, "rng": self.rng}


def make_mesh(devices=None) -> Mesh:
  """1-D data-parallel mesh over ``devices`` (default: every device of every host)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), ("data",))


def make_init_fn(model, tx, input_shape, mesh: Mesh):
  """Jitted ``seed -> TrainState``, created directly as replicated arrays on ``mesh``.

  Initialisation is traced with ``jax.threefry_partitionable(False)``: the values are
  as random, and XLA:CPU compiles the non-partitionable threefry several times faster
  (the state is replicated, so partitioning the random bits buys nothing here).
  """
  replicated = NamedSharding(mesh, P())

  def init(seed):
    key = jax.random.PRNGKey(seed)
    init_key, rng = jax.random.split(key)
    x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
    variables = model.init({"params": init_key}, x, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=rng)

  with jax.threefry_partitionable(False):
    abstract = jax.eval_shape(init, 0)
  jitted = jax.jit(init, out_shardings=jax.tree.map(lambda _: replicated, abstract))

  def init_fn(seed: int) -> TrainState:
    with jax.threefry_partitionable(False):
      return jitted(jnp.asarray(seed, jnp.int32))

  return init_fn


def create_train_state(model, tx, input_shape, seed: int, mesh: Mesh) -> TrainState:
  """Initial ``TrainState`` (params, BN statistics, optimiser state, step 0, RNG)."""
  return make_init_fn(model, tx, input_shape, mesh)(seed)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def make_train_step(model, tx, schedule, mesh: Mesh, state_example: TrainState):
  """Jitted ``(state, batch) -> (state, metrics)``; state donated, batch sharded."""
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  state_sharding = jax.tree.map(lambda _: replicated, state_example)

  def step_fn(state: TrainState, batch):
    dropout_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"],
          train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
      loss = cross_entropy(logits, batch["label"]).mean()
      return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "top1_error": jnp.mean(jnp.argmax(logits, -1) != batch["label"]),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
    }
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(state_sharding, {"image": data, "label": data}),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def make_eval_step(model, mesh: Mesh):
  """Jitted masked sums over a padded global batch: every real example counts once."""
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))

  def eval_fn(variables, batch):
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top1 = (topk[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    return {"count": jnp.sum(batch["mask"].astype(jnp.int32)),
            "loss_sum": jnp.sum(cross_entropy(logits, labels) * mask),
            "top1_correct": jnp.sum((top1 * mask).astype(jnp.int32)),
            "top5_correct": jnp.sum((top5 * mask).astype(jnp.int32))}

  return jax.jit(eval_fn, in_shardings=(replicated, {"image": data, "label": data,
                                                      "mask": data}),
                 out_shardings=replicated)


def global_batch(local: dict, mesh: Mesh, global_batch_size: int) -> dict:
  """Per-host numpy batch -> global arrays sharded along ``"data"``."""
  sharding = NamedSharding(mesh, P("data"))
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(
        sharding, v, (global_batch_size,) + v.shape[1:])
  return out


def evaluate(eval_step, variables, batches, mesh, global_batch_size) -> dict:
  """Exact metrics over an eval iterator of padded, masked per-host batches."""
  sums = None
  for local in batches:
    local = {k: local[k] for k in ("image", "label", "mask")}
    out = eval_step(variables, global_batch(local, mesh, global_batch_size))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    raise ValueError("the evaluation iterator yielded no batches")
  sums = jax.device_get(sums)
  n = int(sums["count"])
  return {"examples": n, "loss": float(sums["loss_sum"]) / n,
          "top1_error": 1.0 - int(sums["top1_correct"]) / n,
          "top5_error": 1.0 - int(sums["top5_correct"]) / n}


# --------------------------------------------------------------------------- logging
class MetricsLog:
  """``metrics.jsonl`` + TensorBoard on process 0. Timing fields are kept under ``time_*``."""

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    self.writer = None
    if not self.enabled:
      return
    # A resumed run redoes the steps after its checkpoint: drop their records so the
    # file reads as one uninterrupted run.
    if os.path.exists(self.path):
      kept = []
      with open(self.path) as f:
        for line in f:
          try:
            rec = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut by a kill
          if rec.get("step", 0) <= resume_step:
            kept.append(json.dumps(rec))
      with open(self.path + ".tmp", "w") as f:
        f.write("".join(l + "\n" for l in kept))
      os.replace(self.path + ".tmp", self.path)
    try:
      self.writer = metrics_lib.TensorBoardWriter(os.path.join(workdir, "tensorboard"))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("TensorBoard summaries disabled (%s); metrics.jsonl is still written", e)

  def write(self, step: int, split: str, values: dict):
    if not self.enabled:
      return
    rec = {"step": int(step), "split": split}
    rec.update({k: (float(v) if not isinstance(v, int) else v) for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self.writer is not None:
      for k, v in values.items():
        if not k.startswith("time_"):
          self.writer.scalar(f"{split}/{k}", float(v), int(step))
        elif k == "time_images_per_sec":
          self.writer.scalar("perf/images_per_sec", float(v), int(step))

  def flush(self):
    if self.writer is not None:
      self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()


def _fmt_time(seconds: float) -> str:
  seconds = max(0, int(seconds))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------- main loop
def _install_sigterm():
  flag = {"set": False}

  def handler(signum, frame):  # pylint: disable=unused-argument
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
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray(flag["set"], np.int32))
  return bool(np.any(flags))


_FN_CACHE: dict = {}
_OPTIMIZER_FIELDS = ("learning_rate", "lr_schedule", "lr_decay_fractions",
                     "lr_decay_every_epochs", "lr_decay_factor", "warmup_epochs", "momentum",
                     "nesterov", "weight_decay", "weight_decay_params")


def _compiled_functions(config, spec, model, tx, schedule, input_shape, mesh,
                        schedule_steps):
  """(init_fn, train_step, eval_step), reused by later runs of the same setup in-process.

  Repeated ``train_and_evaluate`` calls (sweeps over seeds, tests, resuming in the same
  process) then skip recompilation; the key holds everything the functions depend on.
  """
  key = json.dumps([spec.to_json(), list(input_shape), [config[f] for f in _OPTIMIZER_FIELDS],
                    list(schedule_steps), [d.id for d in mesh.devices.flat],
                    list(mesh.axis_names)], sort_keys=True, default=str)
  if key not in _FN_CACHE:
    if len(_FN_CACHE) >= 8:
      _FN_CACHE.pop(next(iter(_FN_CACHE)))
    init_fn = make_init_fn(model, tx, input_shape, mesh)
    with jax.threefry_partitionable(False):
      example = jax.eval_shape(lambda: init_fn(0))
    _FN_CACHE[key] = (init_fn, make_train_step(model, tx, schedule, mesh, example),
                      make_eval_step(model, mesh))
  return _FN_CACHE[key]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh: Optional[Mesh] = None) -> dict:
  """Trains ``config.model`` on ``config.dataset`` in ``workdir``; returns ``results.json``.

  Resumes automatically from the newest intact checkpoint in ``workdir``. Returns the
  results dict (also written to ``workdir/results.json``), or ``{"preempted": True,
  "step": s}`` when SIGTERM stopped the run after checkpointing step ``s``.

  Args:
    config: see ``experiments/configs/default.py`` for the fields.
    workdir: where checkpoints, metrics, TensorBoard events and results go.
    mesh: the device mesh (default: every device, axis ``"data"``).
  """
  from experiments import input_pipeline  # pylint: disable=g-import-not-at-top
  from experiments.checkpointing import RunCheckpoints, BEST_METRIC  # pylint: disable=g-import-not-at-top

  validate_config(config, workdir, mesh)
  input_pipeline.preflight(config)
  mesh = make_mesh() if mesh is None else mesh
  info = input_pipeline.dataset_info(config)
  input_shape = tuple(info.image_shape)
  steps_per_epoch = int(input_pipeline.steps_per_epoch(config))
  total_steps = (int(config.num_train_steps) if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
  has_validation = input_pipeline.split_sizes(config)["validation"] > 0
  is_main = jax.process_index() == 0

  spec = model_spec(config, info.num_classes)
  model = build_model(config, info.num_classes)
  schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = make_optimizer(config, schedule)
  if is_main:
    rk_ckpt.write_model_spec(workdir, spec, input_shape)
    rk_preprocessing.write_data_spec(workdir, input_pipeline.data_spec(config))
    run = {"identity": _identity(config), "config": json.loads(config.to_json()),
           "num_classes": info.num_classes, "input_shape": list(input_shape),
           "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
    with open(os.path.join(workdir, RUN_FILE + ".tmp"), "w") as f:
      json.dump(run, f, indent=2)
    os.replace(os.path.join(workdir, RUN_FILE + ".tmp"), os.path.join(workdir, RUN_FILE))

  init_fn, train_step, eval_step = _compiled_functions(
      config, spec, model, tx, schedule, input_shape, mesh,
      (steps_per_epoch, total_steps))
  state = init_fn(config.seed)
  replicated = NamedSharding(mesh, P())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  ckpts = RunCheckpoints(workdir, keep=config.keep_checkpoints, track_best=has_validation)
  start_step, model_vars, train_vars, _ = ckpts.restore_latest(
      abstract.model_vars(), abstract.train_vars())
  if start_step is None:
    start_step = 0
    logging.info("Starting %s on %s from scratch in %s", config.model, config.dataset, workdir)
  else:
    state = TrainState(params=model_vars["params"], batch_stats=model_vars["batch_stats"],
                       **train_vars)
    if int(state.step) != start_step:
      raise ValueError(f"checkpoint {start_step} holds step {int(state.step)}")
    logging.info("Resumed from checkpoint step %d in %s", start_step, ckpts.directory)

  log = MetricsLog(workdir, start_step)
  flag, previous_handler = _install_sigterm()

  def meta(step):
    return {"step": int(step), "epoch": step / steps_per_epoch, "model": config.model,
            "dataset": config.dataset, "global_batch": config.batch_size,
            "devices": mesh.devices.size, "processes": jax.process_count()}

  def run_eval(variables, split):
    batches = input_pipeline.eval_iterator(
        config, split, batch_size=config.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    return evaluate(eval_step, variables, batches, mesh, config.eval_batch_size)

  pending = []  # (step, device metrics) not yet fetched
  last_saved = start_step if start_step > 0 else None
  timer = {"t": time.time(), "step": start_step}
  t_start = time.time()

  def flush(step):
    """Fetches pending metrics, stops on a non-finite loss, logs the window's means."""
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    pending.clear()
    for s, m in zip(steps, fetched):
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(
            f"non-finite training loss {float(m['loss'])} at step {s} (batch {s - 1}); "
            f"stopping without checkpointing this state. Last checkpoint: step "
            f"{last_saved}. Try a lower learning rate or float32.")
    now = time.time()
    dt = max(now - timer["t"], 1e-9)
    ips = (step - timer["step"]) * config.batch_size / dt
    timer.update(t=now, step=step)
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    eta = (total_steps - step) * dt / max(len(fetched), 1)
    mean.update(time_images_per_sec=ips, time_elapsed_sec=now - t_start)
    log.write(step, "train", mean)
    logging.info("step %d/%d (epoch %.2f)  loss %.4f  top1_err %.4f  lr %.4g  "
                 "%.1f img/s  ETA %s", step, total_steps, step / steps_per_epoch,
                 mean["loss"], mean["top1_error"], mean["learning_rate"], ips,
                 _fmt_time(eta))

  def save(step, metrics=None):
    nonlocal last_saved
    flush(step)  # never checkpoint a state whose loss went non-finite
    if last_saved == step:
      return
    ckpts.save(step, state.model_vars(), state.train_vars(), meta(step), metrics=metrics)
    last_saved = step

  preempted = False
  it = None
  try:
    it = input_pipeline.train_iterator(
        config, start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count())
    step = start_step
    while step < total_steps:
      local = next(it)
      batch = global_batch({"image": local["image"], "label": local["label"]}, mesh,
                           config.batch_size)
      state, metrics = train_step(state, batch)
      step += 1
      pending.append((step, metrics))
      epoch_end = step % steps_per_epoch == 0
      if step % config.log_every_steps == 0 or step == total_steps:
        flush(step)
      val = None
      if has_validation and (step == total_steps or (
          epoch_end and (step // steps_per_epoch) % config.eval_every_epochs == 0)):
        flush(step)
        val = run_eval(state.model_vars(), "validation")
        log.write(step, "validation", {"loss": val["loss"], "top1_error": val["top1_error"],
                                       "top5_error": val["top5_error"]})
        logging.info("step %d validation: top1_err %.4f top5_err %.4f (%d examples)", step,
                     val["top1_error"], val["top5_error"], val["examples"])
      if val is not None:
        save(step, {BEST_METRIC: val["top1_error"]})
      elif epoch_end or step % config.checkpoint_every_steps == 0 or step == total_steps:
        save(step)
      # One process: check the flag every step. Several: agree on it (a collective) at
      # log steps only, so every process stops at the same step.
      check = jax.process_count() == 1 or step % config.log_every_steps == 0
      if step < total_steps and check and _preempted(flag):
        save(step)
        preempted = True
        break
    flush(step)
    if step == total_steps and last_saved != step:
      save(step)
  finally:
    if it is not None and hasattr(it, "close"):
      it.close()
    ckpts.wait_until_finished()
    log.flush()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)

  if preempted:
    logging.warning("Preempted: checkpoint at step %d saved; rerun the same command to "
                    "continue.", step)
    ckpts.close()
    log.close()
    return {"preempted": True, "step": step}

  # ---- final test evaluation (final model, or validation-best if asked)
  which, test_step, test_vars = "final", step, state.model_vars()
  best = ckpts.best_step() if has_validation else None
  if config.test_model == "best" and best is not None:
    which, test_step = "best", best
    test_vars = ckpts.restore_model(best, abstract.model_vars())
  test = run_eval(test_vars, "test")
  log.write(step, "test", {"loss": test["loss"], "top1_error": test["top1_error"],
                           "top5_error": test["top5_error"]})
  ckpts.close()
  log.close()

  from rknet_jax.counting import count_flops, count_params  # pylint: disable=g-import-not-at-top
  val_hist = [r for r in metrics_lib.read_metrics(workdir) if r["split"] == "validation"]
  results = {
      "dataset": config.dataset, "model": config.model, "growth_rate": config.growth_rate,
      "params": int(count_params(model, input_shape)),
      "gflops": float(count_flops(model, input_shape)) / 1e9,
      "steps": int(step), "epochs": step / steps_per_epoch,
      "global_batch": config.batch_size, "devices": int(mesh.devices.size),
      "processes": jax.process_count(),
      "test_examples": test["examples"], "test_top1_error": test["top1_error"],
      "test_top5_error": test["top5_error"], "test_loss": test["loss"],
      "test_model": which, "test_checkpoint_step": int(test_step),
      "validation_examples": config.validation_size,
      "best_validation_step": best,
      "best_validation_top1_error": (min(r["top1_error"] for r in val_hist)
                                     if val_hist else None),
      "train_wall_time_sec": time.time() - t_start,
  }
  if is_main:
    with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
      json.dump(results, f, indent=2)
    try:
      metrics_lib.plot_curves(workdir, os.path.join(workdir, CURVES_FILE))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("could not draw %s: %s", CURVES_FILE, e)
  logging.info("Done: test top-1 error %.4f, top-5 %.4f on %d examples (%s model, step %d)",
               test["top1_error"], test["top5_error"], test["examples"], which, test_step)
  return results
