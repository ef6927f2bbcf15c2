"""Trained RKNets from an experiments workdir: ``load_checkpoint(workdir)``.

A workdir written by ``experiments.train.train_and_evaluate`` holds

* ``model.json``: the model's spec (``rknet_jax.spec``, every default filled in, so a
  later change of a default does not change it) and the input image shape, so the model
  can be rebuilt without the training config;
* ``data.json``: the training preprocessing (``rknet_jax.preprocessing``: per-channel
  mean/std of the training split, image shape, class names);
* ``checkpoints/<step>/``: orbax checkpoints with the items ``model`` (``params`` and
  ``batch_stats``, the two collections of the model contract), ``train`` (optimiser
  state, step, RNG) and ``meta`` (JSON: step, epoch, dataset, ...).

Every saved array's checksum (``checksums``: CRC-32 of its bytes, with dtype and shape) is
recorded in the ``meta`` item at save time; :func:`restore_newest_intact` verifies it, so a
flipped bit is a damaged checkpoint, skipped like a truncated one.

This module only reads. The training-side writer lives in ``experiments/checkpointing.py``;
the two share the layout constants and :func:`restore_newest_intact` defined here.
"""

from collections.abc import Callable, Sequence
import errno
import json
import logging
import os
from typing import Any, NamedTuple
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rknet_jax import preprocessing, workdir_files

CHECKPOINT_SUBDIR = "checkpoints"
MODEL_FILE = "model.json"
MODEL_ITEM = "model"
TRAIN_ITEM = "train"
META_ITEM = "meta"
CHECKSUMS_KEY = "checksums"
MODEL_SPEC_KEY = "model_spec"  # in each step's meta: the resolved spec + input shape


class ChecksumError(ValueError):
  """A restored array differs from the one saved: the checkpoint's bytes are damaged."""


class Prediction(NamedTuple):
  """What ``predict(images, return_probs=True)`` returns for N images."""

  labels: np.ndarray  # int [N]: the most probable class of each image
  class_names: list[str]  # the name of that class (data.json's class_names)
  probabilities: np.ndarray  # float32 [N, num_classes]: softmax of the logits
  logits: np.ndarray  # float32 [N, num_classes]


class CheckpointUnreadable(PermissionError):
  """A checkpoint cannot be read (permissions): not damaged, and left where it is."""


# model.json files of the first format, {"name", "kwargs", "input_shape"}, were written
# when every model's BatchNorm defaulted to these values; they are pinned on reading.
_LEGACY_BN = {"bn_momentum": 0.9, "bn_epsilon": 1e-5}
# ... and the runner passed its IRK options to every model: dropped where a family has
# no such field and the value is the one it always was.
_LEGACY_IRK = {"num_updates": 1, "update_order": "gauss_seidel", "share_weights": True}


def write_model_spec(workdir: str, spec, input_shape: Sequence[int]):
  """Writes ``model.json``: the model's spec (every default filled in) and input shape.

  The file is ``spec.to_json()`` with the key ``input_shape`` added (see
  :mod:`rknet_jax.spec`); it is replaced atomically.
  """
  from rknet_jax import registry

  data = json.loads(registry.resolve(spec).to_json())
  data["input_shape"] = [int(d) for d in input_shape]
  workdir_files.write_json(workdir_files.path(workdir, MODEL_FILE), data)


def read_model_spec(workdir: str) -> dict | None:
  """The ``model.json`` of ``workdir`` as a dict, or None when there is none."""
  return workdir_files.read_json(
    workdir_files.path(workdir, MODEL_FILE), "the trained model's spec"
  )


def saved_spec(data: dict, source: str = MODEL_FILE):
  """The spec of a ``model.json`` dict (this format, or the first: name + kwargs).

  ``ValueError`` naming ``source`` (the file) for a dict that is no model spec (a field
  missing, unknown or of the wrong type: a file edited or copied from elsewhere).
  """
  try:
    return _saved_spec(data)
  except (TypeError, KeyError, ValueError, AttributeError) as e:
    raise ValueError(
      f"{source} is not a model spec this version can read ({type(e).__name__}: {e}): it "
      "was edited or copied from elsewhere. Put the run's own model.json back (rerunning its "
      "training command rewrites it)."
    ) from e


