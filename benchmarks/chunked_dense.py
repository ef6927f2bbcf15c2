"""Prototype: dense-layer input BN -> ReLU -> 1x1 conv without materialising the concat.

``rknet_jax.layers.BNReLUConv`` concatenates the block's features, applies BatchNorm and
ReLU to the concatenation and convolves it.  On CPU, XLA fuses the backward pass of
that BatchNorm with the slicing of the concatenation's gradient into one loop over the
output (a few hundred ns per element), the largest single item of a training-step
profile of ERKNet-6x1 6x1 6x1-B.  BatchNorm is per channel and a 1x1 filter on a
concatenation is the sum of one filter per part (``rknet_jax.conv.conv1x1_concat``),
so the same layer can be computed part by part: per-part batch statistics and
normalisation with the matching slices of the one ``scale``/``bias``/``mean``/``var``,
and per-part dots summed.  Same variables (names, shapes), same results and gradients
(checked by ``check_equivalence``), and no quadratic concatenations.

``install()`` swaps this class in for ``rknet_jax.layers.BNReLUConv`` in the running
process (``bench_models --variant chunked``); it is a measurement aid for the models'
owners, not a change of the library.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from rknet_jax import conv as conv_lib
from rknet_jax import layers

_ORIGINAL = layers.BNReLUConv


class _PartsBatchNorm(nn.Module):
  """flax BatchNorm's variables and arithmetic (fast variance), applied part by part."""
  momentum: float
  epsilon: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, xs, train: bool):
    c = sum(x.shape[-1] for x in xs)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if train:
      f32 = [x.astype(jnp.float32) for x in xs]
      mean = jnp.concatenate([jnp.mean(x, (0, 1, 2)) for x in f32])
      mean_sq = jnp.concatenate([jnp.mean(jnp.square(x), (0, 1, 2)) for x in f32])
      var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    out, offset = [], 0
    for x in xs:
      n = x.shape[-1]
      out.append(x.astype(self.dtype) * mul[offset:offset + n].astype(self.dtype)
                 + add[offset:offset + n].astype(self.dtype))
      offset += n
    return out


class _Kernel(nn.Module):
  shape: tuple

  @nn.compact
  def __call__(self):
    return self.param("kernel", conv_lib.he_normal, self.shape, jnp.float32)


class ChunkedBNReLUConv(_ORIGINAL):
  """``layers.BNReLUConv`` computed part by part for 1x1 stride-1 convs on lists."""

  @nn.compact
  def __call__(self, inputs, train: bool):
    xs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if (len(xs) == 1 or tuple(self.kernel_size) != (1, 1) or tuple(self.strides) != (1, 1)
        or self.dropout_rate > 0):
      x = layers.concat(xs)
      x = layers.BatchNorm(train, self.bn_momentum, self.bn_epsilon, self.dtype,
                           name="bn")(x)
      x = conv_lib.Conv(self.features, tuple(self.kernel_size), strides=tuple(self.strides),
                        dtype=self.dtype, name="conv")(nn.relu(x))
      return layers._dropout(x, self.dropout_rate, train)
    hs = _PartsBatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype, name="bn")(xs, train)
    c = sum(x.shape[-1] for x in xs)
    kernel = _Kernel((1, 1, c, self.features), name="conv")().astype(self.dtype)
    return conv_lib.conv1x1_concat([nn.relu(h) for h in hs], kernel)


def install():
  """Replaces ``layers.BNReLUConv`` by :class:`ChunkedBNReLUConv` in this process."""
  layers.BNReLUConv = ChunkedBNReLUConv


def check_equivalence(model_name="ERKNet-6×1 6×1 6×1-B", growth_rate=36, bottleneck_width=36):
  """Max abs differences (loss, grads, BN stats) stock vs chunked, one small batch."""
  import rknet_jax
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))

  def run():
    model = rknet_jax.create_model(model_name, growth_rate=growth_rate,
                                   bottleneck_width=bottleneck_width)
    v = model.init({"params": jax.random.PRNGKey(0)}, x, train=False)

    def loss(p):
      logits, upd = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
      return jnp.sum(logits ** 2), upd
    return v, jax.value_and_grad(loss, has_aux=True)(v["params"])

  layers.BNReLUConv = _ORIGINAL
  v_a, ((la, ua), ga) = run()
  install()
  v_b, ((lb, ub), gb) = run()
  layers.BNReLUConv = _ORIGINAL
  assert jax.tree_util.tree_structure(v_a) == jax.tree_util.tree_structure(v_b)
  diff = lambda a, b: max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  return {"loss": abs(float(la - lb)), "grads": diff(ga, gb), "batch_stats": diff(ua, ub)}


if __name__ == "__main__":
  print(check_equivalence())
