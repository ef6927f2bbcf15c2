"""Parameter and FLOP counts in the paper's conventions, measured from the model.

The paper (section 4, Tables 1-3) reports, for every network:

* **params**: the trainable parameters.  BatchNorm scale and bias count, its running
  mean/variance do not.  Here that is the ``params`` collection of the initialised
  model (``batch_stats`` is excluded).
* **FLOPs**: ``2 x`` the multiply-adds of the convolutions and fully connected (dense)
  layers, per image, zero padding included; BatchNorm, ReLU, pooling, summations,
  attention gating and the like are not counted.

Neither count is kept as a formula beside the model: :func:`count_params` reads the
shapes of ``model.init`` under :func:`jax.eval_shape` (no array is allocated), and
:func:`count_flops` walks the jaxpr of ``model.apply(variables, x, train=False)`` traced
with :func:`jax.make_jaxpr` over those shapes.  Every ``conv_general_dilated`` and
``dot_general`` in the jaxpr counts, wherever it sits: inside ``jit``, ``remat``
(``jax.checkpoint``), ``custom_jvp``/``custom_vjp`` functions (their primal jaxpr, so a
convolution written as an einsum or as a ``custom_vjp`` counts the same as ``lax.conv``),
``scan`` (times its length) and ``cond`` (the most expensive branch).  A ``while`` loop
whose body holds a convolution or dot raises, since its trip count is not static
(``fori_loop`` with Python-int bounds lowers to ``scan`` and is counted).

XLA's ``cost_analysis`` is not used: it depends on the backend and on fusion decisions,
and can skip the multiplies on zero padding, which the paper's convention counts.

Rules, per equation of the jaxpr (``B`` = the input batch; results are divided by it):

* ``conv_general_dilated``: ``2 x (elements of the output) x (kernel window size) x
  (kernel input features)``.  The kernel's input-feature dimension is already
  ``C_in / feature_group_count``, so grouped and depthwise convolutions are handled, as
  are strides, dilations and any ``dimension_numbers``.  With ``lhs_dilation`` (a
  transposed convolution) the multiplies by the inserted zeros count too, like padding.
* ``dot_general``: ``2 x (elements of the output) x (product of the contracted
  dimensions)``.  Every ``dot_general`` counts, so a linear combination written as an
  ``einsum`` counts as well; write explicit summations with ``+`` to keep them out, as
  the paper's "no parameters" summations are.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import math
import numbers
from typing import Any

import flax.linen as nn
import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

from rknet_jax import checks

__all__ = [
  "count_params",
  "count_flops",
  "params_by_module",
  "flops_by_module",
  "Counts",
  "model_counts",
  "jaxpr_flops",
]

ROOT = ""
"""Key of the breakdowns for work done by the root module itself (not a submodule)."""

# Call-like higher-order primitives: their single sub-jaxpr runs once, on the same shapes.
_CALL_PRIMITIVES = frozenset(
  {
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "remat",
    "remat2",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "named_call",
    "custom_lin",
    "xla_call",
  }
)
# Primitives whose sub-jaxpr sees per-shard shapes: not supported (would undercount).
_SHARDED_PRIMITIVES = frozenset({"shard_map", "xla_pmap", "pmap"})


def _normalize_input_shape(input_shape) -> tuple[int, ...]:
  """Validates ``input_shape`` and returns it as NHWC with a batch dimension."""
  if (
    isinstance(input_shape, (str, bytes))
    or not hasattr(input_shape, "__len__")
    or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in input_shape)
  ):
    raise ValueError(
      f"input_shape must be a sequence of ints, (H, W, C) or (N, H, W, C); got {input_shape!r}"
    )
  shape = tuple(int(d) for d in input_shape)
  if len(shape) == 3:
    shape = (1,) + shape
  if len(shape) != 4 or any(d <= 0 for d in shape):
    raise ValueError(
      f"input_shape must be (H, W, C) or (N, H, W, C) with positive sizes (NHWC "
      f"images); got {input_shape!r}"
    )
  return shape


def _check_model(model):
  if not isinstance(model, nn.Module):
    raise ValueError(
      f"model must be a flax.linen Module (e.g. from rknet_jax.create_model); got "
      f"{type(model).__name__}"
    )


def _abstract_variables(model, x):
  """``model.init`` under ``jax.eval_shape``: shapes only, nothing is initialised."""
  return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)


# --------------------------------------------------------------------------------------
# Parameters.


def _leaf_size(leaf) -> int:
  return int(math.prod(leaf.shape))


def _params_breakdown(variables) -> dict[str, int]:
  params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
  out: dict[str, int] = {}
  for key, sub in params.items():
    name = key if isinstance(sub, Mapping) else ROOT
    out[name] = out.get(name, 0) + sum(_leaf_size(l) for l in jax.tree.leaves(sub))
  return out


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
  """Number of trainable parameters (the ``params`` collection), as the paper counts.

  BatchNorm scale and bias count; running statistics (``batch_stats``) do not (paper
  section 4, Tables 1-3).  Uses ``jax.eval_shape`` of
  ``model.init({"params": key}, x, train=False)``: no parameter is materialised.

  Args:
    model: a Linen module following the model contract (see docs/design.md).
    input_shape: ``(H, W, C)`` or ``(N, H, W, C)``; the count does not depend on ``N``.

  Returns:
    The number of scalar trainable parameters.

  Example: Table 1's first row has 0.74 M parameters in the paper::

    >>> from rknet_jax import count_params, create_model
    >>> count_params(create_model("ERKNet-6x1 6x1 6x1", growth_rate=36), (32, 32, 3))
    744382
  """
  _check_model(model)
  shape = _normalize_input_shape(input_shape)
  variables = _abstract_variables(model, jax.ShapeDtypeStruct(shape, jnp.float32))
  return sum(_params_breakdown(variables).values())


def params_by_module(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
  """Trainable parameters per top-level submodule (``ROOT`` = the root's own ones)."""
  _check_model(model)
  shape = _normalize_input_shape(input_shape)
  return _params_breakdown(_abstract_variables(model, jax.ShapeDtypeStruct(shape, jnp.float32)))


# --------------------------------------------------------------------------------------
# FLOPs: the jaxpr walk.


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  dn = eqn.params["dimension_numbers"]
  rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, *spatial dims)
  window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
  kernel_in = rhs.shape[rhs_spec[1]]  # = C_in / feature_group_count
  return 2 * math.prod(out.shape) * window * kernel_in


