"""ERK / IRK time-steps against independent references (paper section 3.3).

The references below are written from the papers with plain jnp/lax ops (BatchNorm by hand,
one convolution per (input, filter) pair, summed), not with the library's modules, so they
check both the interpretation (ERK step = dense block + sum, IRK step = clique block + sum)
and the one-convolution-over-a-concatenation implementation.
"""

import chex
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from rknet_jax import blocks, layers
from rknet_jax.layers import LayerConfig

EPS = LayerConfig().bn_epsilon
ATOL = 2e-5


def _conv(x, kernel):
  return lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=lax.Precision.HIGHEST,
  )


def _bn_relu(x, p):
  """Training-mode BatchNorm (batch statistics) then ReLU."""
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  return jax.nn.relu((x - mean) / jnp.sqrt(var + EPS) * p["scale"] + p["bias"])


def _bn_relu_parts(parts, p):
  """BN -> ReLU of concat(parts), returned per part (BN is per channel)."""
  out, start = [], 0
  for x in parts:
    c = x.shape[-1]
    out.append(
      _bn_relu(x, {"scale": p["scale"][start : start + c], "bias": p["bias"][start : start + c]})
    )
    start += c
  return out


def _init_train(module, x):
  variables = module.init({"params": _key()}, x, train=False)
  # Perturb BN scales/biases so that they matter in the comparison.
  leaves, tree = jax.tree_util.tree_flatten(variables["params"])
  rng = np.random.default_rng(2)
  leaves = [l + 0.1 * rng.standard_normal(l.shape, np.float32) for l in leaves]
  variables = {
    "params": jax.tree_util.tree_unflatten(tree, leaves),
    "batch_stats": variables["batch_stats"],
  }
  out, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
  return variables["params"], out


def _key(seed=0):
  # rbg keys: flax initialisers compile much faster on CPU than with threefry.
  return jax.random.key(seed, impl="unsafe_rbg")


def _x(c, n=4, hw=6, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, hw, hw, c), np.float32))


def _dense_layer_ref(p, feats, bottleneck):
  if bottleneck:
    h = _conv(
      _bn_relu(jnp.concatenate(feats, -1), p["bn_relu_conv1x1"]["bn"]),
      p["bn_relu_conv1x1"]["conv"]["kernel"],
    )
    return _conv(_bn_relu(h, p["bn_relu_conv3x3"]["bn"]), p["bn_relu_conv3x3"]["conv"]["kernel"])
  return _conv(
    _bn_relu(jnp.concatenate(feats, -1), p["bn_relu_conv3x3"]["bn"]),
    p["bn_relu_conv3x3"]["conv"]["kernel"],
  )


def _dense_block_ref(p, x, num_layers, bottleneck):
  """DenseNet dense block (Huang et al. 2017): layer l reads concat(x, g_1..g_{l-1})."""
  feats = [x]
  for l in range(num_layers):
    feats.append(_dense_layer_ref(p[f"layer{l + 1}"], feats, bottleneck))
  return feats


@pytest.mark.parametrize("width", [None, 5])
@pytest.mark.slow
def test_erk_step_is_dense_block_plus_summation(width):
  s, m, k = 3, 2, 4
  step = blocks.ERKStep(s, m, k, width)
  y = _x(m * k)
  params, out = _init_train(step, y)
  feats = _dense_block_ref(params["dense_block"], y, s * m, width is not None)
  growths = feats[1:]
  assert len(growths) == s * m  # Rule 3
  groups = [jnp.concatenate(growths[i * m : (i + 1) * m], -1) for i in range(s)]  # Rule 2
  expected = y + sum(groups)
  np.testing.assert_allclose(out, expected, atol=ATOL, rtol=1e-4)
  # The library's DenseBlock (used by DenseNet) is the same block.
  dense = blocks.DenseBlock(s * m, k, width)
  got, _ = dense.apply(
    {
      "params": params["dense_block"],
      "batch_stats": jax.tree_util.tree_map(
        jnp.zeros_like, dense.init(_key(), y, train=False)["batch_stats"]
      ),
    },
    y,
    train=True,
    mutable=["batch_stats"],
  )
  # It returns the concatenation [x, g_1, .., g_L] (one channel buffer).
  np.testing.assert_allclose(got, jnp.concatenate(feats, -1), atol=ATOL, rtol=1e-4)


