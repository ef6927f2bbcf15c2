"""Tests for rknet_jax.tableau_block (paper eqs. 2-4)."""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from rknet_jax import rk, tableaus
from rknet_jax.layers import LayerConfig
from rknet_jax.tableau_block import ConvVectorField, TableauStep

F64 = LayerConfig(dtype=jnp.float64, param_dtype=jnp.float64)
LINEAR_FIELD = functools.partial(
  ConvVectorField, num_layers=1, normalize=False, activation=None, config=F64
)


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _conv(x, kernel):
  """Reference NHWC x HWIO 'SAME' convolution, independent of rknet_jax.conv."""
  return lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _hand_kernel(seed, cin, cout, scale=0.1):
  return jnp.asarray(scale * np.random.RandomState(seed).randn(3, 3, cin, cout))


def _input(shape=(2, 5, 5, 3), seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape))


@pytest.mark.parametrize("name", ["rk4", "dopri5", "gauss_legendre2", "radau_iia2"])
def test_shared_linear_step_equals_rk_step(name):
  """A time-conditioned linear f(t, y) = conv([y, t]) with hand-set weights: one
  TableauStep equals rk_step on the same f (equation 3 with the shared f)."""
  x = _input()
  step = TableauStep(
    tableau=name,
    step_size=0.3,
    time=0.2,
    vector_field=LINEAR_FIELD,
    implicit_iterations=4,
    config=F64,
  )
  variables = step.init(jax.random.key(0), x)
  kernel = _hand_kernel(1, 4, 3)  # 3 state channels + 1 time channel -> 3
  assert variables["params"]["f"]["conv0"]["kernel"].shape == kernel.shape
  variables = {"params": {"f": {"conv0": {"kernel": kernel}}}}
  got = step.apply(variables, x)

  def f(t, y):
    return _conv(jnp.concatenate([y, jnp.full(y.shape[:-1] + (1,), t)], -1), kernel)

  want = rk.rk_step(f, 0.2, x, 0.3, name, implicit_iterations=4)
  assert got.shape == x.shape and got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-13)
  # The time channel matters: another t gives another result.
  other = step.apply(variables, x, t=1.5)
  assert float(jnp.max(jnp.abs(other - got))) > 1e-3


def test_per_stage_linear_step_follows_equation_4():
  """Per-stage f_i with distinct hand-set kernels, checked against Heun's step written
  out by hand; with equal kernels it equals rk_step on the autonomous f."""
  x = _input()
  step = TableauStep(
    tableau="heun",
    step_size=0.25,
    stage_functions="per_stage",
    vector_field=functools.partial(LINEAR_FIELD, time_conditioning=False),
    config=F64,
  )
  params = step.init(jax.random.key(0), x)["params"]
  assert sorted(params) == ["f_0", "f_1"]
  k0, k1 = _hand_kernel(2, 3, 3), _hand_kernel(3, 3, 3)
  got = step.apply(
    {"params": {"f_0": {"conv0": {"kernel": k0}}, "f_1": {"conv0": {"kernel": k1}}}}, x
  )
  z0 = _conv(x, k0)
  z1 = _conv(x + 0.25 * z0, k1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(x + 0.25 * (z0 + z1) / 2), atol=1e-13)
  same = step.apply(
    {"params": {"f_0": {"conv0": {"kernel": k0}}, "f_1": {"conv0": {"kernel": k0}}}}, x
  )
  want = rk.rk_step(lambda t, y: _conv(y, k0), 0.0, x, 0.25, "heun")
  np.testing.assert_allclose(np.asarray(same), np.asarray(want), atol=1e-13)


def test_per_stage_implicit_and_unused_stage_gets_no_parameters():
  x = _input()
  implicit = TableauStep(
    tableau="lobatto_iiic3", stage_functions="per_stage", implicit_iterations=2
  )
  params = implicit.init(jax.random.key(0), x)["params"]
  assert sorted(params) == ["f_0", "f_1", "f_2"]
  # Dormand-Prince's 7th (FSAL) stage has weight 0 and is used by no later stage.
  fixed = TableauStep(
    tableau="dopri5",
    stage_functions="per_stage",
    vector_field=functools.partial(LINEAR_FIELD, time_conditioning=False),
  )
  assert sorted(fixed.init(jax.random.key(0), x)["params"]) == [f"f_{i}" for i in range(6)]