def _dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval
  out = eqn.outvars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  contracted = math.prod(lhs.shape[d] for d in lhs_contract)
  return 2 * math.prod(out.shape) * contracted


def _subjaxprs(value):
  """The jaxprs held by one equation parameter (a jaxpr, or a tuple of them)."""
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _subjaxprs(v)]
  return []


def _name_path(prefix: tuple[str, ...], eqn) -> tuple[str, ...]:
  """Module path of an equation: the enclosing path plus its own (relative) name stack.

  Flax (``flax_profile``, on by default) wraps every module call in ``jax.named_scope``
  of the module's name; inside a sub-jaxpr the name stack is relative to the equation
  that holds it, hence the prefix.  A method other than ``__call__`` appears as
  ``name.method`` right after ``name``; it is folded into ``name``.
  """
  parts = list(prefix)
  for part in str(eqn.source_info.name_stack).split("/"):
    if not part:
      continue
    if parts and part.startswith(parts[-1] + "."):
      continue
    parts.append(part)
  return tuple(parts)


def _add(into: dict, other: Mapping, factor: int = 1):
  for k, v in other.items():
    into[k] = into.get(k, 0) + factor * v


def _counts_inside(subs: Mapping, path: tuple[str, ...]) -> int:
  """FLOPs of one run of every sub-jaxpr in ``subs`` (to refuse loops that hold any)."""
  inner: dict[tuple[str, ...], int] = {}
  for js in subs.values():
    for j in js:
      _add(inner, _walk(j, path))
  return sum(inner.values())


