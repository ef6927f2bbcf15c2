"""Measured convergence order of Runge-Kutta methods: a tool, not part of the model code.

The order p of a method (paper section 3.1) shows as the slope of log(error) against
log(h) when one integrates an ODE with a known solution at several step sizes h.  This
module measures that slope for any :class:`~rknet_jax.tableaus.ButcherTableau` on two
float64 test problems over t in [0, 1]:

* ``"linear"``: y' = A y with a fixed 3x3 A, exact y(1) = expm(A) y0;
* ``"nonlinear"``: the non-autonomous Riccati equation u' = -2 t u^2 (u = 1 / (1 + t^2))
  together with v' = v * (B log v) (v = exp(expm(B t) log v0)), as one dict state.

``python -m rknet_jax.convergence [--markdown] [--no-empirical]`` prints, for every shipped
tableau, its declared order, the order from the Butcher order conditions
(:func:`rknet_jax.order_conditions.algebraic_order`) and the measured slopes.
"""

import argparse

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from rknet_jax import checks, order_conditions, rk
from rknet_jax import tableaus as tableaus_lib

__all__ = ["PROBLEMS", "default_step_counts", "convergence_errors", "measured_order", "order_table"]

_LINEAR_A = np.array([[-0.5, 2.0, 0.0], [-2.0, -0.5, 0.5], [0.0, -0.5, -0.3]])
_LINEAR_Y0 = np.array([1.0, 0.0, 0.5])
_LOG_A = np.array([[0.0, 1.0], [-1.0, -0.2]])
_LOG_Y0 = np.array([1.5, 0.5])


def _linear_problem():
  """y' = A y, y(0) = y0 on [0, 1]; exact y(1) = expm(A) y0."""
  a = jnp.asarray(_LINEAR_A)
  exact = jax.scipy.linalg.expm(a) @ jnp.asarray(_LINEAR_Y0)
  return (lambda t, y: a @ y), jnp.asarray(_LINEAR_Y0), exact


def _nonlinear_problem():
  """Riccati u' = -2 t u^2 and the log-linear system v' = v * (B log v), on [0, 1]."""
  b = jnp.asarray(_LOG_A)

  def f(t, y):
    return {"u": -2.0 * t * y["u"] ** 2, "v": y["v"] * (b @ jnp.log(y["v"]))}

  y0 = {"u": jnp.asarray(1.0, jnp.float64), "v": jnp.asarray(_LOG_Y0)}
  exact = {
    "u": jnp.asarray(0.5, jnp.float64),
    "v": jnp.exp(jax.scipy.linalg.expm(b) @ jnp.log(jnp.asarray(_LOG_Y0))),
  }
  return f, y0, exact


PROBLEMS = {"linear": _linear_problem, "nonlinear": _nonlinear_problem}


def default_step_counts(tableau):
  """Step counts keeping the float64 errors of the test problems in the asymptotic regime
  and above round-off (about 1e-2 down to 1e-13)."""
  tableau = tableaus_lib.get(tableau)
  order = tableau.order
  if tableau.name == "dopri5":
    # Dormand-Prince minimised the principal (h^5) error coefficient, so h^6 terms
    # dominate down to smaller h.
    return (16, 24, 32, 48)
  if order <= 2:
    return (16, 32, 64, 128)
  if order <= 4:
    return (8, 16, 32, 64)
  return (8, 12, 16, 24)


def convergence_errors(
  tableau,
  problem: str = "nonlinear",
  num_steps=None,
  implicit_iterations: int | None = None,
  solver: str = "fixed_point",
):
  """Max-norm errors at t = 1 on a float64 test problem, one per entry of ``num_steps``.

  ``problem`` is a key of :data:`PROBLEMS`.  One compilation per call: the step count is
  a traced loop bound.

  Raises:
    ValueError: for an unknown problem or a step count that is not a positive int.
  """
  tableau = tableaus_lib.get(tableau)
  if problem not in PROBLEMS:
    raise ValueError(f"problem must be one of {sorted(PROBLEMS)}, got {problem!r}")
  num_steps = tuple(num_steps or default_step_counts(tableau))
  for n in num_steps:
    checks.check_int(
      "convergence",
      "num_steps entry",
      n,
      1,
      checks.MAX_COUNT,
      "num_steps entries must be positive ints",
    )
  with jax.enable_x64(True):
    f, y0, exact = PROBLEMS[problem]()

    @jax.jit
    def error(n):
      h = 1.0 / n.astype(jnp.float64)

      def body(k, y):
        return rk.rk_step(
          f, k * h, y, h, tableau, implicit_iterations=implicit_iterations, solver=solver
        )

      y1 = lax.fori_loop(0, n, body, y0)
      diffs = jax.tree_util.tree_map(lambda u, v: jnp.max(jnp.abs(u - v)), y1, exact)
      return jnp.max(jnp.stack(jax.tree_util.tree_leaves(diffs)))

    return np.array([float(error(jnp.asarray(n, jnp.int64))) for n in num_steps])


def measured_order(
  tableau,
  problem: str = "nonlinear",
  num_steps=None,
  implicit_iterations: int | None = None,
  solver: str = "fixed_point",
) -> float:
  """Empirical convergence order: least-squares slope of log(error) against log(h).

  Uses :func:`convergence_errors` (float64, t in [0, 1], h = 1 / num_steps).
  """
  tableau = tableaus_lib.get(tableau)
  num_steps = tuple(num_steps or default_step_counts(tableau))
  errors = convergence_errors(tableau, problem, num_steps, implicit_iterations, solver)
  hs = 1.0 / np.asarray(num_steps, np.float64)
  return float(np.polyfit(np.log(hs), np.log(errors), 1)[0])


def order_table(empirical: bool = True):
  """Rows (header first) of the shipped tableaus: name, kind, stages, declared order,
  algebraic order and, with ``empirical``, the measured slopes on both problems."""
  header = [
    "name",
    "kind",
    "stages",
    "declared",
    "algebraic",
    "measured (linear)",
    "measured (nonlinear)",
  ]
  rows = [header]
  for name in tableaus_lib.names():
    t = tableaus_lib.get(name)
    kind = "explicit" if t.is_explicit else "DIRK" if t.is_diagonally_implicit else "implicit"
    row = [
      name,
      kind,
      str(t.num_stages),
      str(t.order),
      str(order_conditions.algebraic_order(t, max_order=7)),
    ]
    if empirical:
      row += [f"{measured_order(t, problem=p):.2f}" for p in ("linear", "nonlinear")]
    else:
      row += ["-", "-"]
    rows.append(row)
  return rows


def main(argv=None):
  """``python -m rknet_jax.convergence``: prints :func:`order_table`."""
  parser = argparse.ArgumentParser(
    prog="python -m rknet_jax.convergence",
    description="Shipped Butcher tableaus with their declared order, the order from "
    "the Butcher order conditions and the measured convergence order.",
  )
  parser.add_argument(
    "--no-empirical", action="store_true", help="skip the (slower) measured convergence orders"
  )
  parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
  args = parser.parse_args(argv)
  header, *rows = order_table(empirical=not args.no_empirical)
  if args.markdown:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
      print("| " + " | ".join(row) + " |")
  else:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
      print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
  main()
