"""Dropout (Srivastava et al. 2014; the authors' CIFAR recipe, paper section 4.1), with
``flax.linen.Dropout``'s values for the same key, in a form XLA's TPU compiler handles well.

``flax.linen.Dropout`` draws its mask as ``jax.random.bernoulli(key, keep, x.shape)`` and
applies it with ``lax.select``.  Two things change here, neither the values:

* **The draw's shape.**  Under the partitionable threefry (the train step's,
  ``experiments/steps.py``) the random counters are the elements' row-major indices, built
  from one iota per dimension; when the batch dimension and a spatial one have the same size
  (global batch 16 on 16x16 feature maps), the TPU compiler merges the two equal iotas,
  shards the merged one along the batch and all-gathers it for the spatial use: a u32
  all-reduce per dropout, inside the dense blocks' loops too.  :func:`keep_mask` draws the
  same mask over ``(N, prod(rest))`` and reshapes it: the row-major index of an element is
  the same in both shapes, so the bits are identical (with the non-partitionable threefry
  too, which draws a flat vector either way), and no iota but the batch's has its size.
* **A barrier.**  The mask passes through ``lax.optimization_barrier``.  Without it XLA's TPU
  compiler fuses the random bits (about a hundred integer operations per element) into every
  consumer of the dropped-out activations -- convolutions, BatchNorm reductions, gradient
  accumulations -- recomputing them there; those fusions were the slowest of the train step
  to compile.  Behind the barrier the mask is computed once.  XLA:CPU removes the barrier
  early in its pipeline.

``benchmarks/README.md`` ("TPU pods ahead of time") has the measurements of both.
"""

import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

__all__ = ["keep_mask", "dropout", "Dropout"]


def keep_mask(key, keep_prob: float, shape):
  """Boolean mask of ``shape``, True with probability ``keep_prob``: the values of
  ``jax.random.bernoulli(key, keep_prob, shape)``, drawn over (shape[0], the rest)."""
  shape = tuple(shape)
  if len(shape) < 3:
    return jax.random.bernoulli(key, keep_prob, shape)
  flat = jax.random.bernoulli(key, keep_prob, (shape[0], math.prod(shape[1:])))
  return flat.reshape(shape)


def dropout(x, key, rate: float):
  """``x`` with each element zeroed with probability ``rate`` and the rest scaled by
  ``1 / (1 - rate)``: ``flax.linen.Dropout``'s arithmetic and mask for the same key, the
  mask computed once (behind an optimisation barrier)."""
  keep = 1.0 - rate
  mask = lax.optimization_barrier(keep_mask(key, keep, x.shape))
  return lax.select(mask, x / keep, jnp.zeros_like(x))


class Dropout(nn.Module):
  """``flax.linen.Dropout`` (no ``broadcast_dims``) through :func:`dropout`: the same
  'dropout' rng at the same path (the automatic name ``Dropout_0`` too), the same values."""

  rate: float
  deterministic: bool = False

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    return dropout(x, self.make_rng("dropout"), self.rate)
