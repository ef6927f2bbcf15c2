"""Tests for rknet_jax.rk: rk_step and odeint_fixed (paper eqs. 1-3).

Every test of this module runs with 64-bit JAX enabled (autouse fixture below) so that
convergence slopes are not polluted by float32 round-off; float32 is tested explicitly.
"""

import re

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from rknet_jax import convergence, rk, tableaus

ALL = tableaus.names()
IMPLICIT = [n for n in ALL if tableaus.get(n).is_implicit]


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


# ---------------------------------------------------------------------------------------
# Test problems with closed-form solutions (independent of those in rknet_jax.rk).

LIN_A = np.array(
  [[-0.4, 1.5, 0.0, 0.2], [-1.5, -0.4, 0.3, 0.0], [0.0, -0.3, -0.2, 1.0], [-0.2, 0.0, -1.0, -0.1]]
)
LIN_Y0 = np.array([1.0, -0.5, 0.25, 0.75])
T_END = 1.0


def linear_f(t, y):
  del t
  return jnp.asarray(LIN_A) @ y


def linear_exact():
  return scipy.linalg.expm(LIN_A * T_END) @ LIN_Y0


LOG_B = np.array([[0.2, 1.0], [-0.8, -0.5]])


def nonlinear_f(t, y):
  """(u, v): u' = -2 t u^2 (non-autonomous Riccati, u = 1 / (1 + t^2)) and
  v' = v * (B log v) (a coupled nonlinear system: log v solves a linear ODE)."""
  u, v = y
  return (-2.0 * t * u**2, v * (jnp.asarray(LOG_B) @ jnp.log(v)))


NONLIN_Y0 = (1.0, np.array([1.2, 0.7]))


def nonlinear_exact():
  u = 1.0 / (1.0 + T_END**2)
  v = np.exp(scipy.linalg.expm(LOG_B * T_END) @ np.log(NONLIN_Y0[1]))
  return (u, v)


PROBLEMS = {
  "linear": (linear_f, lambda: jnp.asarray(LIN_Y0), linear_exact),
  "nonlinear": (
    nonlinear_f,
    lambda: (jnp.asarray(NONLIN_Y0[0]), jnp.asarray(NONLIN_Y0[1])),
    nonlinear_exact,
  ),
}


def max_error(y, exact):
  return max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree_util.tree_leaves(y), jax.tree_util.tree_leaves(exact))
  )


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("name", ALL)
def test_empirical_convergence_order(name, problem):
  """Fitted slope of log(error) vs log(h) is within 0.3 of the declared order."""
  tableau = tableaus.get(name)
  f, y0_fn, exact_fn = PROBLEMS[problem]
  y0, exact = y0_fn(), exact_fn()

  @jax.jit  # one compilation per case: the number of steps is a traced loop bound
  def integrate(n):
    h = T_END / n.astype(jnp.float64)
    return lax.fori_loop(0, n, lambda k, y: rk.rk_step(f, k * h, y, h, tableau), y0)

  ns = convergence.default_step_counts(tableau)
  errors = np.array([max_error(integrate(jnp.asarray(n)), exact) for n in ns])
  assert np.all(errors > 1e-13), f"errors {errors} reach round-off"
  slope = np.polyfit(np.log(T_END / np.asarray(ns, np.float64)), np.log(errors), 1)[0]
  assert abs(slope - tableau.order) < 0.3, (name, problem, slope, errors)


@pytest.mark.parametrize("name", ALL)
def test_one_step_equals_exact_rk_solution_of_linear_system(name):
  """For y' = L y the RK step is y0 + h (b^T (x) I)(I - h A (x) L)^{-1} (1 (x) L y0);
  checks stage ordering (explicit) and that the fixed-point solve converges to the true
  implicit RK solution (implicit), not just to something of the right order."""
  tableau = tableaus.get(name)
  a, b, _ = tableau.numpy()
  s, n, h = tableau.num_stages, LIN_A.shape[0], 0.1
  big = np.eye(s * n) - h * np.kron(a, LIN_A)
  z = np.linalg.solve(big, np.kron(np.ones(s), LIN_A @ LIN_Y0))
  expected = LIN_Y0 + h * np.kron(b, np.eye(n)) @ z
  # h ||L|| ||A|| ~ 0.1: 20 fixed-point iterations contract the iteration error far
  # below 1e-14; Newton is exact after one iteration for linear f.
  step = jax.jit(
    lambda y, solver, k: rk.rk_step(
      linear_f, 0.0, y, h, tableau, implicit_iterations=k, solver=solver
    ),
    static_argnums=(1, 2),
  )
  got = step(jnp.asarray(LIN_Y0), "fixed_point", 20)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-14)
  if tableau.is_implicit:
    newton = step(jnp.asarray(LIN_Y0), "newton", 1)
    np.testing.assert_allclose(np.asarray(newton), expected, rtol=0, atol=1e-14)