def _walk(jaxpr, prefix: tuple[str, ...], seen: dict | None = None) -> dict[tuple[str, ...], int]:
  """FLOPs of one execution of ``jaxpr``, keyed by module path.

  ``seen``, if given, collects every module path in order of first appearance.
  """
  out: dict[tuple[str, ...], int] = {}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    path = _name_path(prefix, eqn)
    if seen is not None:
      seen.setdefault(path, None)
    if name == "conv_general_dilated":
      _add(out, {path: _conv_flops(eqn)})
      continue
    if name == "dot_general":
      _add(out, {path: _dot_flops(eqn)})
      continue
    subs = {k: _subjaxprs(v) for k, v in eqn.params.items()}
    subs = {k: v for k, v in subs.items() if v}
    if not subs:
      continue
    if name == "scan":
      _add(out, _walk(subs["jaxpr"][0], path, seen), eqn.params["length"])
    elif name == "cond":
      branches = [_walk(b, path, seen) for b in subs["branches"]]
      _add(out, max(branches, key=lambda c: sum(c.values())))
    elif name == "while":
      body = _walk(subs["body_jaxpr"][0], path)
      cond = _walk(subs["cond_jaxpr"][0], path)
      if sum(body.values()) or sum(cond.values()):
        where = "/".join(path) or "the top level"
        raise ValueError(
          f"count_flops: a while_loop at {where} contains convolutions or dots, but "
          "its trip count is not known statically. Use lax.scan or lax.fori_loop "
          "with Python-int bounds (which lowers to scan) so the loop can be counted."
        )
    elif name in _SHARDED_PRIMITIVES:
      if _counts_inside(subs, path):
        raise ValueError(
          f"count_flops: {name} holds convolutions or dots on per-shard shapes; "
          "count the unsharded model instead."
        )
    elif name in _CALL_PRIMITIVES and len(subs) == 1:
      # A call: custom_vjp/custom_jvp primal jaxpr, remat, jit, ... run once.
      (js,) = subs.values()
      for j in js:
        _add(out, _walk(j, path, seen))
    elif _counts_inside(subs, path):
      raise ValueError(
        f"count_flops: do not know how often the sub-jaxprs of primitive "
        f"'{name}' (params {sorted(subs)}) run; it holds convolutions or dots. "
        "Known: scan, cond, while, and call-like primitives "
        f"{sorted(_CALL_PRIMITIVES)}."
      )
  return out


def jaxpr_flops(closed_jaxpr) -> int:
  """Total FLOPs (2 x multiply-adds of conv_general_dilated and dot_general) of a jaxpr.

  Not divided by any batch size.  See the module docstring for the rules.
  """
  jaxpr = getattr(closed_jaxpr, "jaxpr", closed_jaxpr)
  return sum(_walk(jaxpr, ()).values())


def _strip_root(path: tuple[str, ...], root_name: str) -> tuple[str, ...]:
  return path[1:] if path and path[0] == root_name else path


def _group(by_path: Mapping[tuple[str, ...], int], root_name: str, depth: int) -> dict[str, int]:
  out: dict[str, int] = {}
  for path, v in by_path.items():
    path = _strip_root(path, root_name)
    key = "/".join(path[:depth]) if path else ROOT
    out[key] = out.get(key, 0) + v
  return out


def _per_image(total: int, batch: int):
  q, r = divmod(total, batch)
  return q if r == 0 else total / batch


def _trace(model, input_shape):
  """(abstract variables, per-path FLOPs of the whole batch, paths in order, shape)."""
  _check_model(model)
  shape = _normalize_input_shape(input_shape)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  with nn.override_named_call(True):
    variables = _abstract_variables(model, x)
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  seen: dict = {}
  by_path = _walk(closed.jaxpr, (), seen)
  return variables, by_path, list(seen), shape


