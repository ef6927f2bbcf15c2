"""The runner's own steps, as the benchmarks time them.

Every benchmark that times or compiles a training or inference step builds it here, from the
functions ``train_and_evaluate`` runs (``experiments/train.py`` ``build_steps``: the model of
``experiments/run_config.py``, the optimiser and schedule of ``experiments/optim.py``,
``make_init_fn`` / ``make_train_step`` / ``make_eval_step`` of ``experiments/steps.py``), so
what is timed is what a run executes: the paper's recipe (section 4.1: SGD, Nesterov momentum
0.9, weight decay 1e-4 on the weights, lr 0.1 with its step schedule), the BatchNorm
statistics update, the step's metrics and its non-finite guard. Inference is the runner's
evaluation step (eval-mode forward pass and the masked loss / top-1 / top-5 sums).

The steps run on a mesh of one device (a benchmark measures one chip); the dense-block
formulation, convolution formulation, dtype and remat are model options of the config
(``config.model_kwargs``), never a patched library global.
"""

from experiments.configs import default

TOP_LEVEL_FIELDS = ("growth_rate", "stem", "dtype", "remat")
"""Model fields that are config fields of their own; every other one is a ``model_kwargs``."""


def model_config(model: str, **model_fields):
  """The runner's default config for ``model`` with ``model_fields`` set, e.g.
  ``model_config("ERKNet-1x1 1x1-B", growth_rate=4, dtype="bfloat16", conv_impl="xla",
  dense_formulation="buffer")``; None leaves a field at the name's / model's default."""
  config = default.get_config()
  config.model = model
  for name, value in model_fields.items():
    if value is None:
      continue
    if name in TOP_LEVEL_FIELDS:
      config[name] = value
    else:
      config.model_kwargs[name] = value
  return config


def _named_spec(config):
  """The spec of ``config.model`` with the config's growth rate and stem (where set)."""
  from rknet_jax import registry

  named = {k: config[k] for k in ("growth_rate", "stem") if config[k] is not None}
  return registry.parse_name(config.model, **named)


def num_classes_of(config) -> int:
  """The classes of ``config.model`` by its name (e.g. 1000 for an ImageNet row, else 10)."""
  return int(_named_spec(config).num_classes)


def image_shape(config) -> tuple:
  """The input of ``config.model`` by its stem: 224x224x3 for ``"imagenet"``, else 32x32x3."""
  return (224, 224, 3) if _named_spec(config).stem == "imagenet" else (32, 32, 3)


def build(
  config, input_shape, *, num_classes=None, mesh=None, steps_per_epoch=1000, total_steps=300_000
):
  """``(experiments.train.build_steps(...), mesh)`` for ``config``: the ``RunSteps`` (model,
  ``init_fn``, ``train_step``, ``eval_step``) on ``mesh`` (default: the first local device).
  ``num_classes`` defaults to the name's; the schedule's length only places its boundaries,
  which do not change the work of a step."""
  import jax

  from experiments import steps as steps_lib
  from experiments import train

  if mesh is None:
    mesh = steps_lib.make_mesh(jax.local_devices()[:1])
  classes = num_classes_of(config) if num_classes is None else num_classes
  built = train.build_steps(config, classes, tuple(input_shape), mesh, steps_per_epoch, total_steps)
  return built, mesh


def batch_shapes(input_shape, batch: int, mesh, *, eval_batch: bool = False) -> dict:
  """Abstract global batch of the train step (``eval_batch``: of the eval step, with a mask),
  sharded along the mesh's ``"data"`` axis, for ``jit(...).lower``."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  data = NamedSharding(mesh, P("data"))
  out = {
    "image": jax.ShapeDtypeStruct((batch,) + tuple(input_shape), jnp.float32, sharding=data),
    "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data),
  }
  if eval_batch:
    out["mask"] = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=data)
  return out


def random_batch(input_shape, batch: int, num_classes: int, mesh, *, eval_batch: bool = False):
  """A global batch of standard-normal images and uniform labels (seed 0) on ``mesh``
  (``eval_batch``: every example counted, mask all True)."""
  import numpy as np

  from experiments import steps as steps_lib

  rng = np.random.default_rng(0)
  local = {
    "image": rng.standard_normal((batch,) + tuple(input_shape), dtype=np.float32),
    "label": rng.integers(0, num_classes, batch).astype(np.int32),
  }
  if eval_batch:
    local["mask"] = np.ones((batch,), bool)
  return steps_lib.global_batch(local, mesh, batch)


def compile_step(built, mesh, mode: str, state, batch):
  """The compiled train (``mode="train"``) or eval step of ``built`` for ``state`` (a
  ``TrainState``, concrete or abstract) and ``batch``; ``run(state) -> (state, loss)``
  runs it once (the train step donates ``state``; the eval step's loss is its sum)."""
  if mode == "train":
    compiled = built.train_step.lower(state, batch).compile()

    def run(state):
      state, metrics = compiled(state, batch)
      return state, metrics["loss"]
  else:
    compiled = built.eval_step.lower(state.model_vars(), batch).compile()

    def run(state):
      return state, compiled(state.model_vars(), batch)["loss_sum"]

  return compiled, run