def _grad_problem(tableau):
  """loss(y0, h, theta) through one rk_step of a nonlinear, non-autonomous f."""
  m = jnp.asarray([[0.3, -0.7, 0.1], [0.5, 0.2, -0.4], [-0.1, 0.6, 0.3]])

  def loss(y0, h, theta):
    def f(t, y):
      return theta * jnp.tanh(m @ y) + jnp.cos(2.0 * t) * y

    # Three iterations keep compilation fast; convergence is tested elsewhere.
    y1 = rk.rk_step(f, 0.3, y0, h, tableau, implicit_iterations=3)
    return jnp.sum(y1**2) + jnp.sum(jnp.sin(y1))

  return loss


@pytest.mark.parametrize("name", ALL)
def test_gradients_match_finite_differences_without_recompiling(name):
  tableau = tableaus.get(name)
  loss = _grad_problem(tableau)
  traces = []

  @jax.jit
  def value_and_grad(y0, h, theta):
    traces.append(1)  # Python side effect: runs only while tracing
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(y0, h, theta)

  y0 = jnp.asarray([0.4, -0.3, 0.8])
  h, theta = jnp.asarray(0.2), jnp.asarray(0.9)
  _, (g_y, g_h, g_theta) = value_and_grad(y0, h, theta)
  eps = 1e-6
  direction = jnp.asarray([0.3, -0.8, 0.5])
  plus = value_and_grad(y0 + eps * direction, h, theta)[0]
  minus = value_and_grad(y0 - eps * direction, h, theta)[0]
  fd = (plus - minus) / (2 * eps)
  np.testing.assert_allclose(float(g_y @ direction), float(fd), rtol=1e-7, atol=1e-9)
  fd_h = (value_and_grad(y0, h + eps, theta)[0] - value_and_grad(y0, h - eps, theta)[0]) / (2 * eps)
  np.testing.assert_allclose(float(g_h), float(fd_h), rtol=1e-7, atol=1e-9)
  fd_theta = (value_and_grad(y0, h, theta + eps)[0] - value_and_grad(y0, h, theta - eps)[0]) / (
    2 * eps
  )
  np.testing.assert_allclose(float(g_theta), float(fd_theta), rtol=1e-7, atol=1e-9)
  assert abs(float(g_h)) > 1e-3 and abs(float(g_theta)) > 1e-3
  # Seven calls with new values of the same shapes and dtypes: traced and compiled once.
  assert len(traces) == 1
  assert value_and_grad._cache_size() == 1


@pytest.mark.parametrize("name", ["rk4", "gauss_legendre2"])
def test_no_recompilation_for_new_values(name):
  traces = []

  def f(t, y):
    traces.append(1)
    return -y * jnp.cos(t)

  tableau = tableaus.get(name)
  # Fresh wrappers: jit caches are keyed by the wrapped function.
  integrate = jax.jit(lambda y0, t0, t1: rk.odeint_fixed(f, y0, t0, t1, 4, tableau))
  step = jax.jit(lambda t, y, h: rk.rk_step(f, t, y, h, tableau))
  for k in range(3):
    y0 = jnp.full((5,), 1.0 + k)
    integrate(y0, 0.1 * k, 1.0 + k)
    step(0.1 * k, y0, 0.5 + k)
  assert integrate._cache_size() == 1 and step._cache_size() == 1
  if tableau.is_explicit:
    n_evals = tableau.num_stages
  else:  # shared predictor + (order + 1) default iterations over s stages
    n_evals = 1 + tableau.num_stages * (tableau.order + 1)
  assert len(traces) == 2 * n_evals  # each function traced exactly once


def test_odeint_fixed_equals_repeated_rk_step_and_returns_trajectory():
  f, y0_fn, _ = PROBLEMS["nonlinear"]
  y0 = y0_fn()
  t0, t1, n = 0.2, 1.4, 6
  h = (t1 - t0) / n
  y = y0
  manual = [y]
  for k in range(n):
    y = rk.rk_step(f, t0 + k * h, y, h, "rk38")
    manual.append(y)
  final = rk.odeint_fixed(f, y0, t0, t1, n, "rk38")
  np.testing.assert_allclose(np.asarray(final[1]), np.asarray(y[1]), atol=1e-14)
  np.testing.assert_allclose(float(final[0]), float(y[0]), atol=1e-14)
  traj = rk.odeint_fixed(f, y0, t0, t1, n, "rk38", return_trajectory=True)
  assert traj[0].shape == (n + 1,) and traj[1].shape == (n + 1, 2)
  np.testing.assert_allclose(
    np.asarray(traj[1]), np.stack([np.asarray(m[1]) for m in manual]), atol=1e-14
  )
  # Backwards in time retraces the solution.
  back = rk.odeint_fixed(f, final, t1, t0, 64, "rk4")
  forward_fine = rk.odeint_fixed(f, y0, t0, t1, 64, "rk4")
  back_fine = rk.odeint_fixed(f, forward_fine, t1, t0, 64, "rk4")
  np.testing.assert_allclose(np.asarray(back_fine[1]), np.asarray(y0[1]), atol=1e-8)
  assert back[1].shape == (2,)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None, "10"])
