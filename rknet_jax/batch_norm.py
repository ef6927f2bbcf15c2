"""flax's BatchNorm arithmetic as pure functions, for the layers that compute BatchNorm
themselves (:class:`rknet_jax.layers.BatchNormParts`, :mod:`rknet_jax.dense_buffer`) with the
variables of ``flax.linen.BatchNorm``: float32 statistics, the fast (biased) variance
E[x^2] - E[x]^2 clipped at 0, ``(x - mean) * (rsqrt(var + eps) * scale) + bias``, and the
running averages ``momentum * old + (1 - momentum) * new``.
"""

from jax import lax
import jax.numpy as jnp

__all__ = ["moments", "normalize", "running_average"]


def moments(x):
  """Per-channel (last axis) batch mean and biased variance, in float32 or wider."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  return mean, jnp.maximum(0.0, jnp.mean(lax.square(x), axes) - lax.square(mean))


def normalize(x, mean, var, scale, bias, epsilon: float, dtype):
  """``(x - mean) * (rsqrt(var + epsilon) * scale) + bias`` in ``dtype``."""
  mul = lax.rsqrt(var + epsilon) * scale
  return ((x - mean) * mul + bias).astype(dtype)


def running_average(old, new, momentum: float):
  """flax's running-average update (``momentum`` is the decay of the old value)."""
  return momentum * old + (1 - momentum) * new