def _saved_spec(data: dict):
  from rknet_jax import names, registry
  from rknet_jax import spec as spec_lib

  data = {k: v for k, v in data.items() if k != "input_shape"}
  if "family" in data:
    return spec_lib.from_json(data)
  name, kwargs = data["name"], {**_LEGACY_BN, **data["kwargs"]}
  if name.startswith("DenseNet"):
    kept = ()
  elif name.startswith("CliqueNet"):
    kept = ("num_updates", "update_order")
  else:
    kept = () if names.parse(name).tableau else tuple(_LEGACY_IRK)
  for key, value in _LEGACY_IRK.items():
    if key not in kept and kwargs.get(key) == value:
      del kwargs[key]
  return registry.parse_name(name, **kwargs)


def model_from_spec(data: dict, source: str = MODEL_FILE):
  """The model of a ``model.json`` dict (see :func:`saved_spec`), built, not initialised."""
  from rknet_jax import registry

  return registry.create_model(saved_spec(data, source))


# ------------------------------------------------------------------ what was trained
def checkpoint_metas(workdir: str) -> dict[int, dict | None]:
  """Each committed step's ``meta`` item (None where it cannot be read); no array is read.

  Reads the item's JSON file directly (orbax's JSON handler writes ``<step>/meta/metadata``;
  uncommitted saves live in temporary folders whose names are not a step number), which is
  quick and logs nothing. Empty when the workdir has no checkpoints folder.
  """
  folder = workdir_files.path(workdir, CHECKPOINT_SUBDIR)
  if not folder.is_dir():
    return {}
  out = {}
  for step_dir in folder.iterdir():
    if not step_dir.name.isdigit():
      continue
    try:
      meta = json.loads((step_dir / META_ITEM / "metadata").read_text())
    except (OSError, ValueError):
      meta = None
    out[int(step_dir.name)] = meta if isinstance(meta, dict) else None
  return dict(sorted(out.items()))


def trained_spec(workdir: str):
  """``(step, spec dict)`` of the newest checkpoint that recorded its model spec, or None."""
  specs = {
    s: m[MODEL_SPEC_KEY]
    for s, m in checkpoint_metas(workdir).items()
    if m is not None and MODEL_SPEC_KEY in m
  }
  if not specs:
    return None
  step = max(specs)
  return step, specs[step]


def resolved_spec(data: dict, source: str = MODEL_FILE) -> dict:
  """A ``model.json``-style dict as the resolved spec's JSON (every default filled in),
  without ``input_shape``: two of them are the same model exactly when they are equal."""
  from rknet_jax import registry

  return json.loads(registry.resolve(saved_spec(data, source)).to_json())


def spec_differences(old: dict, new: dict) -> dict[str, tuple]:
  """``{field: (old value, new value)}`` where two resolved spec dicts differ (the derived
  ``name`` only when nothing else does)."""
  diff = {
    k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
  }
  if len(diff) > 1:
    diff.pop("name", None)
  return diff


def check_model_file(workdir: str, saved: dict | None):
  """Raises ``ValueError`` when ``model.json`` (``saved``) is not the model the checkpoints
  were trained as (each step's ``meta`` records it, ``MODEL_SPEC_KEY``), naming the fields
  that differ, or is no model spec at all."""
  file = os.fspath(workdir_files.path(workdir, MODEL_FILE))
  trained = trained_spec(workdir)
  if saved is None or trained is None:
    return
  step, spec = trained
  diff = spec_differences(
    resolved_spec(spec, f"the model spec of checkpoint step {step}"), resolved_spec(saved, file)
  )
  if spec.get("input_shape") != saved.get("input_shape"):
    diff["input_shape"] = (spec.get("input_shape"), saved.get("input_shape"))
  if diff:
    detail = "; ".join(
      f"{k}: checkpoint has {a!r}, model.json has {b!r}" for k, (a, b) in diff.items()
    )
    raise ValueError(
      f"{file} does not match the model the checkpoints were trained as (checkpoint step "
      f"{step}: {detail}): it was edited or copied from another run. Put the run's own "
      "model.json back (rerunning its training command rewrites it)."
    )


