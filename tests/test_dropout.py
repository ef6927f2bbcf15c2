"""rknet_jax.dropout: flax.linen.Dropout's values, the mask drawn over (N, rest) and kept
behind an optimisation barrier."""

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


class _Two(nn.Module):
  """Two dropouts in one scope (automatic names Dropout_0, Dropout_1) of the given class."""

  cls: type
  deterministic: bool

  @nn.compact
  def __call__(self, x):
    x = self.cls(rate=0.3, deterministic=self.deterministic)(x)
    return self.cls(rate=0.3, deterministic=self.deterministic)(x)


@pytest.mark.parametrize("deterministic", [False, True])
def test_two_dropouts_in_one_scope_equal_flax_dropout(deterministic):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 5)) + 3.0  # no zeros of its own
  rngs = {"dropout": jax.random.PRNGKey(7)}
  ours = _Two(dropout_lib.Dropout, deterministic).apply({}, x, rngs=rngs)
  theirs = _Two(nn.Dropout, deterministic).apply({}, x, rngs=rngs)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  dropped = float(np.mean(np.asarray(ours) == 0.0))
  if deterministic:
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(x))
  else:  # 1 - 0.7^2 of the elements dropped by one of the two
    assert 0.4 < dropped < 0.62


def test_mask_passes_an_optimization_barrier():
  jaxpr = jax.make_jaxpr(lambda x, k: dropout_lib.dropout(x, k, 0.2))(
    np.ones((2, 3), np.float32), jax.random.PRNGKey(0)
  )
  barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
  assert len(barriers) == 1 and barriers[0].outvars[0].aval.dtype == np.bool_