@pytest.mark.parametrize("name", ["rk4", "gauss_legendre2"])
def test_learnable_coefficients_start_at_tableau_and_get_gradients(name):
  tableau = tableaus.get(name)
  x = _input((2, 6, 6, 4))
  step = TableauStep(
    tableau=name,
    step_size=0.4,
    learn_coefficients=True,
    learn_step_size=True,
    implicit_iterations=2,
  )
  variables = step.init(jax.random.key(1), x, train=False)
  params = variables["params"]
  np.testing.assert_array_equal(np.asarray(params["a"]), np.asarray(tableau.a, np.float32))
  np.testing.assert_array_equal(np.asarray(params["b"]), np.asarray(tableau.b, np.float32))
  np.testing.assert_array_equal(np.asarray(params["c"]), np.asarray(tableau.c, np.float32))
  np.testing.assert_allclose(float(jnp.exp(params["log_step_size"])), 0.4, rtol=1e-6)

  def loss(p):
    out, _ = step.apply(
      {"params": p, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
    )
    return jnp.mean(jnp.sin(out) * out)

  grads = jax.jit(jax.grad(loss))(params)
  g_a = np.asarray(grads["a"])
  s = tableau.num_stages
  lower = np.tril(np.ones((s, s), bool), -1)
  if tableau.is_explicit:
    assert np.all(np.abs(g_a[lower]) > 0)  # every strictly lower entry is learned
    assert np.all(g_a[~lower] == 0)  # the step stays explicit
  else:
    assert np.all(np.abs(g_a) > 0)
  assert np.all(np.abs(np.asarray(grads["b"])) > 0)
  assert np.all(np.abs(np.asarray(grads["c"])) > 0)  # through the time channel
  assert abs(float(grads["log_step_size"])) > 0
  # Coefficients equal to the tableau reproduce the fixed-coefficient step.
  fixed = step.clone(learn_coefficients=False, learn_step_size=False)
  fixed_vars = {"params": {"f": params["f"]}, "batch_stats": variables["batch_stats"]}
  np.testing.assert_allclose(
    np.asarray(step.apply(variables, x)), np.asarray(fixed.apply(fixed_vars, x)), atol=1e-5
  )


def test_per_stage_learnable_coefficients_have_no_c():
  x = _input((1, 4, 4, 2))
  step = TableauStep(tableau="midpoint", stage_functions="per_stage", learn_coefficients=True)
  params = step.init(jax.random.key(0), x)["params"]
  assert "c" not in params and params["a"].shape == (2, 2) and params["b"].shape == (2,)


def test_training_mode_updates_batch_stats_and_preserves_shape():
  x = _input((4, 6, 6, 5)).astype(jnp.float32)
  step = TableauStep(
    tableau="ssprk3", step_size=0.5, config=LayerConfig(bn_momentum=0.8), hidden_features=7
  )
  variables = step.init(jax.random.key(0), x)
  f_params = variables["params"]["f"]
  assert f_params["conv0"]["kernel"].shape == (3, 3, 6, 7)  # 5 + time channel -> 7
  assert f_params["conv1"]["kernel"].shape == (3, 3, 8, 5)  # 7 + time channel -> 5
  y, updates = step.apply(variables, x, train=True, mutable=["batch_stats"])
  assert y.shape == x.shape and y.dtype == jnp.float32
  before = variables["batch_stats"]["f"]["bn0"]["mean"]
  after = updates["batch_stats"]["f"]["bn0"]["mean"]
  assert float(jnp.max(jnp.abs(after - before))) > 0
  assert set(variables) == {"params", "batch_stats"}


def test_bfloat16_compute_with_float32_params():
  x = _input((2, 4, 4, 3)).astype(jnp.float32)
  step = TableauStep(
    tableau="gauss_legendre2",
    implicit_iterations=2,
    config=LayerConfig(dtype=jnp.bfloat16),
    learn_coefficients=True,
    learn_step_size=True,
  )
  variables = step.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  y = step.apply(variables, x)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_conv_vector_field_time_conditioning_and_shapes():
  field = ConvVectorField(hidden_features=6, config=F64)
  y = _input((1, 4, 4, 3))
  variables = field.init(jax.random.key(0), 0.0, y)
  out0 = field.apply(variables, 0.0, y)
  out1 = field.apply(variables, 1.0, y)
  assert out0.shape == y.shape
  assert float(jnp.max(jnp.abs(out1 - out0))) > 0
  plain = ConvVectorField(time_conditioning=False)
  assert plain.init(jax.random.key(0), 0.0, y)["params"]["conv0"]["kernel"].shape == (3, 3, 3, 3)


@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    (dict(tableau="rk5000"), KeyError, "known names"),
    (dict(tableau="rk4", stage_functions="each"), ValueError, "stage_functions"),
    (dict(tableau="rk4", step_size=0.0), ValueError, "step_size.*0.0"),
    (dict(tableau="rk4", step_size=float("nan")), ValueError, "step_size"),
    (dict(tableau="radau_iia2", implicit_iterations=0), ValueError, "implicit_iterations.*0"),
    (dict(tableau="rk4", vector_field=ConvVectorField()), ValueError, "factory"),
  ],
)
def test_invalid_configuration_raises_on_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    TableauStep(**kwargs)


