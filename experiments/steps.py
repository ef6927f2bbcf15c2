"""Training state and the jitted steps: init, train step, exact evaluation, global batches.

Parallelism: one ``jax.jit`` train step over a 1-D ``Mesh`` of every device of every host
(axis ``"data"``). The global batch is sharded along ``"data"``; parameters, BN statistics
and optimiser state are replicated. Because the step is written for the global batch,
batch-norm statistics are computed over the global batch (XLA inserts the all-reduces),
so one device and N devices compute the same function. Each host feeds only its own
slice of the batch (``jax.make_array_from_process_local_data``).

The train step also reports, per leaf of the parameters, BN statistics and optimiser state,
whether every value is finite (``metrics["finite"]``, one bool per leaf of
``checked_leaf_names``): a fused reduction, so the runner can refuse to checkpoint or report a
broken model without fetching the state.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from rknet_jax import conv as conv_lib
from rknet_jax import rk as rk_lib


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs: params, BN statistics, optimiser state, step, RNG."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

  def model_vars(self):
    """The ``model`` checkpoint item: ``{"params", "batch_stats"}``."""
    return {"params": self.params, "batch_stats": self.batch_stats}

  def train_vars(self):
    """The ``train`` checkpoint item: ``{"opt_state", "step", "rng"}``."""
    return {"opt_state": self.opt_state, "step": self.step, "rng": self.rng}

  def checked(self):
    """What the non-finite guard checks: params, BN statistics, optimiser state."""
    return {"params": self.params, "batch_stats": self.batch_stats, "opt_state": self.opt_state}


def checked_leaf_names(state: TrainState) -> list:
  """Paths (``params/...``) of the leaves of ``state.checked()``, in ``finite`` flag order."""
  flat = jax.tree_util.tree_flatten_with_path(state.checked())[0]
  return ["/".join(_key_name(k) for k in path) for path, _ in flat]


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def finite_flags(tree) -> jax.Array:
  """One bool per leaf of ``tree``: every value finite (integer leaves always are)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.ones((0,), bool)
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def make_mesh(devices=None) -> Mesh:
  """1-D data-parallel mesh over ``devices`` (default: every device of every host).

  Devices of several TPU slices (distinct ``slice_index``) are ordered as a hybrid mesh
  (``mesh_utils.create_hybrid_device_mesh``): the slices' ICI meshes one after the other, so
  the gradient all-reduces run within each slice over ICI and once across slices over the
  data-centre network, instead of treating the slices as one flat torus.  Devices may be
  compile-only ones (``jax.experimental.topologies``) for an ahead-of-time compile.
  """
  devices = jax.devices() if devices is None else list(devices)
  slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
  if len(slices) > 1:
    per_slice = len(devices) // len(slices)
    if per_slice * len(slices) != len(devices):
      raise ValueError(
        f"make_mesh: {len(devices)} devices over {len(slices)} slices; every "
        "slice must hold the same number of devices"
      )
    ordered = mesh_utils.create_hybrid_device_mesh((per_slice,), (len(slices),), devices)
    return Mesh(ordered.reshape(-1), ("data",))
  return Mesh(np.asarray(devices), ("data",))


def model_for_mesh(model, mesh: Mesh):
  """``model`` with ``conv_impl="auto"`` resolved for the platform of ``mesh``'s devices.

  ``"auto"`` (:func:`rknet_jax.conv.resolve_impl`) would otherwise be decided from the
  host's default backend when the step is traced, which is not the target when the mesh's
  devices are not that backend's (compile-only TPU devices of an ahead-of-time compile on
  a CPU host).  Dense blocks' ``dense_formulation="auto"`` follows the resolved convolution
  (:meth:`rknet_jax.blocks.DenseBlock.uses_buffer`), so it follows the same platform.  Same
  variables either way; every step builder of this module applies it.
  """
  platform = mesh.devices.flat[0].platform
  impl = conv_lib.resolve_impl(model.conv_impl, platform=platform)
  return model if impl == model.conv_impl else model.clone(conv_impl=impl)


def make_init_fn(model, tx, input_shape, mesh: Mesh):
  """Jitted ``seed -> TrainState``, created directly as replicated arrays on ``mesh``.

  Initialisation is traced with ``jax.threefry_partitionable(False)``: the values are
  as random, and XLA:CPU compiles the non-partitionable threefry several times faster
  (the state is replicated, so partitioning the random bits buys nothing here).
  """
  replicated = NamedSharding(mesh, P())
  model = model_for_mesh(model, mesh)

  def init(seed):
    key = jax.random.PRNGKey(seed)
    init_key, rng = jax.random.split(key)
    x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
    variables = model.init({"params": init_key}, x, train=False)
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      rng=rng,
    )

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
  """Softmax cross-entropy per example, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


IMPLICIT_RESIDUAL_MAX = "implicit_residual_max"
"""Train metric: the largest final residual of the step's implicit stage solves."""
IMPLICIT_RESIDUALS = "implicit_residuals"
"""Train metric: the final residual of each implicit solve, in ``implicit_solve_paths`` order."""


