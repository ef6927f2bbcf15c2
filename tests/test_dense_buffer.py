"""The dense block on one channel buffer (rknet_jax/dense_buffer.py).

Against the formulation it replaced (a Python loop of ``DenseLayer`` s on the growing list
of features, concatenated per layer): same variables and initial values, outputs,
gradients, BatchNorm statistics and dropout masks; and training memory linear in depth.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rknet_jax import batch_norm as bn_math
from rknet_jax import blocks, dense_buffer
from rknet_jax.layers import LayerConfig


class _LoopDenseBlock(nn.Module):
  """The previous DenseBlock: layer l is a DenseLayer on the list [x, g_1, .., g_{l-1}]."""

  num_layers: int
  growth_rate: int
  bottleneck_width: int = None
  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, x, train):
    feats = [x]
    for l in range(self.num_layers):
      feats.append(
        blocks.DenseLayer(
          self.growth_rate, self.bottleneck_width, self.config, name=f"layer{l + 1}"
        )(list(feats), train)
      )
    return jnp.concatenate(feats, axis=-1)


def _x(c, n=3, hw=5, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, hw, hw, c)), jnp.float32)


def _perturbed(variables, seed=3):
  """Parameters and running statistics away from their initial values, so that BN scale,
  bias, mean and var all matter."""
  rng = np.random.default_rng(seed)

  def bump(path, v):
    keys = [getattr(p, "key", "") for p in path]
    if keys[-1] == "var":
      return v + jnp.asarray(rng.uniform(0.1, 0.5, v.shape), v.dtype)
    return v + jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype)

  return jax.tree_util.tree_map_with_path(bump, variables)


def _max_rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def _run(model, variables, x, train, rngs):
  def loss(params, x):
    out, upd = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=train,
      mutable=["batch_stats"],
      rngs=rngs,
    )
    weights = jnp.arange(out.shape[-1], dtype=out.dtype)
    return jnp.sum(jnp.sin(out) * weights), (out, upd)

  (value, (out, upd)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
    variables["params"], x
  )
  return value, out, upd, grads


# 9 layers from 6 channels at k = 3: input widths 6, 9, .., 30, so the backward pass has
# single-layer buckets and multi-layer (scanned, padded) ones.
_L, _K, _C0 = 9, 3, 6


def test_the_shapes_used_below_have_scanned_buckets():
  plan = dense_buffer.DenseBlockPlan(_C0, _L, _K, None, True, 1e-3, "float32", "dot1x1")
  sizes = [b - a for a, b in plan.buckets()]
  assert sum(sizes) == _L and max(sizes) > 1 and min(sizes) == 1


# Each case compiles two dense blocks (about 25 s on a loaded 2-core machine): the quick suite
# keeps the plain block without dropout; the full suite runs every case.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
  "bottleneck", [None, pytest.param(4, marks=SLOW)], ids=["plain", "bottleneck"]
)
@pytest.mark.parametrize(
  "dropout", [0.0, pytest.param(0.3, marks=SLOW)], ids=["no_dropout", "dropout"]
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_buffer_block_equals_the_loop_of_dense_layers(bottleneck, dropout, train):
  cfg = LayerConfig(dropout_rate=dropout)
  new = blocks.DenseBlock(_L, _K, bottleneck, cfg, formulation="buffer")
  old = _LoopDenseBlock(_L, _K, bottleneck, cfg)
  x = _x(_C0)
  init_new = new.init(jax.random.PRNGKey(0), x, train=False)
  init_old = old.init(jax.random.PRNGKey(0), x, train=False)
  # Same variable tree and the same initial values (old checkpoints load unchanged).
  chex.assert_trees_all_equal(init_new, init_old)

  variables = _perturbed(init_new)
  rngs = {"dropout": jax.random.PRNGKey(7)}
  v_new, out_new, upd_new, g_new = _run(new, variables, x, train, rngs)
  v_old, out_old, upd_old, g_old = _run(old, variables, x, train, rngs)
  assert out_new.shape == (x.shape[:3] + (_C0 + _L * _K,))
  assert _max_rel(out_new, out_old) < 1e-6  # dropout masks included
  np.testing.assert_allclose(v_new, v_old, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old)):  # params and input
    assert a.shape == b.shape
    assert _max_rel(a, b) < 1e-5
  chex.assert_trees_all_close(upd_new, upd_old, rtol=1e-5, atol=1e-6)
  if not train:  # eval mode leaves the running statistics alone
    for a, b in zip(jax.tree.leaves(upd_new), jax.tree.leaves(variables["batch_stats"])):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  "bottleneck", [None, pytest.param(4, marks=SLOW)], ids=["plain", "bottleneck"]
)
def test_buffer_block_with_xla_convolutions_equals_the_loop(bottleneck):
  """The GPU/TPU formulation (XLA's native convolutions, also inside the backward scans)."""
  cfg = LayerConfig(conv_impl="xla", dropout_rate=0.2)
  new = blocks.DenseBlock(_L, _K, bottleneck, cfg)
  assert new.uses_buffer()
  old = _LoopDenseBlock(_L, _K, bottleneck, cfg)
  x = _x(_C0)
  variables = _perturbed(new.init(jax.random.PRNGKey(0), x, train=False))
  rngs = {"dropout": jax.random.PRNGKey(3)}
  _, out_new, upd_new, g_new = _run(new, variables, x, True, rngs)
  _, out_old, upd_old, g_old = _run(old, variables, x, True, rngs)
  assert _max_rel(out_new, out_old) < 1e-6
  for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old)):
    assert _max_rel(a, b) < 1e-5
  chex.assert_trees_all_close(upd_new, upd_old, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_block_follows_the_float32_one():
  x = _x(_C0)
  f32 = blocks.DenseBlock(_L, _K, 4, formulation="buffer")
  bf16 = blocks.DenseBlock(_L, _K, 4, LayerConfig(dtype=jnp.bfloat16), formulation="buffer")
  variables = _perturbed(f32.init(jax.random.PRNGKey(0), x, train=False))
  _, out32, _, g32 = _run(f32, variables, x, True, {})
  _, out16, _, g16 = _run(bf16, variables, x.astype(jnp.bfloat16), True, {})
  assert out16.dtype == jnp.bfloat16
  assert _max_rel(out16.astype(jnp.float32), out32) < 0.05
  assert (
    _max_rel(
      g16[0]["layer1"]["bn_relu_conv1x1"]["conv"]["kernel"],
      g32[0]["layer1"]["bn_relu_conv1x1"]["conv"]["kernel"],
    )
    < 0.1
  )


def _train_temp_bytes(num_layers):
  block = blocks.DenseBlock(num_layers, 8, 16, formulation="buffer")
  x = jax.ShapeDtypeStruct((8, 16, 16, 16), jnp.float32)
  variables = jax.eval_shape(
    lambda: block.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 16)), train=False)
  )

  def loss(params, batch_stats, x):
    out, upd = block.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(out**2), upd

  compiled = (
    jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))
    .lower(variables["params"], variables["batch_stats"], x)
    .compile()
  )
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_training_memory_grows_linearly_with_depth():
  """XLA's temporary memory for the gradient of a dense block: from 8 to 16 layers it grows
  by no more than twice its growth from 4 to 8 (linear, plus slack for XLA's choices); the
  loop of DenseLayers grows quadratically (each layer's concatenation or BN -> ReLU output
  kept for the backward pass), which this formulation does not."""
  t4, t8, t16 = (_train_temp_bytes(n) for n in (4, 8, 16))
  assert t4 < t8 < t16
  assert t16 - t8 <= 2.4 * (t8 - t4), (t4, t8, t16)