def test_erk_step_s1_m1_is_preactivation_residual_unit():
  k = 6
  step = blocks.ERKStep(1, 1, k)
  y = _x(k)
  params, out = _init_train(step, y)
  p = params["dense_block"]["layer1"]["bn_relu_conv3x3"]
  expected = y + _conv(_bn_relu(y, p["bn"]), p["conv"]["kernel"])
  np.testing.assert_allclose(out, expected, atol=ATOL, rtol=1e-4)


def test_erk_step_rejects_wrong_width():
  with pytest.raises(ValueError, match="Rule 1"):
    blocks.ERKStep(2, 2, 4).init(jax.random.PRNGKey(0), _x(6), train=False)


def _clique_ref(p, x0, s, bottleneck, num_updates, order):
  """CliqueNet block (Yang et al. 2018): one conv per (input j, stage i) filter W_ji, summed."""

  def g(pass_name, i, srcs):  # srcs: list of (j, X_j)
    pp = p[f"{pass_name}_stage{i}"]["bn"]
    parts = _bn_relu_parts([xj for _, xj in srcs], pp)
    h = sum(_conv(part, p[f"W_{j}_{i}"]) for (j, _), part in zip(srcs, parts))
    if bottleneck:
      h = _conv(_bn_relu(h, p[f"{pass_name}_stage{i}_bn3x3"]), p[f"stage{i}_conv3x3"]["kernel"])
    return h

  X = {}
  for i in range(1, s + 1):
    X[i] = g("pass1", i, [(0, x0)] + [(j, X[j]) for j in range(1, i)])
  for u in range(1, num_updates + 1):
    prev = dict(X)
    for i in range(1, s + 1):
      src = X if order == "gauss_seidel" else prev
      X[i] = g(f"update{u}", i, [(j, src[j]) for j in range(1, s + 1) if j != i])
  return [X[i] for i in range(1, s + 1)]


@pytest.mark.parametrize("width", [None, 4])
@pytest.mark.parametrize("order", ["gauss_seidel", "jacobi"])
def test_irk_step_is_clique_block_plus_summation(width, order):
  s, k = 3, 4
  step = blocks.IRKStep(s, k, width, update_order=order)
  y = _x(k)
  params, out = _init_train(step, y)
  p = params["clique_block"]
  final = _clique_ref(p, y, s, width is not None, 1, order)
  np.testing.assert_allclose(out, y + sum(final), atol=ATOL, rtol=1e-4)


def test_clique_block_has_s_squared_shared_filters():
  s, k = 4, 5
  block = blocks.CliqueBlock(s, k)
  v = jax.eval_shape(lambda: block.init(_key(), _x(k), train=False))
  ws = {n: a.shape for n, a in v["params"].items() if n.startswith("W_")}
  assert len(ws) == s * s
  assert all(shape == (3, 3, k, k) for shape in ws.values())
  # Bottleneck: s^2 1x1 filters k->k and s 3x3 k->k shared by both passes.
  block = blocks.CliqueBlock(s, k, k)
  v = jax.eval_shape(lambda: block.init(_key(), _x(k), train=False))
  shapes = [a.shape for n, a in v["params"].items() if n.startswith("W_")]
  assert len(shapes) == s * s and all(sh == (1, 1, k, k) for sh in shapes)
  convs = [n for n in v["params"] if n.endswith("conv3x3")]
  assert len(convs) == s