def _implicit_residuals(updates) -> dict:
  """``{module path: residual}`` sown in an apply's ``updates`` (empty for explicit models)."""
  return rk_lib.implicit_residuals(updates.get("intermediates", {}))


def implicit_solve_paths(model, input_shape) -> list:
  """Module paths of ``model``'s implicit stage solves (clique blocks, implicit tableau steps),
  in the order of the train step's ``implicit_residuals`` metric; empty for explicit models.
  Traced abstractly (no compilation, no arrays)."""
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)

  def apply(x):
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    _, updates = model.apply(variables, x, train=False, mutable=["intermediates"])
    return _implicit_residuals(updates)

  with jax.threefry_partitionable(False):
    return sorted(jax.eval_shape(apply, x))


def make_train_step(
  model,
  tx,
  schedule,
  mesh: Mesh,
  state_example: TrainState,
  report_implicit_residuals: bool = True,
):
  """Jitted ``(state, batch) -> (state, metrics)``; state donated, batch sharded.

  ``metrics``: ``loss``, ``top1_error``, ``learning_rate`` (scalars) and ``finite`` (one bool
  per leaf of the new state's ``checked()``, see ``checked_leaf_names``). For a model with
  implicit stages (IRKNet and CliqueNet clique blocks with updates, implicit tableau steps)
  also ``implicit_residual_max`` (the largest final residual of the step's implicit solves:
  the max-abs change of the stage values in a solve's last iteration,
  :func:`rknet_jax.rk.implicit_residuals`) and ``implicit_residuals`` (each solve's, in
  :func:`implicit_solve_paths` order). Reporting reads values the forward pass computes and
  changes nothing else; an explicit model sows nothing, so its step is the same program as
  with ``report_implicit_residuals=False``.
  """
  collections = ["batch_stats"] + (["intermediates"] if report_implicit_residuals else [])
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  state_sharding = jax.tree.map(lambda _: replicated, state_example)
  model = model_for_mesh(model, mesh)

  def step_fn(state: TrainState, batch):
    dropout_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      logits, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=collections,
        rngs={"dropout": dropout_key},
      )
      loss = cross_entropy(logits, batch["label"]).mean()
      return loss, (logits, updates["batch_stats"], _implicit_residuals(updates))

    (loss, (logits, batch_stats, residuals)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": loss,
      "top1_error": jnp.mean(jnp.argmax(logits, -1) != batch["label"]),
      "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
    }
    if residuals:  # known at trace time: an explicit model has none
      per_solve = jnp.stack([residuals[path] for path in sorted(residuals)]).astype(jnp.float32)
      metrics[IMPLICIT_RESIDUALS] = per_solve
      metrics[IMPLICIT_RESIDUAL_MAX] = jnp.max(per_solve)
    new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    metrics["finite"] = finite_flags(new_state.checked())
    return new_state, metrics

  def partitionable_step_fn(state: TrainState, batch):
    # Dropout bits drawn shard-locally: with the partitionable threefry each device draws
    # only its own examples' bits (the default draws the whole global batch's on every
    # device), and the masks do not depend on the number of devices.
    with jax.threefry_partitionable(True):
      return step_fn(state, batch)

  return jax.jit(
    partitionable_step_fn,
    in_shardings=(state_sharding, {"image": data, "label": data}),
    out_shardings=(state_sharding, replicated),
    donate_argnums=(0,),
  )