def abstract_variables(model, input_shape: Sequence[int], sharding=None):
  """Shapes/dtypes (with ``sharding``) of ``model.init`` variables; nothing is computed."""
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  shapes = jax.eval_shape(
    lambda x: model.init({"params": jax.random.PRNGKey(0)}, x, train=False), x
  )
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), dict(shapes)
  )


def checkpoint_manager(
  workdir, *, read_only: bool = True, options: ocp.CheckpointManagerOptions | None = None
):
  """An orbax ``CheckpointManager`` on ``workdir/checkpoints`` with this layout's items.

  ``workdir`` is any path ``etils.epath`` supports (local, ``gs://``, ...).
  """
  absl_logger = logging.getLogger("absl")  # orbax logs through absl
  absl_logger.addFilter(_read_only_notices)
  try:
    if options is None:
      options = ocp.CheckpointManagerOptions(read_only=read_only, create=not read_only)
    return ocp.CheckpointManager(
      workdir_files.path(workdir, CHECKPOINT_SUBDIR),
      item_names=(MODEL_ITEM, TRAIN_ITEM, META_ITEM),
      options=options,
    )
  finally:
    absl_logger.removeFilter(_read_only_notices)


def _read_only_notices(record: logging.LogRecord) -> bool:
  """False for orbax's two warnings that a manager opened for reading is read-only (what was
  asked for; every load_checkpoint and evaluate printed them)."""
  message = record.getMessage()
  return not (
    message.startswith("CheckpointManagerOptions.read_only=True")
    or message.startswith("Given directory is read only")
  )


def _host_array(x) -> np.ndarray:
  if isinstance(x, jax.Array):
    x = x.addressable_data(0) if x.is_fully_replicated else x
  return np.asarray(x)


def checksums(tree) -> dict:
  """``{leaf path: "dtype[shape]:crc32"}`` of the arrays of ``tree`` (replicated or host).

  CRC-32 detects every single-bit and burst error of up to 32 bits in an array.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = _host_array(leaf)
    out[jax.tree_util.keystr(path)] = f"{a.dtype.name}{list(a.shape)}:{zlib.crc32(a.tobytes()):08x}"
  return out


def verify_checksums(step: int, restored) -> None:
  """Compares restored items with the checksums in their ``meta``; ``ChecksumError`` if any differ.

  Items or checkpoints saved without checksums (older runs) are not checked.
  """
  meta = restored.get(META_ITEM) if META_ITEM in restored else None
  expected_items = (meta or {}).get(CHECKSUMS_KEY, {})
  for item, expected in expected_items.items():
    if item not in restored or restored[item] is None:
      continue
    got = checksums(restored[item])
    for path in sorted(set(expected) | set(got)):
      if expected.get(path) != got.get(path):
        raise ChecksumError(
          f"step {step}: the restored {item} array {path} has checksum {got.get(path)}, "
          f"saved as {expected.get(path)}: the checkpoint's bytes changed after saving"
        )


def _permission_denied(error: BaseException) -> BaseException | None:
  """The permission error in ``error``'s chain (or message), if any."""
  seen = set()
  e = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, PermissionError) or getattr(e, "errno", None) in (errno.EACCES, errno.EPERM):
      return e
    if "Permission denied" in str(e) or "PERMISSION_DENIED" in str(e):
      return e
    e = e.__cause__ or e.__context__
  return None


def _with_meta(args):
  """Restore args that also read ``meta`` (the checksums) when the caller did not ask."""
  if META_ITEM in args:
    return args
  return ocp.args.Composite(**dict(args.items()), **{META_ITEM: ocp.args.JsonRestore()})


def restore_verified(manager, step: int, args):
  """``manager.restore(step, args)`` plus ``meta``, with the checksums verified.

  Raises ``ChecksumError`` on a mismatch and ``CheckpointUnreadable`` when permission is
  denied.
  """
  try:
    restored = manager.restore(step, args=_with_meta(args))
  except Exception as e:
    denied = _permission_denied(e)
    if denied is not None:
      raise CheckpointUnreadable(
        f"checkpoint step {step} in {manager.directory} cannot be read ({denied}): it is "
        "not damaged, and nothing was moved. Fix the files' permissions (or run as their "
        "owner) and rerun."
      ) from e
    raise
  verify_checksums(step, restored)
  return restored