def test_buckets_cover_the_layers_with_bounded_padding():
  for c0, num_layers, k in [(24, 16, 12), (48, 41, 24), (36, 6, 36), (6, 1, 3), (64, 48, 32)]:
    plan = dense_buffer.DenseBlockPlan(c0, num_layers, k, 4 * k, True, 1e-3, "float32", "xla")
    buckets = plan.buckets()
    assert buckets[0][0] == 0 and buckets[-1][1] == num_layers
    for (a, b), (a2, _) in zip(buckets, buckets[1:]):
      assert b == a2 and a < b
    for a, b in buckets:
      assert plan.in_width(b - 1) <= dense_buffer.BUCKET_WIDTH_RATIO * plan.in_width(a)


def test_mismatched_layers_are_named():
  plan = dense_buffer.DenseBlockPlan(4, 2, 2, None, True, 1e-3, "float32", "xla")
  bn = dense_buffer.BNVars(jnp.ones(4), jnp.zeros(4), jnp.zeros(4), jnp.ones(4))
  unit = dense_buffer.ConvUnitVars(bn, jnp.zeros((3, 3, 4, 2)))
  with pytest.raises(ValueError, match="1 layers given, the plan has 2"):
    dense_buffer.dense_block(plan, jnp.zeros((1, 3, 3, 4)), [dense_buffer.LayerVars(unit)])
  with pytest.raises(ValueError, match="layer 2's kernel reads 4 channels, its input has 6"):
    dense_buffer.dense_block(
      plan, jnp.zeros((1, 3, 3, 4)), [dense_buffer.LayerVars(unit), dense_buffer.LayerVars(unit)]
    )


