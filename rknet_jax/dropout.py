"""Dropout (Srivastava et al. 2014), with flax's masks drawn in a shape the SPMD partitioner
keeps on each device.

``flax.linen.Dropout`` draws its mask as ``jax.random.bernoulli(key, keep, x.shape)``.  Under
the partitionable threefry (the train step's, ``experiments/steps.py``) the random counters
are the elements' row-major indices, built from one iota per dimension; when the batch
dimension and a spatial one have the same size (global batch 16 on 16x16 feature maps),
the TPU compiler merges the two equal iotas, shards the merged one along the batch and
all-gathers it for the spatial use: a u32 all-reduce per dropout, inside the dense blocks'
loops too (benchmarks/README.md, "TPU pods ahead of time").  :func:`keep_mask` draws the
same mask over ``(N, prod(rest))`` and reshapes it: the row-major index of an element is the
same in both shapes, so the bits are identical (with the non-partitionable threefry too,
which draws a flat vector either way), and no iota but the batch's has the batch's size.
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
  ``1 / (1 - rate)``: ``flax.linen.Dropout``'s arithmetic and mask for the same key."""
  keep = 1.0 - rate
  return lax.select(keep_mask(key, keep, x.shape), x / keep, jnp.zeros_like(x))


class Dropout(nn.Module):
  """``flax.linen.Dropout`` (no ``broadcast_dims``) with :func:`keep_mask`'s draw: the same
  'dropout' rng at the same path (the automatic name ``Dropout_0`` too), the same masks."""

  rate: float
  deterministic: bool = False

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    return dropout(x, self.make_rng("dropout"), self.rate)
