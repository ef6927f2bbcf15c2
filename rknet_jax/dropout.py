"""Dropout (Srivastava et al. 2014) after the convolutions of every model (paper section 4.1:
the authors' CIFAR recipe), as one pure function both :class:`rknet_jax.layers.Dropout` and the
dense buffer (:mod:`rknet_jax.dense_buffer`) apply.

The arithmetic is ``flax.linen.Dropout``'s: a mask ``jax.random.bernoulli(key, 1 - rate,
x.shape)``, kept elements scaled by ``1 / (1 - rate)``; same key, same values.  One
difference in the program, none in the values: the mask passes through
``lax.optimization_barrier``.  Without it XLA's TPU compiler fuses the mask's random bits
(the partitionable threefry: about a hundred integer operations per element) into every
consumer -- the convolutions, BatchNorm reductions and gradient accumulations that read
the dropped-out activations -- recomputing them there; those fusions are the slowest of
the whole train step to compile (several needed compile retries).  Behind the barrier the
mask is computed once, by an elementwise fusion of its own (``benchmarks/README.md``,
"Where TPU compile time goes").  XLA:CPU removes the barrier early in its pipeline.
"""

import jax
from jax import lax
import jax.numpy as jnp

__all__ = ["dropout"]


def dropout(x, rate: float, key):
  """``x`` with each element zeroed with probability ``rate``, the rest scaled by
  ``1 / (1 - rate)`` (``flax.linen.Dropout``'s values for the same ``key``)."""
  keep = 1.0 - rate
  mask = lax.optimization_barrier(jax.random.bernoulli(key, p=keep, shape=x.shape))
  return lax.select(mask, x / keep, jnp.zeros_like(x))