def restore_newest_intact(
  manager,
  make_args: Callable[[int], Any],
  step: int | None = None,
  on_damaged: Callable[[int, Exception], None] | None = None,
):
  """Restores the newest checkpoint that reads back completely.

  Steps are tried newest first. A step whose restore fails (orbax raises ``ValueError``
  on a committed step with truncated or missing files; tensorstore and the file system
  raise other errors) or whose arrays fail their saved checksums (``ChecksumError``) is
  reported with a warning, handed to ``on_damaged`` and skipped; it is never deleted here.
  A step that cannot be read for lack of permission raises ``CheckpointUnreadable`` (it is
  not damaged). With ``step`` given, only that step is tried and any error propagates.

  Args:
    manager: an orbax ``CheckpointManager``.
    make_args: ``step -> ocp.args.Composite`` restore arguments.
    step: a specific step, or None for the newest intact one.
    on_damaged: called with ``(step, error)`` for each damaged step skipped.

  Returns:
    ``(step, restored)``, or ``(None, None)`` when there is no intact checkpoint.
  """
  if step is not None:
    if step not in manager.all_steps():
      raise ValueError(
        f"no checkpoint for step {step} in {manager.directory}; "
        f"available steps: {sorted(manager.all_steps())}"
      )
    try:
      return step, restore_verified(manager, step, make_args(step))
    except (CheckpointUnreadable, ChecksumError):
      raise
    except Exception as e:
      raise ValueError(
        f"checkpoint step {step} in {manager.directory} cannot be restored "
        f"({type(e).__name__}: {e}); it is damaged: ask for another step, or "
        "none for the newest intact one"
      ) from e
  for s in sorted(manager.all_steps(), reverse=True):
    try:
      return s, restore_verified(manager, s, make_args(s))
    except CheckpointUnreadable:
      raise
    except Exception as e:
      logging.warning(
        "Checkpoint step %d in %s is damaged and is skipped (%s: %s); trying the "
        "previous one. The damaged files are kept for inspection.",
        s,
        manager.directory,
        type(e).__name__,
        e,
      )
      if on_damaged is not None:
        on_damaged(s, e)
  return None, None


def restore_model(manager, target, step: int | None = None):
  """The ``model`` item (``params``, ``batch_stats``) of checkpoint ``step`` of ``manager``.

  The one way a trained model is read back (``load_checkpoint``, ``experiments.evaluate``,
  the runner's validation-best model): only the ``model`` item (and ``meta``) is restored,
  onto ``target`` (abstract variables with their sharding, see :func:`abstract_variables`),
  with the checksums verified (:func:`restore_newest_intact`).

  Args:
    manager: an orbax ``CheckpointManager`` (see :func:`checkpoint_manager`).
    target: the variables' shapes, dtypes and shardings.
    step: a specific step, or None for the newest intact one.

  Returns:
    ``(step, variables, meta)``; ``meta`` is ``{}`` for a checkpoint saved without one.

  Raises:
    FileNotFoundError: there is no intact checkpoint (``step`` None).
  """
  found, restored = restore_newest_intact(
    manager,
    lambda s: ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardRestore(target)}),
    step=step,
  )
  if found is None:
    raise FileNotFoundError(f"no intact checkpoint in {os.fspath(manager.directory)}")
  return found, restored[MODEL_ITEM], restored.get(META_ITEM) or {}


