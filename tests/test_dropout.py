"""rknet_jax.dropout: flax's dropout masks, drawn over (N, rest)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rknet_jax import dropout as dropout_lib


@pytest.mark.parametrize("partitionable", [True, False])
@pytest.mark.parametrize("shape", [(16, 16, 16, 12), (5, 3, 7), (6, 4), (9,)])
def test_keep_mask_is_bernoulli_of_the_full_shape(partitionable, shape):
  key = jax.random.PRNGKey(7)
  with jax.threefry_partitionable(partitionable):
    got = dropout_lib.keep_mask(key, 0.8, shape)
    want = jax.random.bernoulli(key, 0.8, shape)
  assert got.shape == shape and got.dtype == jnp.bool_
  np.testing.assert_array_equal(got, want)
  assert 0 < int(got.sum()) < got.size  # a mask, not a constant


def test_dropout_module_equals_flax_dropout():
  """Same rng path (the automatic name Dropout_0), same mask, same scaling."""

  class Net(nn.Module):
    layer: type

    @nn.compact
    def __call__(self, x, train: bool):
      return self.layer(rate=0.3, deterministic=not train)(nn.Dense(12)(x))

  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 6, 5))
  ours, flax_net = Net(dropout_lib.Dropout), Net(nn.Dropout)
  variables = ours.init(jax.random.PRNGKey(1), x, train=False)
  rngs = {"dropout": jax.random.PRNGKey(2)}
  got = ours.apply(variables, x, train=True, rngs=rngs)
  np.testing.assert_array_equal(got, flax_net.apply(variables, x, train=True, rngs=rngs))
  assert 0 < int((got == 0).sum()) < got.size
  np.testing.assert_array_equal(
    ours.apply(variables, x, train=False), flax_net.apply(variables, x, train=False)
  )