def test_gauss_seidel_and_jacobi_differ_with_the_same_weights():
  s, k = 3, 4
  y = _x(k)
  gs = blocks.IRKStep(s, k, update_order="gauss_seidel")
  jac = blocks.IRKStep(s, k, update_order="jacobi")
  variables = gs.init(_key(), y, train=False)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
    jac.init(_key(), y, train=False)
  )
  a = gs.apply(variables, y, train=False)
  b = jac.apply(variables, y, train=False)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


@pytest.mark.parametrize("width", [None, 4])
def test_num_updates_iterate_the_same_shared_weights(width):
  s, k, n = 3, 4, 3
  y = _x(k)
  one = blocks.CliqueBlock(s, k, width, num_updates=1)
  many = blocks.CliqueBlock(s, k, width, num_updates=n)
  p1 = jax.eval_shape(lambda: one.init(_key(), y, train=False))["params"]
  params, (_, final) = _init_train(many, y)

  def conv_names(p):
    return sorted(nm for nm in p if nm.startswith("W_") or "conv3x3" in nm and "bn" not in nm)

  # Same filters (no new conv weights per update); only the BatchNorms of each pass are new.
  assert conv_names(params) == conv_names(p1)
  assert sorted(nm for nm in params if nm.startswith("update")) == sorted(
    f"update{u}_stage{i}" + suffix
    for u in range(1, n + 1)
    for i in range(1, s + 1)
    for suffix in ([""] + (["_bn3x3"] if width else []))
  )
  expected = _clique_ref(params, y, s, width is not None, n, "gauss_seidel")
  # float32 rounding of 1 + n passes of BN -> conv (the library's one-pass variance against
  # the reference's two-pass one) stays within 3e-5 of outputs of size ~1.
  for a, b in zip(final, expected):
    np.testing.assert_allclose(a, b, atol=2.5 * ATOL, rtol=1e-4)


def test_unshared_variant_matches_the_authors_rkcnn_layout():
  s, k = 3, 4
  y = _x(k)
  block = blocks.CliqueBlock(s, k, k, share_weights=False, num_updates=1)
  block2 = blocks.CliqueBlock(s, k, k, share_weights=False, num_updates=2)
  v1 = jax.eval_shape(lambda: block.init(_key(), y, train=False))["params"]
  v2 = jax.eval_shape(lambda: block2.init(_key(), y, train=False))["params"]
  assert jax.tree_util.tree_structure(v1) == jax.tree_util.tree_structure(v2)
  assert sorted(v1) == sorted(
    [f"pass1_stage{i}" for i in range(1, s + 1)] + [f"update_stage{i}" for i in range(1, s + 1)]
  )
  # Pass I layer i reads concat(y, earlier stages); update layer i reads concat(y, others).
  for i in range(1, s + 1):
    assert v1[f"pass1_stage{i}"]["bn_relu_conv1x1"]["conv"]["kernel"].shape == (1, 1, k * i, k)
    assert v1[f"update_stage{i}"]["bn_relu_conv1x1"]["conv"]["kernel"].shape == (1, 1, k * s, k)
  variables = block.init(_key(), y, train=False)
  gs = block.apply(variables, y, train=False)[1]
  jac = block.clone(update_order="jacobi").apply(variables, y, train=False)[1]
  assert float(jnp.max(jnp.abs(gs[-1] - jac[-1]))) > 1e-3
  two = block2.apply(variables, y, train=False)[1]
  assert float(jnp.max(jnp.abs(two[0] - gs[0]))) > 1e-3


def test_shared_clique_block_needs_two_stages():
  with pytest.raises(ValueError, match="s >= 2"):
    blocks.CliqueBlock(1, 4).init(_key(), _x(4), train=False)
  with pytest.raises(ValueError, match="update_order"):
    blocks.CliqueBlock(2, 4, update_order="newest").init(_key(), _x(4), train=False)


class _Loss(nn.Module):
  step: nn.Module

  @nn.compact
  def __call__(self, x, train):
    return self.step(x, train)


