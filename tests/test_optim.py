"""Weight decay by role (rknet_jax/optim.py): the decayed set is every conv and dense weight
of every model family, found here independently of parameter names by following each
parameter through the traced model to the kernel operand of a convolution or matrix product.
"""

import doctest

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import optim as experiments_optim
import rknet_jax
from rknet_jax import optim, registry

# (name, create_model kwargs, input shape): every family and variant with its own weights.
FAMILIES = [
  ("ERKNet-2x1 1x1", dict(growth_rate=4), (2, 8, 8, 1)),
  ("ERKNet-2x1 1x2-B", dict(growth_rate=4, growth_multipliers=(1, 2)), (2, 8, 8, 1)),
  ("ERKNet-2x1 1x1-AB", dict(growth_rate=4, bottleneck_width=5), (2, 8, 8, 3)),
  ("ERKNet-9x1-B", dict(growth_rate=4), (2, 8, 8, 1)),  # 9 layers: the buffer block
  ("IRKNet-2x1 2x1", dict(growth_rate=4), (2, 8, 8, 1)),
  ("IRKNet-3x1 2x1-AB", dict(growth_rate=4, num_updates=2), (2, 8, 8, 3)),
  ("IRKNet-2x1 2x1-B", dict(growth_rate=4, share_weights=False, num_updates=2), (2, 8, 8, 1)),
  ("RKNet-1x1 2x1", dict(growth_rate=4, method="implicit", share_weights=False), (2, 8, 8, 1)),
  ("DenseNet-BC-16-k4", {}, (2, 8, 8, 3)),
  ("DenseNet-22-k4", {}, (2, 8, 8, 3)),
  ("DenseNet-BC-58-k4", {}, (2, 8, 8, 3)),  # 9 layers per block: the buffer formulation
  ("CliqueNet-T12-k4", {}, (2, 8, 8, 3)),
  ("CliqueNet-ABC-T12-k4", {}, (2, 8, 8, 3)),
  ("RK4Net-4x1 4x1-A", dict(growth_rate=4), (2, 8, 8, 3)),
  (
    "RK4Net-1x1 1x1",
    dict(growth_rate=4, learn_coefficients=True, learn_step_size=True),
    (2, 8, 8, 1),
  ),
  (
    "Gauss_Legendre2Net-2x1",
    dict(growth_rate=4, learn_coefficients=True, learn_step_size=True),
    (2, 8, 8, 1),
  ),
]


def _params_reaching_kernel_operands(model, shape):
  """Paths of the params that reach the kernel operand (rhs) of a conv_general_dilated or
  dot_general in the traced eval-mode forward pass (through any reshape, slice, pad,
  concatenate, convert or sub-jaxpr): the conv and dense weights, found without names."""
  x = jnp.ones(shape, jnp.float32)
  variables = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, train=False))
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables["params"])
  paths = [tuple(k.key for k in p) for p, _ in flat]

  batch_stats = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables["batch_stats"])

  def forward(*leaves):
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

  closed = jax.make_jaxpr(forward)(*[jax.ShapeDtypeStruct(v.shape, v.dtype) for _, v in flat])
  found = set()

  def walk(jaxpr, origins):
    env = dict(zip(jaxpr.invars, origins))

    def read(v):
      return frozenset() if isinstance(v, jex_core.Literal) else env.get(v, frozenset())

    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        found.update(ins[1])
      every = frozenset().union(*ins) if ins else frozenset()
      for value in eqn.params.values():
        subs = value if isinstance(value, (tuple, list)) else [value]
        for sub in subs:
          sub = sub.jaxpr if isinstance(sub, jex_core.ClosedJaxpr) else sub
          if not isinstance(sub, jex_core.Jaxpr):
            continue
          n = len(sub.invars)  # aligned with the equation's last n operands (cond: the
          # branch index comes first; scan/call: all); otherwise everything may flow in
          aligned = ins[-n:] if 0 < n <= len(ins) else [every] * n
          walk(sub, aligned)
      for v in eqn.outvars:
        env[v] = every

  walk(closed.jaxpr, [frozenset([i]) for i in range(len(flat))])
  return {paths[i] for i in found}, paths, flat