def test_odeint_fixed_rejects_bad_num_steps(bad):
  with pytest.raises(
    ValueError, match=re.escape(f"num_steps={bad!r}") + ".*must be a positive Python int"
  ):
    rk.odeint_fixed(linear_f, jnp.asarray(LIN_Y0), 0.0, 1.0, bad, "rk4")


def test_odeint_fixed_accepts_numpy_int_and_matches_exact_solution():
  y1 = rk.odeint_fixed(linear_f, jnp.asarray(LIN_Y0), 0.0, T_END, np.int64(64), "rk4")
  np.testing.assert_allclose(np.asarray(y1), linear_exact(), atol=1e-8)


def test_bad_options_raise_before_tracing():
  calls = []

  def f(t, y):
    calls.append(1)
    return y

  with pytest.raises(ValueError, match="solver must be one of.*'bogus'"):
    rk.rk_step(f, 0.0, jnp.ones(2), 0.1, "rk4", solver="bogus")
  with pytest.raises(ValueError, match="implicit_iterations.*0"):
    rk.rk_step(f, 0.0, jnp.ones(2), 0.1, "gauss_legendre2", implicit_iterations=0)
  with pytest.raises(ValueError, match="implicit_iterations.*2.0"):
    rk.odeint_fixed(f, jnp.ones(2), 0.0, 1.0, 3, "radau_iia2", implicit_iterations=2.0)
  with pytest.raises(KeyError, match="known names"):
    rk.rk_step(f, 0.0, jnp.ones(2), 0.1, "rk99")
  assert not calls


@pytest.mark.parametrize("name", ["rk4", "gauss_legendre2"])
def test_vmap_matches_per_example_steps(name):
  ys = jnp.asarray(np.random.RandomState(0).randn(5, 4))
  hs = jnp.linspace(0.05, 0.25, 5)
  batched = jax.vmap(lambda y, h: rk.rk_step(linear_f, 0.0, y, h, name))(ys, hs)
  for i in range(5):
    np.testing.assert_allclose(
      np.asarray(batched[i]), np.asarray(rk.rk_step(linear_f, 0.0, ys[i], hs[i], name)), atol=1e-14
    )


@pytest.mark.parametrize("name", ["dopri5", "radau_iia3"])
def test_float32_state_stays_float32_and_is_accurate(name):
  f, y0_fn, exact_fn = PROBLEMS["nonlinear"]
  y0 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), y0_fn())
  for x64 in (True, False):
    with jax.enable_x64(x64):
      y1 = jax.jit(lambda y: rk.odeint_fixed(f, y, 0.0, T_END, 16, name))(y0)
      assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(y1))
      assert max_error(y1, exact_fn()) < 1e-5


def test_pytree_state_structure_is_preserved():
  def f(t, y):
    return {"x": -y["x"], "nested": [y["nested"][0] * t, -2.0 * y["nested"][1]]}

  y0 = {"x": jnp.ones((2, 3)), "nested": [jnp.ones(4), jnp.asarray(2.0)]}
  for name in ("heun", "lobatto_iiic3"):
    y1 = rk.rk_step(f, 0.0, y0, 0.1, name)
    assert jax.tree_util.tree_structure(y1) == jax.tree_util.tree_structure(y0)
    np.testing.assert_allclose(np.asarray(y1["x"]), np.exp(-0.1), rtol=5e-3)
    np.testing.assert_allclose(float(y1["nested"][1]), 2 * np.exp(-0.2), rtol=5e-3)


def test_fixed_point_iteration_count_sets_the_order():
  """k iterations from the explicit-Euler-like predictor give order min(p, k + 1)."""
  f, y0_fn, exact_fn = PROBLEMS["nonlinear"]
  y0, exact = y0_fn(), exact_fn()
  ns = (8, 12, 16, 24)

  def slope(iterations):
    errors = [
      max_error(
        rk.odeint_fixed(f, y0, 0.0, T_END, n, "gauss_legendre3", implicit_iterations=iterations),
        exact,
      )
      for n in ns
    ]
    return np.polyfit(np.log(1.0 / np.asarray(ns, np.float64)), np.log(errors), 1)[0]

  assert abs(slope(2) - 3) < 0.3
  assert abs(slope(5) - 6) < 0.3