def test_usable_inside_a_flax_model():
  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(4, (3, 3))(x)
      for n in range(2):
        x = TableauStep(tableau="rk38", step_size=0.5, time=0.5 * n, learn_step_size=True)(
          x, train=train
        )
      return jnp.mean(x, axis=(1, 2))

  x = _input((2, 6, 6, 3)).astype(jnp.float32)
  variables = Tiny().init(jax.random.key(0), x)
  assert {"TableauStep_0", "TableauStep_1"} <= set(variables["params"])
  out, _ = Tiny().apply(variables, x, train=True, mutable=["batch_stats"])
  assert out.shape == (2, 4)


class _Calls:
  n = 0


class _CountingField(nn.Module):
  """f(t, y) = -y that counts its evaluations (a Python side effect, no parameters)."""

  calls: _Calls

  @nn.compact
  def __call__(self, t, y, train=False):
    self.calls.n += 1
    return -y


@pytest.mark.parametrize("mode", ["shared", "per_stage"])
@pytest.mark.parametrize("learn", [False, True])
def test_num_evaluations_counts_vector_field_calls(mode, learn):
  x = jnp.ones((1, 2, 2, 1))
  for name in tableaus.names():
    calls = _Calls()
    step = TableauStep(
      tableau=tableaus.get(name),
      stage_functions=mode,
      learn_coefficients=learn,
      vector_field=functools.partial(_CountingField, calls),
    )
    variables = step.init(jax.random.key(0), x)
    calls.n = 0
    y = step.apply(variables, x)
    assert calls.n == step.num_evaluations, name
    if not learn:  # f = -y: one step approximates exp(-h) y with h = 1
      assert abs(float(y[0, 0, 0, 0]) - np.exp(-1.0)) < 0.4, name
  assert TableauStep(tableau="dopri5").num_evaluations == 6  # FSAL stage skipped
  assert TableauStep(tableau="gauss_legendre2", implicit_iterations=3).num_evaluations == 1 + 2 * 3


def test_implicit_step_sows_its_residual():
  """TableauStep and the clique blocks sow their implicit solve's final residual;
  rk.implicit_residuals reads it from the apply's state: large after too few iterations,
  small once converged; explicit steps sow nothing."""
  from rknet_jax import blocks

  x = 0.5 * _input()
  residuals = {}
  for iterations in (1, 25):
    step = TableauStep(
      tableau="gauss_legendre2",
      step_size=0.3,
      vector_field=LINEAR_FIELD,
      implicit_iterations=iterations,
      config=F64,
    )
    variables = {"params": {"f": {"conv0": {"kernel": _hand_kernel(1, 4, 3, scale=0.2)}}}}
    y, state = step.apply(variables, x, mutable=["intermediates"])
    np.testing.assert_array_equal(y, step.apply(variables, x))  # reporting changes nothing
    residuals[iterations] = rk.implicit_residuals(state)
  assert list(residuals[1]) == [""]  # the top-level module's own path
  assert float(residuals[1][""]) > 1e-3 > 1e-9 > float(residuals[25][""]), residuals
  explicit = TableauStep(tableau="rk4", vector_field=LINEAR_FIELD, config=F64)
  v = explicit.init(jax.random.key(0), x)
  assert rk.implicit_residuals(explicit.apply(v, x, mutable=["intermediates"])[1]) == {}
  block = blocks.CliqueBlock(2, 3, num_updates=2)
  v = block.init(jax.random.key(0), x.astype(jnp.float32), train=False)
  assert sorted(v) == ["batch_stats", "params"]
  _, state = block.apply(v, x.astype(jnp.float32), train=False, mutable=["intermediates"])
  assert set(rk.implicit_residuals(state)) == {""}
  assert float(rk.implicit_residuals(state)[""]) > 0
  from rknet_jax import registry

  model = registry.create_model("IRKNet-2x1 2x1", growth_rate=3)
  images = x[..., :3].astype(jnp.float32)
  v = model.init(jax.random.key(0), images, train=False)
  _, state = model.apply(v, images, train=False, mutable=["intermediates"])
  assert sorted(rk.implicit_residuals(state)) == [
    "period1_step1/clique_block",
    "period2_step1/clique_block",
  ]