@pytest.mark.parametrize("kind", ["irk", "irk_b", "irk_unshared"])
@pytest.mark.slow
def test_remat_gives_identical_loss_gradients_and_batch_stats(kind):
  k = 4
  make = {
    "irk": lambda r: blocks.IRKStep(3, k, config=LayerConfig(remat=r)),
    "irk_b": lambda r: blocks.IRKStep(3, k, k, num_updates=2, config=LayerConfig(remat=r)),
    "irk_unshared": lambda r: blocks.IRKStep(
      3, k, k, share_weights=False, config=LayerConfig(remat=r)
    ),
  }[kind]
  y = _x(k)
  plain, rem = make(False), make(True)
  variables = plain.init(_key(), y, train=False)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
    rem.init(_key(), y, train=False)
  )

  def loss_fn(model):
    def f(params):
      out, upd = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        y,
        train=True,
        mutable=["batch_stats"],
      )
      return jnp.sum(jnp.sin(out)), upd["batch_stats"]

    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (l0, s0), g0 = loss_fn(plain)(variables["params"])
  (l1, s1), g1 = loss_fn(rem)(variables["params"])
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  # Equal up to float32 rounding (recomputation lets XLA fuse and reassociate differently).
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))
  chex.assert_trees_all_close(s0, s1, rtol=1e-6, atol=1e-7)
  # The remat model really rematerialises (a checkpoint in its gradient jaxpr).
  jaxpr = str(
    jax.make_jaxpr(
      lambda p: jax.grad(
        lambda q: jnp.sum(
          rem.apply(
            {"params": q, "batch_stats": variables["batch_stats"]},
            y,
            train=True,
            mutable=["batch_stats"],
          )[0]
        )
      )(p)
    )(variables["params"])
  )
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  assert "checkpoint" not in str(
    jax.make_jaxpr(
      lambda p: plain.apply(
        {"params": p, "batch_stats": variables["batch_stats"]},
        y,
        train=True,
        mutable=["batch_stats"],
      )
    )(variables["params"])
  )


def test_running_stats_updated_once_per_forward_with_remat():
  k = 4
  y = _x(k)
  step = blocks.ERKStep(1, 1, k, config=LayerConfig(remat=True))
  variables = step.init(_key(), y, train=False)

  def f(params):
    out, upd = step.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      y,
      train=True,
      mutable=["batch_stats"],
    )
    return jnp.sum(out**2), upd["batch_stats"]

  (_, stats), _ = jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])
  got = stats["dense_block"]["layer1"]["bn_relu_conv3x3"]["bn"]
  momentum = LayerConfig().bn_momentum
  np.testing.assert_allclose(
    got["mean"], (1 - momentum) * y.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7
  )
  np.testing.assert_allclose(
    got["var"], momentum + (1 - momentum) * y.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7
  )


class _PlainBNReLUConv(nn.Module):
  """concat -> flax BatchNorm -> ReLU -> one conv of the concatenation (the formulation the
  library's per-part path replaces), with the same submodule names ``bn`` and ``conv``."""

  features: int

  @nn.compact
  def __call__(self, inputs, train):
    x = jnp.concatenate(inputs, axis=-1)
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=LayerConfig().bn_momentum,
      epsilon=LayerConfig().bn_epsilon,
      name="bn",
    )(x)
    return nn.Conv(self.features, (1, 1), use_bias=False, name="conv")(jax.nn.relu(x))