def test_newton_agrees_with_fixed_point_and_differentiates():
  f, y0_fn, _ = PROBLEMS["nonlinear"]
  y0 = y0_fn()
  a = rk.rk_step(f, 0.1, y0, 0.3, "radau_iia3", implicit_iterations=30)
  b = rk.rk_step(f, 0.1, y0, 0.3, "radau_iia3", solver="newton")
  for u, v in zip(a, b):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-13)

  def loss(w):
    return jnp.sum(rk.rk_step(f, 0.1, (y0[0], w), 0.3, "radau_iia3", solver="newton")[1])

  g = jax.jit(jax.grad(loss))(y0[1])
  eps = 1e-6
  fd = [(loss(y0[1].at[i].add(eps)) - loss(y0[1].at[i].add(-eps))) / (2 * eps) for i in range(2)]
  np.testing.assert_allclose(np.asarray(g), np.asarray(fd), rtol=1e-7)


def test_default_iterations():
  assert rk.default_implicit_iterations(4) == 5
  assert [rk.default_implicit_iterations(p, "newton") for p in (1, 3, 4, 6)] == [1, 2, 3, 3]


# ---------------------------------------------------------------------------------------
# Bad input: clear errors before anything runs.


def test_integer_state_is_rejected_not_truncated():
  """Before: odeint_fixed of y' = -y from the int array [1, 2] returned [0, 0]."""
  with pytest.raises(TypeError, match=r"y0 has dtype int.*floating point"):
    rk.odeint_fixed(lambda t, y: -y, jnp.array([1, 2]), 0.0, 1.0, 10, "rk4")
  with pytest.raises(TypeError, match=r"y\['b'\] has dtype int"):
    rk.rk_step(lambda t, y: y, 0.0, {"a": jnp.ones(2), "b": jnp.arange(3)}, 0.1, "euler")
  # The same state as floats integrates: y(1) = exp(-1) y0.
  y1 = rk.odeint_fixed(lambda t, y: -y, jnp.array([1.0, 2.0]), 0.0, 1.0, 20, "rk4")
  np.testing.assert_allclose(np.asarray(y1), np.exp(-1.0) * np.array([1.0, 2.0]), rtol=1e-6)


@pytest.mark.parametrize(
  "f, match",
  [
    (lambda t, y: jnp.sum(y), r"returned shape \(\) for y of shape \(3,\)"),
    (lambda t, y: (y, y), r"returned a pytree of structure"),
    (lambda t, y: y[:2], r"returned shape \(2,\) for y of shape \(3,\)"),
  ],
)
def test_vector_field_of_wrong_shape_or_structure_is_named(f, match):
  """Before: a scalar f broadcast silently and a tuple failed deep inside JAX."""
  for call in (
    lambda: rk.rk_step(f, 0.0, jnp.ones(3), 0.1, "rk4"),
    lambda: rk.odeint_fixed(f, jnp.ones(3), 0.0, 1.0, 4, "rk4"),
    lambda: rk.rk_step(f, 0.0, jnp.ones(3), 0.1, "gauss_legendre2"),
  ):
    with pytest.raises(ValueError, match=match):
      call()


def test_vector_field_leaf_shape_error_names_the_leaf():
  y = {"u": jnp.ones(2), "v": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match=r"for y\['v'\] of shape \(2, 2\)"):
    rk.rk_step(lambda t, s: {"u": s["u"], "v": s["v"][0]}, 0.0, y, 0.1, "heun")


def test_implicit_solves_report_their_residual():
  """A fixed-point or Newton solve stopped too early reports a large final residual, a
  converged one a small one; the step's value is the same with or without the report."""

  def f(t, y):
    return -4.0 * y + jnp.sin(t)

  y = jnp.linspace(-1.0, 1.0, 5)
  few, r_few = rk.rk_step(
    f, 0.0, y, 0.2, "gauss_legendre2", implicit_iterations=1, return_residual=True
  )
  many, r_many = rk.rk_step(
    f, 0.0, y, 0.2, "gauss_legendre2", implicit_iterations=30, return_residual=True
  )
  assert float(r_few) > 0.1 and float(r_many) < 1e-5, (float(r_few), float(r_many))
  np.testing.assert_array_equal(
    few, rk.rk_step(f, 0.0, y, 0.2, "gauss_legendre2", implicit_iterations=1)
  )
  assert float(jnp.max(jnp.abs(many - few))) > 1e-4
  _, r_newton = rk.rk_step(
    f, 0.0, y, 0.2, "gauss_legendre2", implicit_iterations=3, solver="newton", return_residual=True
  )
  assert float(r_newton) < 1e-5
  _, r_explicit = rk.rk_step(f, 0.0, y, 0.2, "rk4", return_residual=True)
  assert r_explicit is None
