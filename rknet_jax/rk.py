"""Pure Runge-Kutta steps for any pytree state (paper section 3.1, equations 1-3).

:func:`rk_step` advances dy/dt = f(t, y) (equation 1) by one step of size h with a
Butcher tableau (a, b, c):

    z_i     = f(t + c_i h, y + h sum_j a_ij z_j),   i = 1..s      (equation 3)
    y_next  = y + h sum_i b_i z_i                                  (equation 2)

:func:`odeint_fixed` repeats it ``num_steps`` times with ``lax.scan``.

Explicit tableaus (a strictly lower triangular) evaluate the stages in order; stages with
weight b_i = 0 that no later stage uses (the FSAL stage of Dormand-Prince) are skipped,
as are terms whose coefficient is exactly 0.

Implicit tableaus: the stage equations are solved with a *fixed* number of iterations,
so the step is an ordinary traced computation (``jit``, ``grad``, ``vmap`` just work and
the cost is known in advance):

* ``solver="fixed_point"`` (default).  Start from the explicit-Euler-like predictor
  z_i^0 = f(t, y) and iterate z^{k+1}_i = f(t + c_i h, y + h sum_j a_ij z^k_j) (all
  stages from the previous iterate, Jacobi style).  The map contracts when
  h L ||A|| < 1 (L: Lipschitz constant of f in y, ||A||: a norm of the stage matrix), and
  each iteration shrinks the stage error by about that factor.  Since the predictor's
  error is O(h), k iterations leave a stage error O(h^{k+1}), so the step has order
  min(p, k + 1) (Picard iteration of a collocation/RK method): **k >= p - 1 iterations
  preserve the order p asymptotically**.  The default, p + 1, keeps two iterations of
  margin so the iteration error sits well below the truncation error for moderate
  h L ||A|| (<= 0.5, say).  For stiff f (h L ||A|| >= 1) fixed-point iteration diverges
  no matter how many iterations are used: take a smaller h or ``solver="newton"``.
* ``solver="newton"``.  Newton's method on the s * n stage equations with the Jacobian
  from ``jax.jacfwd`` and a dense solve; costs O((s n)^3) per iteration, so it is meant
  for small states (tests, toy ODEs, stiff problems), not for feature maps.  The stage
  error after k iterations is O(h^{2^{k+1} - 1}), so the default is the smallest k with
  2^{k+1} - 1 >= p, plus one.

The iterations are unrolled Python loops (not ``lax.fori_loop``), so ``f`` may be a
bound Flax Linen module that creates parameters or updates batch statistics; the
compiled graph holds (iterations + 1) * s evaluations of f.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp

from rknet_jax import checks
from rknet_jax import tableaus as tableaus_lib

__all__ = [
  "rk_step",
  "odeint_fixed",
  "runge_kutta_step",
  "default_implicit_iterations",
  "implicit_residuals",
  "IMPLICIT_RESIDUAL",
  "SOLVERS",
]

SOLVERS = ("fixed_point", "newton")

VectorField = Callable[[Any, Any], Any]

IMPLICIT_RESIDUAL = "implicit_residual"
"""Name under which the modules sow (collection ``"intermediates"``) the final residual of
their implicit stage solves: :class:`rknet_jax.TableauStep` and the clique blocks."""


def max_abs_change(old, new):
  """max |new - old| over every leaf of two sequences of pytrees (float32 scalar)."""
  diffs = [
    jnp.max(jnp.abs(jnp.asarray(b, jnp.float32) - jnp.asarray(a, jnp.float32)))
    for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new))
  ]
  return jnp.max(jnp.stack(diffs)) if diffs else jnp.zeros((), jnp.float32)


def implicit_residuals(intermediates) -> dict:
  """``{module path: residual}`` of the implicit solves sown during an ``apply``.

  ``intermediates`` is the ``"intermediates"`` collection an apply returned with
  ``mutable=["intermediates"]`` (or the whole returned state).  Each residual is the
  max-abs change of the stage values in the last iteration of a solve (a fixed-point
  iteration, a Newton step or a clique block's last alternate update): small when the
  solve has converged, large (or growing) when it has not, well before the states turn
  into NaN.
  """
  tree = intermediates.get("intermediates", intermediates)
  out = {}

  def walk(node, path):
    for key, value in node.items():
      if key == IMPLICIT_RESIDUAL:
        out["/".join(path)] = jnp.max(jnp.stack([jnp.asarray(v) for v in value]))
      elif hasattr(value, "items"):
        walk(value, path + (key,))

  walk(tree, ())
  return out


def _check_solver(solver):
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def _check_iterations(implicit_iterations):
  return checks.check_optional_int(
    "rk_step",
    "implicit_iterations",
    implicit_iterations,
    1,
    checks.MAX_COUNT,
    "None or a positive int",
  )


def default_implicit_iterations(order: int, solver: str = "fixed_point") -> int:
  """Default number of iterations for an implicit method of order ``order``.

  ``fixed_point``: order + 1 (order - 1 is the asymptotic minimum, see the module
  docstring).  ``newton``: the smallest k with 2^{k+1} - 1 >= order, plus one.
  """
  _check_solver(solver)
  if solver == "fixed_point":
    return int(order) + 1
  k = 0
  while 2 ** (k + 1) - 1 < order:
    k += 1
  return k + 1


def _combine(y, h, coeffs: Sequence[Any], zs: Sequence[Any]):
  """y + h * sum_j coeffs[j] * zs[j] leaf-wise, skipping static zeros; keeps y's dtypes."""
  terms = [(cf, z) for cf, z in zip(coeffs, zs) if not tableaus_lib.is_static_zero(cf)]
  if not terms:
    return y
  coeffs = [cf for cf, _ in terms]

  def leaf(yl, *zl):
    acc = coeffs[0] * zl[0]
    for cf, z in zip(coeffs[1:], zl[1:]):
      acc = acc + cf * z
    return (yl + h * acc).astype(jnp.result_type(yl))

  return jax.tree_util.tree_map(leaf, y, *[z for _, z in terms])


def _stage_time(t, h, ci):
  return t if tableaus_lib.is_static_zero(ci) else t + ci * h


def _coefficient_lists(a, b, c):
  """Python lists of per-entry coefficients (floats, or traced scalars for arrays)."""
  s = len(b)
  a_rows = [[a[i][j] for j in range(s)] for i in range(s)]
  return a_rows, [b[i] for i in range(s)], [c[i] for i in range(s)]


def runge_kutta_step(
  stage_fn: Callable[[int, Any, Any], Any],
  t,
  y,
  h,
  a,
  b,
  c,
  *,
  explicit: bool,
  implicit_iterations: int = 1,
  solver: str = "fixed_point",
  shared_predictor: bool = True,
  return_residual: bool = False,
):
  """One RK step with stage-indexed vector fields z_i = stage_fn(i, t_i, Y_i) (eq. 3-4).

  The general form behind :func:`rk_step` and :class:`rknet_jax.TableauStep`: besides
  f(t, y) (``stage_fn`` ignoring i, equation 3) it covers one function per stage
  (equation 4 of the paper).  Coefficients may be Python floats (static: exact zeros are
  skipped) or traced scalars/arrays (learnable: nothing is skipped).

  Args:
    stage_fn: ``stage_fn(i, t_i, Y_i) -> z_i`` with Y_i shaped like ``y``.
    t, y, h: current time, state (any pytree of arrays) and step size.
    a, b, c: the tableau; ``a[i][j]``, ``b[i]``, ``c[i]`` indexing must work (nested
      tuples or arrays).
    explicit: treat a as strictly lower triangular (entries on and above the diagonal
      are never read) and evaluate the stages in order.
    implicit_iterations: number of fixed-point or Newton iterations (implicit only).
    solver: ``"fixed_point"`` or ``"newton"`` (implicit only; see the module docstring).
    shared_predictor: initial guess z_i^0 = stage_fn(0, t, y) for every stage (one
      evaluation, right when all stages share f); otherwise z_i^0 =
      stage_fn(i, t + c_i h, y) (one evaluation per stage).
    return_residual: also return the implicit solve's final residual: max |z^k - z^{k-1}|
      over the stages in the last iteration (fixed point), or max |G(Z)| before the last
      Newton step; None for explicit tableaus.  The step itself is unchanged.

  Returns:
    y_next with the structure and dtypes of ``y``; ``(y_next, residual)`` with
    ``return_residual``.
  """
  s = len(b)
  a_rows, b_list, c_list = _coefficient_lists(a, b, c)
  if explicit:
    needed = tableaus_lib.needed_stages(a_rows, b_list)
    zs = [None] * s
    for i in range(s):
      if needed[i]:
        y_i = _combine(y, h, a_rows[i][:i], zs[:i])
        zs[i] = stage_fn(i, _stage_time(t, h, c_list[i]), y_i)
    y_next = _combine(y, h, b_list, zs)
    return (y_next, None) if return_residual else y_next

  _check_solver(solver)
  iterations = _check_iterations(implicit_iterations)
  if iterations is None:
    raise ValueError("implicit_iterations must be a positive int for implicit tableaus")
  if solver == "newton":
    y_next, residual = _newton_step(stage_fn, t, y, h, a_rows, b_list, c_list, iterations)
  else:
    y_next, residual = _fixed_point_step(
      stage_fn, t, y, h, a_rows, b_list, c_list, iterations, shared_predictor, return_residual
    )
  return (y_next, residual) if return_residual else y_next


def _fixed_point_step(
  stage_fn, t, y, h, a_rows, b_list, c_list, iterations, shared_predictor, with_residual
):
  """Fixed-point iterations of the stage equations from the predictor (module docstring);
  returns y_next and the last iteration's max-abs change (None unless ``with_residual``)."""
  s = len(b_list)
  static_rows = tableaus_lib.zero_rows(a_rows)  # explicit stages: computed once
  if shared_predictor:
    z0 = stage_fn(0, t, y)
    zs = [z0] * s
  else:
    zs = [stage_fn(i, _stage_time(t, h, c_list[i]), y) for i in range(s)]
  for i in range(s):
    if static_rows[i] and not (shared_predictor and tableaus_lib.is_static_zero(c_list[i])):
      zs[i] = stage_fn(i, _stage_time(t, h, c_list[i]), y)  # else z0 is already exact
  residual = None
  for _ in range(iterations):
    new = [
      zs[i]
      if static_rows[i]
      else stage_fn(i, _stage_time(t, h, c_list[i]), _combine(y, h, a_rows[i], zs))
      for i in range(s)
    ]
    if with_residual:
      residual = max_abs_change(zs, new)
    zs = new
  return _combine(y, h, b_list, zs), residual


def _newton_step(stage_fn, t, y, h, a_rows, b_list, c_list, iterations):
  """Newton iterations on G(Z) = Z - F(Z) = 0 for the stacked stage slopes Z (s, n)."""
  s = len(b_list)
  y_flat, unravel = ravel_pytree(y)
  dtype = y_flat.dtype
  n = y_flat.shape[0]
  a_mat = jnp.stack([jnp.stack([jnp.asarray(v, dtype) for v in row]) for row in a_rows])
  b_vec = jnp.stack([jnp.asarray(v, dtype) for v in b_list])

  def residual(z_flat):
    z = z_flat.reshape(s, n)
    stage_states = y_flat[None, :] + h * (a_mat @ z)
    fz = jnp.concatenate(
      [
        ravel_pytree(
          stage_fn(i, _stage_time(t, h, c_list[i]), unravel(stage_states[i].astype(dtype)))
        )[0].astype(dtype)
        for i in range(s)
      ]
    )
    g = z_flat - fz
    return g, g

  z0 = ravel_pytree(stage_fn(0, t, y))[0].astype(dtype)
  z = jnp.tile(z0, s)
  for _ in range(iterations):
    jac, g = jax.jacfwd(residual, has_aux=True)(z)
    z = z - jnp.linalg.solve(jac, g)
  y_next = y_flat + h * (b_vec @ z.reshape(s, n))
  return unravel(y_next.astype(dtype)), jnp.max(jnp.abs(g)).astype(jnp.float32)


def rk_step(
  f: VectorField,
  t,
  y,
  h,
  tableau,
  *,
  implicit_iterations: int | None = None,
  solver: str = "fixed_point",
  return_residual: bool = False,
):
  """One Runge-Kutta step y_{n+1} = y_n + h sum_i b_i z_i (paper eqs. 2-3).

  Args:
    f: the vector field ``f(t, y)`` of equation 1, returning a pytree like ``y``.
    t: current time t_n (Python or JAX scalar).
    y: current state y_n, any pytree of floating arrays (float32 or float64); integer
      leaves raise TypeError.
    h: step size (Python or JAX scalar; may be traced, e.g. learned).
    tableau: a :class:`~rknet_jax.tableaus.ButcherTableau` or the name of a shipped one.
    implicit_iterations: for implicit tableaus, the fixed number of solver iterations;
      ``None`` picks :func:`default_implicit_iterations` (``order + 1`` for fixed-point
      iteration).  Ignored for explicit tableaus.  See the module docstring for how to
      choose it: fixed-point iteration needs h L ||A|| < 1 and k >= p - 1 iterations
      to keep order p.
    solver: ``"fixed_point"`` (default, any state size) or ``"newton"`` (dense Jacobian
      via ``jax.jacfwd``; small states only).
    return_residual: also return the implicit solve's final residual (see
      :func:`runge_kutta_step`; None for explicit tableaus), to see a solve that does not
      converge before it turns into NaN.

  Returns:
    y_{n+1}, with the pytree structure and leaf dtypes of ``y``; with
    ``return_residual``, ``(y_{n+1}, residual)``.

  Raises:
    TypeError: if a leaf of ``y`` is not floating point.
    ValueError: if ``f`` returns another pytree structure or leaf shape than ``y``, or
      for a bad solver or iteration count.

  Works under ``jax.jit`` (pass the tableau as a static argument or close over it),
  ``jax.grad`` and ``jax.vmap``.

  Example: one classical RK4 step of dy/dt = -y from y = 1 (exact: exp(-0.1))::

    >>> import jax.numpy as jnp
    >>> from rknet_jax import rk_step
    >>> y1 = rk_step(lambda t, y: -y, 0.0, jnp.ones(2), 0.1, "rk4")
    >>> print(y1)
    [0.9048375 0.9048375]
    >>> float(jnp.exp(-0.1))  # doctest: +ELLIPSIS
    0.904837...
  """
  tableau = tableaus_lib.get(tableau)
  _check_solver(solver)
  iterations = _check_iterations(implicit_iterations)
  _check_state(y)
  f = _checked_vector_field(f, y)
  if tableau.is_implicit and iterations is None:
    iterations = default_implicit_iterations(tableau.order, solver)
  return runge_kutta_step(
    lambda i, ti, yi: f(ti, yi),
    t,
    y,
    h,
    tableau.a,
    tableau.b,
    tableau.c,
    explicit=tableau.is_explicit,
    implicit_iterations=iterations or 1,
    solver=solver,
    shared_predictor=True,
    return_residual=return_residual,
  )


def _leaf_name(path) -> str:
  return "y" + jax.tree_util.keystr(path)


def _check_state(y, what: str = "y"):
  """Raises TypeError unless every leaf of ``y`` is a floating-point array or scalar."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(y)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
        f"{what}{jax.tree_util.keystr(path)} has dtype {dtype}: a Runge-Kutta state "
        "must be floating point (an integer state would truncate every step); convert "
        "it first, e.g. jnp.asarray(y, jnp.float32)"
      )


def _checked_vector_field(f: VectorField, y) -> VectorField:
  """Wraps ``f`` so a result with another pytree structure or leaf shapes than ``y``
  raises a ValueError naming both (checked once per trace, at no run-time cost)."""
  y_leaves, y_tree = jax.tree_util.tree_flatten_with_path(y)

  def checked(t, yi):
    out = f(t, yi)
    out_tree = jax.tree_util.tree_structure(out)
    if out_tree != jax.tree_util.tree_structure(y):
      raise ValueError(
        f"f(t, y) returned a pytree of structure {out_tree}, but the "
        f"state y has structure {y_tree}: f must return dy/dt shaped like y"
      )
    for (path, yl), zl in zip(y_leaves, jax.tree_util.tree_leaves(out)):
      if jnp.shape(zl) != jnp.shape(yl):
        raise ValueError(
          f"f(t, y) returned shape {jnp.shape(zl)} for "
          f"{_leaf_name(path)} of shape {jnp.shape(yl)}: f must return "
          "dy/dt with the shape of y (no broadcasting)"
        )
    return out

  return checked


def _check_num_steps(num_steps):
  return checks.check_int(
    "odeint_fixed",
    "num_steps",
    num_steps,
    1,
    checks.MAX_COUNT,
    "num_steps must be a positive Python int: the number of fixed "
    "steps; there is no default step size",
  )


def odeint_fixed(
  f: VectorField,
  y0,
  t0,
  t1,
  num_steps: int,
  tableau,
  *,
  implicit_iterations: int | None = None,
  solver: str = "fixed_point",
  return_trajectory: bool = False,
):
  """Integrates dy/dt = f(t, y) from t0 to t1 with ``num_steps`` equal RK steps (eq. 1-3).

  The steps run in a ``lax.scan`` (one compiled step body whatever ``num_steps``); step n
  starts at t_n = t0 + n h with h = (t1 - t0) / num_steps (no accumulated rounding of t).

  Args:
    f: vector field ``f(t, y)``.
    y0: initial state, any pytree of floating arrays.
    t0, t1: start and end time (may be traced; t1 < t0 integrates backwards).
    num_steps: positive Python int, required: there is no default step size.
    tableau: :class:`~rknet_jax.tableaus.ButcherTableau` or a shipped name.
    implicit_iterations, solver: as in :func:`rk_step`.
    return_trajectory: if True, return the states at t_0, t_1, ..., t_{num_steps}
      stacked along a new leading axis (num_steps + 1 entries) instead of the final one.

  Returns:
    y(t1) (same structure and dtypes as ``y0``), or the trajectory.

  Raises:
    TypeError: if a leaf of ``y0`` is not floating point.
    ValueError: if ``num_steps`` is not a positive int, or for a bad solver or
      iteration count (before anything is traced), or if ``f`` returns another pytree
      structure or leaf shape than ``y0``.

  Example: dy/dt = -y cos t on a pytree state, y(0) = 1, so y(1) = exp(-sin 1)::

    >>> import jax.numpy as jnp
    >>> from rknet_jax import odeint_fixed
    >>> f = lambda t, y: {"x": -y["x"] * jnp.cos(t)}
    >>> y1 = odeint_fixed(f, {"x": jnp.ones(())}, 0.0, 1.0, 20, "rk4")
    >>> print(f"{float(y1['x']):.6f} {float(jnp.exp(-jnp.sin(1.0))):.6f}")
    0.431076 0.431076
  """
  num_steps = _check_num_steps(num_steps)
  tableau = tableaus_lib.get(tableau)
  _check_solver(solver)
  _check_iterations(implicit_iterations)
  _check_state(y0, "y0")
  # Strongly typed leaves, so the scan carry keeps one type.
  y0 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), y0)
  h = (t1 - t0) / num_steps

  def body(y, n):
    y_next = rk_step(
      f, t0 + n * h, y, h, tableau, implicit_iterations=implicit_iterations, solver=solver
    )
    return y_next, (y_next if return_trajectory else None)

  y_final, ys = lax.scan(body, y0, jnp.arange(num_steps))
  if not return_trajectory:
    return y_final
  return jax.tree_util.tree_map(
    lambda first, rest: jnp.concatenate([first[None], rest], axis=0), y0, ys
  )