@pytest.mark.parametrize("remat", [False, True])
def test_deep_erk_steps_use_the_buffer_block_with_or_without_remat(remat):
  """A block deeper than LOOP_MAX_LAYERS runs on the buffer (custom VJP) on every backend,
  so ``remat`` adds no checkpoint around it; a shallow one on CPU is the loop of layers."""
  m = blocks.LOOP_MAX_LAYERS + 1
  step = blocks.ERKStep(1, m, 2, 4, config=LayerConfig(remat=remat))
  y = _x(2 * m)
  variables = step.init(jax.random.PRNGKey(0), y, train=False)

  def loss(q):
    return jnp.sum(
      step.apply(
        {"params": q, "batch_stats": variables["batch_stats"]},
        y,
        train=True,
        mutable=["batch_stats"],
      )[0]
    )

  assert "custom_vjp_call" in str(jax.make_jaxpr(loss)(variables["params"]))
  grad_jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
  assert "checkpoint" not in grad_jaxpr and "remat" not in grad_jaxpr
  shallow = blocks.DenseBlock(blocks.LOOP_MAX_LAYERS, 2, 4)
  assert not shallow.uses_buffer()  # the test suite runs on CPU ("auto" -> "dot1x1")
  assert shallow.clone(config=LayerConfig(conv_impl="xla")).uses_buffer()


def test_unknown_formulation_is_named():
  with pytest.raises(ValueError, match="formulation='scan'.*'auto', 'buffer', 'loop'"):
    blocks.DenseBlock(2, 2, formulation="scan").init(jax.random.PRNGKey(0), _x(4), train=False)


def test_dense_formulation_is_a_model_option():
  """``dense_formulation`` reaches every dense block through the model's LayerConfig (no
  global to patch): "buffer" runs a shallow CPU block on the buffer (custom VJP), "loop"
  does not, with the same variables and logits."""
  from rknet_jax import registry

  x = _x(3)
  models = {
    f: registry.create_model("ERKNet-2x1", growth_rate=4, dense_formulation=f)
    for f in ("loop", "buffer")
  }
  variables = models["loop"].init(jax.random.PRNGKey(0), x, train=False)
  logits = {f: m.apply(variables, x, train=False) for f, m in models.items()}
  np.testing.assert_allclose(logits["buffer"], logits["loop"], rtol=1e-5, atol=1e-5)
  for f, m in models.items():
    jaxpr = str(jax.make_jaxpr(lambda v, m=m: m.apply(v, x, train=False))(variables))
    assert ("custom_vjp_call" in jaxpr) == (f == "buffer"), f
  assert blocks.DenseBlock(2, 2, config=LayerConfig(dense_formulation="buffer")).uses_buffer()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_saved_moments_have_the_values_and_cotangent_of_moments(dtype):
  """The backward pass's rebuild of a bottleneck BatchNorm reuses the forward pass's batch
  statistics: same values, same cotangent of the input as differentiating the moments."""
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 5, 7)) * 3.0 + 1.5
  x = x.at[..., 2].set(0.25).astype(dtype)  # a constant channel: variance clipped at 0
  cts = (
    jax.random.normal(jax.random.PRNGKey(1), (7,)),
    jax.random.normal(jax.random.PRNGKey(2), (7,)),
  )
  want, vjp_want = jax.vjp(bn_math.moments, x)
  got, vjp_got = jax.vjp(lambda x: dense_buffer._saved_moments(x, *want), x)
  chex.assert_trees_all_equal(got, want)
  (dx_want,), (dx_got,) = vjp_want(cts), vjp_got(cts)
  assert dx_got.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(
    np.asarray(dx_got, np.float32), np.asarray(dx_want, np.float32), rtol=tol, atol=tol
  )
  assert float(jnp.abs(dx_want.astype(jnp.float32)).max()) > 1e-3  # not trivially zero
