"""rknet_jax.dropout and layers.Dropout: flax.linen.Dropout's values, the mask behind a barrier."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from rknet_jax import dropout as dropout_lib
from rknet_jax import layers


class _Two(nn.Module):
  """Two dropouts in one scope (automatic names Dropout_0, Dropout_1) of the given class."""

  cls: type
  deterministic: bool

  @nn.compact
  def __call__(self, x):
    x = self.cls(rate=0.3, deterministic=self.deterministic)(x)
    return self.cls(rate=0.3, deterministic=self.deterministic)(x)


@pytest.mark.parametrize("deterministic", [False, True])
def test_layers_dropout_equals_flax_dropout(deterministic):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 5)) + 3.0  # no zeros of its own
  rngs = {"dropout": jax.random.PRNGKey(7)}
  ours = _Two(layers.Dropout, deterministic).apply({}, x, rngs=rngs)
  theirs = _Two(nn.Dropout, deterministic).apply({}, x, rngs=rngs)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  dropped = float(np.mean(np.asarray(ours) == 0.0))
  if deterministic:
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(x))
  else:  # 1 - 0.7^2 of the elements dropped by one of the two
    assert 0.4 < dropped < 0.62


def test_mask_passes_an_optimization_barrier():
  jaxpr = jax.make_jaxpr(lambda x, k: dropout_lib.dropout(x, 0.2, k))(
    np.ones((2, 3), np.float32), jax.random.PRNGKey(0)
  )
  barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
  assert len(barriers) == 1 and barriers[0].outvars[0].aval.dtype == np.bool_