@pytest.mark.parametrize("name,kwargs,shape", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_kernels_are_exactly_the_conv_and_dense_weights(name, kwargs, shape):
  model = registry.create_model(name, **kwargs)
  weights, paths, flat = _params_reaching_kernel_operands(model, shape)
  tree = {}
  for p, (_, v) in zip(paths, flat):
    node = tree
    for k in p[:-1]:
      node = node.setdefault(k, {})
    node[p[-1]] = v
  mask = optim.weight_decay_mask(tree, "kernels")
  decayed = {p for p in paths if _get(mask, p)}
  assert weights, "the trace found no weights"
  assert decayed == weights, (
    f"decayed but not a weight: {sorted(decayed - weights)}; "
    f"weight not decayed: {sorted(weights - decayed)}"
  )
  # Nothing else is decayed: in particular no BN scale/bias, bias or Butcher coefficient.
  for p in set(paths) - decayed:
    assert p[-1] in ("scale", "bias") + optim.BUTCHER_PARAMS, p
  if kwargs.get("learn_coefficients"):
    assert {p[-1] for p in set(paths) - decayed} >= {"a", "b", "log_step_size"}
  assert all(_get(optim.weight_decay_mask(tree, "all"), p) for p in paths)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


# Decayed / total parameters on 8x8x1 digits (10 classes), before (leaves named "kernel") and
# with weight decay by role.
COUNTS = [
  ("IRKNet-3x1 3x1 3x1", dict(growth_rate=20), 1_580, 98_780, 100_430),
  ("CliqueNet-T6-k24", {}, 8_224, 108_448, 110_330),
  ("ERKNet-3x1 3x1 3x1-B", dict(growth_rate=16), 102_512, 102_512, 104_410),
]


@pytest.mark.parametrize("name,kwargs,by_name,by_role,total", COUNTS, ids=[c[0] for c in COUNTS])
def test_decayed_parameter_counts(name, kwargs, by_name, by_role, total):
  model = registry.create_model(name, num_classes=10, **kwargs)
  params = jax.eval_shape(
    lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.ones((1, 8, 8, 1)), train=False)
  )["params"]
  sizes = jax.tree.map(lambda v: int(np.prod(v.shape)), params)
  assert sum(jax.tree.leaves(sizes)) == total
  flat = jax.tree_util.tree_flatten_with_path(sizes)[0]
  named_kernel = sum(n for p, n in flat if p[-1].key == "kernel")
  assert named_kernel == by_name  # what the name rule decayed
  mask = optim.weight_decay_mask(params, "kernels")
  decayed = sum(n for n, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask)) if m)
  not_decayed = {p[-1].key for (p, _), m in zip(flat, jax.tree.leaves(mask)) if not m}
  assert not_decayed == {"scale", "bias"}
  assert decayed == by_role
  assert total - decayed == sum(n for p, n in flat if p[-1].key in ("scale", "bias"))


def test_paper_sgd_is_torch_sgd_with_nesterov_and_decay():
  """Two steps against the PyTorch SGD formulas written out: d = g + wd*w (masked),
  buf = mu*buf + d, update = -lr*(d + mu*buf)."""
  lr, mu, wd = 0.1, 0.9, 0.01
  w = {
    "conv": {"kernel": np.full((1, 1, 2, 2), 2.0, np.float32)},
    "bn": {"scale": np.full((2,), 3.0, np.float32)},
  }
  g = jax.tree.map(lambda a: np.full_like(a, 0.5), w)
  tx = optim.paper_sgd(optax.constant_schedule(lr), momentum=mu, weight_decay=wd)
  state = tx.init(w)
  ref_w = {k: {n: a.copy() for n, a in v.items()} for k, v in w.items()}
  buf = jax.tree.map(np.zeros_like, w)
  for _ in range(2):
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
    for k, n in (("conv", "kernel"), ("bn", "scale")):
      d = g[k][n] + (wd * ref_w[k][n] if n == "kernel" else 0.0)
      buf[k][n] = mu * buf[k][n] + d
      ref_w[k][n] = ref_w[k][n] - lr * (d + mu * buf[k][n])
  for k, n in (("conv", "kernel"), ("bn", "scale")):
    np.testing.assert_allclose(w[k][n], ref_w[k][n], rtol=1e-6)
  with pytest.raises(ValueError, match="weight_decay_params='biases'; allowed"):
    optim.paper_sgd(0.1, weight_decay_params="biases")


def test_runner_optimizer_is_paper_sgd_and_public():
  assert rknet_jax.paper_sgd is optim.paper_sgd
  assert experiments_optim.weight_decay_mask is optim.weight_decay_mask


def test_docstring_example():
  result = doctest.testmod(optim, raise_on_error=False)
  assert result.attempted >= 4 and result.failed == 0