def load_checkpoint(workdir: str, step: int | None = None):
  """Loads a trained model from an experiments workdir.

  Args:
    workdir: the ``--workdir`` of ``python -m experiments.main``.
    step: the checkpoint step; None = the newest intact checkpoint (a damaged newer one
      is skipped with a warning).

  Returns:
    ``(model, variables, predict)``: the Flax module (rebuilt from ``model.json``, or
    without it from the spec each checkpoint records), its
    ``{"params", "batch_stats"}`` on the default device, and ``predict`` (jitted, inference
    mode)::

      predict(images, preprocess=True, *, return_probs=False, on_out_of_range="raise")

    returns float32 logits ``[N, num_classes]``, or with ``return_probs=True`` a
    :class:`Prediction` (labels, class names, softmax probabilities, logits). By default
    ``images`` are RAW: pixels as in the dataset (``[N, H, W, C]`` or ``[N, H, W]``), or image
    file paths (a path or a list of paths, read as training read image folders), and the run's
    training preprocessing from ``data.json`` is applied
    (``rknet_jax.preprocessing.preprocess``): the recorded ``resize``, then ``(x - mean) /
    std``. Pixels at another scale than training's (``data.json``'s ``pixel_range``, e.g.
    0..255 images for a 0..16 model) raise ValueError naming the expected range
    (``on_out_of_range="warn"`` warns, ``"ignore"`` accepts them). ``preprocess=False`` takes
    arrays already standardised as in training. ``predict.data_spec`` is that ``data.json``
    (class names included), or None for workdirs written before it existed, where only
    ``preprocess=False`` is possible.

  Raises:
    ValueError: a ``data.json`` with a missing or bad field (std <= 0, non-finite mean, ...),
      named; a ``model.json`` that is no model spec or not the model the checkpoints were
      trained as (their ``meta`` records it), named with the fields that differ.
  """
  spec = read_model_spec(workdir)
  if spec is None:  # each checkpoint records its spec: a deleted model.json loses nothing
    trained = trained_spec(workdir)
    if trained is None:
      raise FileNotFoundError(
        f"{os.path.join(workdir, MODEL_FILE)} not found: {workdir!r} is not a workdir "
        "written by experiments.main / train_and_evaluate"
      )
    logging.warning(
      "%s not found: rebuilding the model from the spec checkpoint step %d recorded",
      os.path.join(workdir, MODEL_FILE),
      trained[0],
    )
    spec = trained[1]
  check_model_file(workdir, spec)  # an edited or foreign model.json is named, not "damaged"
  model = model_from_spec(spec, os.fspath(workdir_files.path(workdir, MODEL_FILE)))
  target = abstract_variables(model, spec["input_shape"])
  manager = checkpoint_manager(workdir, read_only=True)
  try:
    found, variables, _ = restore_model(manager, target, step=step)
  finally:
    manager.close()
  variables = dict(variables)

  predict = _predictor(model, variables, workdir)
  logging.info("Loaded %s from %s step %d", spec.get("name"), workdir, found)
  return model, variables, predict


def _predictor(model, variables, workdir: str):
  """The ``predict`` function :func:`load_checkpoint` returns (see its docstring)."""

  @jax.jit
  def _predict(variables, images):
    return model.apply(variables, images, train=False)

  data_spec = preprocessing.read_data_spec(workdir)  # checked: a bad field is named here

  def predict(
    images, preprocess: bool = True, *, return_probs: bool = False, on_out_of_range: str = "raise"
  ):
    """Logits ``float32[N, num_classes]`` of raw ``images`` (arrays or image file paths; or
    standardised arrays with ``preprocess=False``), in inference mode; a :class:`Prediction`
    with ``return_probs=True``. See :func:`load_checkpoint`."""
    if preprocess:
      if data_spec is None:
        raise ValueError(
          f"{os.path.join(workdir, preprocessing.DATA_FILE)} not found (the run predates "
          "it): standardise the images as in training and call predict(images, "
          "preprocess=False)"
        )
      images = preprocessing.preprocess(images, data_spec, on_out_of_range=on_out_of_range)
    logits = _predict(variables, jnp.asarray(images, jnp.float32))
    if not return_probs:
      return logits
    logits = np.asarray(logits)
    labels = np.argmax(logits, axis=-1)
    names = (data_spec or {}).get("class_names") or [str(i) for i in range(logits.shape[-1])]
    return Prediction(
      labels=labels,
      class_names=[names[i] for i in labels],
      probabilities=np.asarray(jax.nn.softmax(logits, axis=-1)),
      logits=logits,
    )

  predict.data_spec = data_spec
  return predict


__all__ = ["load_checkpoint", "Prediction"]