def make_eval_step(model, mesh: Mesh):
  """Jitted masked sums over a padded global batch: every real example counts once."""
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  model = model_for_mesh(model, mesh)

  def eval_fn(variables, batch):
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top1 = (topk[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    return {
      "count": jnp.sum(batch["mask"].astype(jnp.int32)),
      "loss_sum": jnp.sum(cross_entropy(logits, labels) * mask),
      "top1_correct": jnp.sum((top1 * mask).astype(jnp.int32)),
      "top5_correct": jnp.sum((top5 * mask).astype(jnp.int32)),
    }

  return jax.jit(
    eval_fn,
    in_shardings=(replicated, {"image": data, "label": data, "mask": data}),
    out_shardings=replicated,
  )


def _own_batch_stats(module) -> dict:
  """The ``batch_stats`` leaves declared by ``module`` itself (not its children)."""
  try:
    stats = module.variables.get("batch_stats", {})
  except Exception:  # unbound, or not inside apply
    return {}
  return {k: v for k, v in stats.items() if not isinstance(v, (dict, flax.core.FrozenDict))}


def _average_over_applications():
  """A method interceptor that makes a BatchNorm applied k times per forward pass hold
  the mean of its k batch statistics (instead of the last one).

  With momentum 0 every application overwrites the BN's ``mean``/``var`` with its own
  batch statistics; after the j-th application the interceptor replaces them by the
  running mean over applications 1..j. BatchNorms applied once (every BN of the ERK, DenseNet
  and CliqueNet blocks and of weight-shared IRK blocks) are left untouched; shared ones
  (a tableau RKNet's shared vector field f(t, y), fixed-point iterations of implicit
  tableaus, unshared IRK update layers with num_updates > 1) get the mean, as their running
  averages approximate one statistic for all applications.
  """
  applications = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    before = _own_batch_stats(module)
    out = next_fun(*args, **kwargs)
    for name, value in _own_batch_stats(module).items():
      if before.get(name) is value:
        continue  # this call did not update it (e.g. a declaration)
      key = (module.scope.path, name)
      j = applications[key] = applications.get(key, 0) + 1
      if j > 1:
        module.put_variable("batch_stats", name, before[name] + (value - before[name]) / j)
    return out

  return interceptor


def make_bn_stats_step(model, mesh: Mesh):
  """Jitted ``(variables, images) -> batch_stats`` of one global batch ("precise BN").

  A train-mode forward pass (batch statistics, no parameter update) of ``model`` with
  BatchNorm momentum 0, so each BatchNorm's returned ``mean``/``var`` are the statistics
  of this batch (flax's rule ``m * running + (1 - m) * batch``), averaged over the
  applications of a BatchNorm used more than once per pass (:func:`_average_over_applications`).
  Dropout is off: the statistics are those of the features the BatchNorms see at
  evaluation, where there is no dropout (dropout would add its variance shift). ``remat``
  is off (no backward pass). Data-parallel like the train step: images sharded along
  ``"data"``, statistics over the global batch.
  """
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  stats_model = model_for_mesh(model, mesh).clone(bn_momentum=0.0, dropout_rate=0.0, remat=False)

  def stats_fn(variables, images):
    # Zero running averages: the result depends on the parameters and images only.
    variables = {
      "params": variables["params"],
      "batch_stats": jax.tree.map(jnp.zeros_like, variables["batch_stats"]),
    }
    with nn.intercept_methods(_average_over_applications()):
      _, updates = stats_model.apply(variables, images, train=True, mutable=["batch_stats"])
    return updates["batch_stats"]

  return jax.jit(stats_fn, in_shardings=(replicated, data), out_shardings=replicated)


def precise_batch_stats(bn_stats_step, variables, batches, mesh, global_batch_size):
  """Population BatchNorm statistics of ``variables["params"]`` over ``batches`` ("precise
  BN", Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; pycls / fvcore
  ``update_bn_stats``): the exact mean over the batches of each batch's mean and (biased)
  variance, from ``make_bn_stats_step``. ``batches`` yields per-host training batches.
  """
  total, count = None, 0
  for local in batches:
    images = global_batch({"image": local["image"]}, mesh, global_batch_size)["image"]
    stats = bn_stats_step(variables, images)
    # One batch in flight at a time (the pass is short): a test worker on eight virtual CPU
    # devices aborted inside this loop, never in training, while its programs were queued
    # asynchronously; the cause is not known.
    total = jax.block_until_ready(stats if total is None else _tree_add(total, stats))
    count += 1
  if total is None:
    raise ValueError("precise BatchNorm statistics need at least one training batch")
  return _tree_divide(total, np.float32(count))


# One compiled program each for the whole tree (not one eager dispatch per leaf): on a
# multi-process mesh every process must launch the same programs in the same order, and
# fewer, larger programs keep that cheap.
_tree_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
_tree_divide = jax.jit(lambda tree, n: jax.tree.map(lambda x: x / n, tree))


def global_batch(local: dict, mesh: Mesh, global_batch_size: int) -> dict:
  """Per-host numpy batch -> global arrays sharded along ``"data"``."""
  sharding = NamedSharding(mesh, P("data"))
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
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
  return {
    "examples": n,
    "loss": float(sums["loss_sum"]) / n,
    "top1_error": 1.0 - int(sums["top1_correct"]) / n,
    "top5_error": 1.0 - int(sums["top5_correct"]) / n,
  }