@dataclasses.dataclass(frozen=True)
class Counts:
  """Counts of one model at one input shape (paper conventions; see module docstring).

  Attributes:
    input_shape: the NHWC shape counted (with batch dimension).
    params: trainable parameters.
    flops: FLOPs per image (2 x multiply-adds of convs and dense layers).
    modules: top-level submodule names in execution order (``ROOT`` = the root
      module's own parameters/operations, listed only if it has any).
    params_by_module: top-level submodule name -> params.
    flops_by_module: top-level submodule name -> FLOPs per image.
  """

  input_shape: tuple[int, ...]
  params: int
  flops: Any
  modules: tuple[str, ...]
  params_by_module: dict[str, int]
  flops_by_module: dict[str, Any]


def model_counts(model: nn.Module, input_shape: Sequence[int]) -> Counts:
  """Params and FLOPs of ``model`` with per-top-level-submodule breakdowns.

  One ``eval_shape`` of ``model.init`` and one ``make_jaxpr`` of ``model.apply(...,
  train=False)``; no array of the model's size is created.  The breakdown by submodule
  relies on Flax's named scopes (``flax_profile``), switched on while tracing.
  """
  variables, by_path, seen, shape = _trace(model, input_shape)
  root_name = model.name or type(model).__name__
  flops_by = {k: _per_image(v, shape[0]) for k, v in _group(by_path, root_name, 1).items()}
  params_by = _params_breakdown(variables)
  order: dict[str, None] = {}
  for path in seen:
    path = _strip_root(path, root_name)
    if path and (path[0] in params_by or path[0] in flops_by):
      order.setdefault(path[0], None)
  for name in list(params_by) + list(flops_by):  # ROOT, or never seen in the jaxpr
    order.setdefault(name, None)
  return Counts(
    input_shape=shape,
    params=sum(params_by.values()),
    flops=_per_image(sum(by_path.values()), shape[0]),
    modules=tuple(order),
    params_by_module=params_by,
    flops_by_module=flops_by,
  )


def count_flops(model: nn.Module, input_shape: Sequence[int]):
  """FLOPs per image in the paper's convention: 2 x multiply-adds of convs and FCs.

  Measured by walking the jaxpr of ``model.apply(variables, x, train=False)`` (paper
  section 4, Tables 1-3: "FLOPs" = twice the multiply-adds of the convolutional and
  fully connected layers, zero padding included, nothing else).  Variables come from
  ``jax.eval_shape``; nothing is initialised or executed.

  Args:
    model: a Linen module following the model contract (see docs/design.md).
    input_shape: ``(H, W, C)`` or ``(N, H, W, C)``; the result is per image.

  Returns:
    FLOPs per image (an ``int``; a ``float`` only if the total does not divide by N).

  Raises:
    ValueError: on a bad ``input_shape``, or if the jaxpr holds a convolution or dot
      whose execution count is not static (inside a ``while`` loop).
  """
  _, by_path, _, shape = _trace(model, input_shape)
  return _per_image(sum(by_path.values()), shape[0])


def flops_by_module(model: nn.Module, input_shape: Sequence[int], depth: int = 1) -> dict[str, Any]:
  """FLOPs per image grouped by module path, ``depth`` components below the root.

  ``depth=1`` gives top-level submodules (stem, periods, transitions, head);
  ``ROOT`` collects the root module's own convolutions/dots.  Keys follow the
  ``/``-joined Flax module names, e.g. ``"period_0/step_1"`` at ``depth=2``.
  """
  checks.check_int("flops_by_module", "depth", depth, 1, checks.MAX_COUNT)
  _, by_path, _, shape = _trace(model, input_shape)
  root_name = model.name or type(model).__name__
  return {k: _per_image(v, shape[0]) for k, v in _group(by_path, root_name, depth).items()}