@pytest.mark.parametrize("impl", ["dot1x1", "xla"])
def test_chunked_bn_relu_conv1x1_equals_concat_formulation(impl):
  """BNReLUConv (1x1 on a list) and BNReLUKernelConv (1x1 kernel) computed part by part
  equal BN -> ReLU -> conv of the materialised concatenation: same variables, outputs
  (train and eval), parameter and input gradients, and BN running statistics."""
  parts = [_x(5, seed=1), _x(3, seed=2) * 2.0 + 1.0, _x(4, seed=3) - 0.5]
  d = 6
  cfg = LayerConfig(conv_impl=impl)
  chunked = layers.BNReLUConv(d, (1, 1), config=cfg)
  plain = _PlainBNReLUConv(d)
  v = chunked.init(_key(), parts, train=False)
  assert set(v["params"]) == {"bn", "conv"}
  assert v["params"]["conv"]["kernel"].shape == (1, 1, 12, d)
  assert v["params"]["bn"]["scale"].shape == (12,)
  assert v["batch_stats"]["bn"]["mean"].shape == (12,)
  # Non-trivial BN parameters and running statistics, so slices are really checked.
  rng = np.random.default_rng(7)
  params = {
    "bn": {
      "scale": jnp.asarray(rng.uniform(0.5, 1.5, 12), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=12), jnp.float32),
    },
    "conv": v["params"]["conv"],
  }
  stats = {
    "bn": {
      "mean": jnp.asarray(rng.normal(size=12), jnp.float32),
      "var": jnp.asarray(rng.uniform(0.5, 2.0, 12), jnp.float32),
    }
  }

  def kernel_conv(p, s, xs, train):
    return layers.BNReLUKernelConv(cfg).apply(
      {"params": {"bn": p["bn"]}, "batch_stats": s},
      xs,
      p["conv"]["kernel"],
      train,
      mutable=["batch_stats"],
    )

  runs = {
    "chunked": lambda p, s, xs, train: chunked.apply(
      {"params": p, "batch_stats": s}, xs, train, mutable=["batch_stats"]
    ),
    "kernel": kernel_conv,
    "plain": lambda p, s, xs, train: plain.apply(
      {"params": p, "batch_stats": s}, xs, train, mutable=["batch_stats"]
    ),
  }
  results = {}
  for name, run in runs.items():

    def loss(p, xs, run=run):
      out, upd = run(p, stats, xs, True)
      return jnp.sum(jnp.sin(out)), (out, upd["batch_stats"])

    (_, (out, new_stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      params, parts
    )
    eval_out = jax.jit(lambda p, xs, run=run: run(p, stats, xs, False)[0])(params, parts)
    results[name] = (out, new_stats, grads, eval_out)
  # The per-part path builds no activation-sized concatenation with the dot formulation.
  jaxpr = jax.make_jaxpr(
    lambda p, xs: jax.grad(
      lambda q, ys: jnp.sum(runs["chunked"](q, stats, ys, True)[0]), argnums=(0, 1)
    )(p, xs)
  )(params, parts)
  concats = [
    e for e in jaxpr.jaxpr.eqns if e.primitive.name == "concatenate" and e.outvars[0].aval.ndim == 4
  ]
  assert (len(concats) == 0) == (impl == "dot1x1")
  ref = results["plain"]
  assert float(jnp.max(jnp.abs(ref[1]["bn"]["mean"] - stats["bn"]["mean"]))) > 1e-3
  for name in ("chunked", "kernel"):
    out, new_stats, grads, eval_out = results[name]
    np.testing.assert_allclose(out, ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eval_out, ref[3], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(new_stats), jax.tree_util.tree_leaves(ref[1])):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    g_ref = ref[2]
    np.testing.assert_allclose(
      grads[0]["conv"]["kernel"], g_ref[0]["conv"]["kernel"], rtol=1e-5, atol=1e-5
    )
    for key in ("scale", "bias"):
      np.testing.assert_allclose(grads[0]["bn"][key], g_ref[0]["bn"][key], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[1], g_ref[1]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_dense_layer_init_equals_concat_formulation():
  """The per-part layer declares the same parameters with the same initial values."""
  parts = [_x(5, seed=1), _x(3, seed=2)]
  got = layers.BNReLUConv(6, (1, 1)).init(_key(), parts, train=False)
  want = layers.BNReLUConv(6, (1, 1)).init(_key(), jnp.concatenate(parts, -1), train=False)
  chex.assert_trees_all_equal(got, want)
