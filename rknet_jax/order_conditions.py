"""Butcher order conditions via rooted trees (paper section 3.1: "the algebraic
relationships of the coefficients have to meet the order conditions").

A Runge-Kutta method (a, b, c) has order p iff for every rooted tree t with at most p
nodes

    Phi(t) = b^T Phi_vec(t) = 1 / gamma(t),

where, for the tree t = [t_1, ..., t_m] built by joining the roots of subtrees t_k to a
new root,

    Phi_vec(single node) = (1, ..., 1),
    Phi_vec(t)_i         = prod_k (A Phi_vec(t_k))_i        (elementwise product),
    gamma(single node)   = 1,
    gamma(t)             = |t| prod_k gamma(t_k)

(Butcher 2008, section 31; Hairer-Norsett-Wanner I, section II.2, Theorem 2.13).  The
trees are generated programmatically, so the number of conditions per order is the
number of rooted trees: 1, 1, 2, 4, 9, 20, 48, 115, ...

Trees are represented canonically as sorted tuples of their root's subtrees; the single
node is ``()``.
"""

import functools
import math

import numpy as np

from rknet_jax import checks
from rknet_jax import tableaus as tableaus_lib

__all__ = [
  "rooted_trees",
  "tree_size",
  "tree_density",
  "elementary_weight",
  "order_condition_residuals",
  "algebraic_order",
  "ORDER_TOLERANCE",
]

Tree = tuple["Tree", ...]

# A condition holds when |Phi(t) - 1/gamma(t)| <= ORDER_TOLERANCE.
ORDER_TOLERANCE = 1e-10


def _positive_int(value, what):
  return checks.check_int("order_conditions", what, value, 1, checks.MAX_COUNT)


def tree_size(tree: Tree) -> int:
  """Number of nodes |t| of a rooted tree."""
  return 1 + sum(tree_size(child) for child in tree)


@functools.cache
def rooted_trees(num_nodes: int) -> tuple[Tree, ...]:
  """All (unlabelled) rooted trees with exactly ``num_nodes`` nodes, canonical, sorted.

  Every tree with n + 1 nodes arises by attaching one new leaf to some node of a tree
  with n nodes; duplicates are removed via the canonical form (children sorted).
  """
  num_nodes = _positive_int(num_nodes, "num_nodes")
  if num_nodes == 1:
    return ((),)

  def grow(tree):
    """All canonical trees obtained by adding one leaf to some node of ``tree``."""
    out = {tuple(sorted(tree + ((),)))}  # new leaf at the root
    for k, child in enumerate(tree):
      for grown in grow(child):
        out.add(tuple(sorted(tree[:k] + (grown,) + tree[k + 1 :])))
    return out

  trees = set()
  for tree in rooted_trees(num_nodes - 1):
    trees |= grow(tree)
  return tuple(sorted(trees))


def tree_density(tree: Tree) -> int:
  """The density gamma(t) = |t| prod_k gamma(t_k)."""
  return tree_size(tree) * math.prod(tree_density(child) for child in tree)


def _stage_weights(tree: Tree, a: np.ndarray) -> np.ndarray:
  """The vector Phi_vec(t) (one entry per stage)."""
  out = np.ones(a.shape[0], dtype=np.float64)
  for child in tree:
    out = out * (a @ _stage_weights(child, a))
  return out


def elementary_weight(tree: Tree, tableau: tableaus_lib.ButcherTableau) -> float:
  """The elementary weight Phi(t) = b^T Phi_vec(t) of ``tree`` for ``tableau``."""
  a, b, _ = tableau.numpy()
  return float(b @ _stage_weights(tree, a))


def order_condition_residuals(tableau, order: int) -> list[tuple[Tree, float]]:
  """(tree, Phi(t) - 1/gamma(t)) for every rooted tree with exactly ``order`` nodes."""
  tableau = tableaus_lib.get(tableau)
  order = _positive_int(order, "order")
  a, b, _ = tableau.numpy()
  return [(t, float(b @ _stage_weights(t, a)) - 1.0 / tree_density(t)) for t in rooted_trees(order)]


def algebraic_order(tableau, max_order: int = 6, tol: float = ORDER_TOLERANCE) -> int:
  """The highest p <= max_order such that all order conditions up to p hold to ``tol``.

  Args:
    tableau: a :class:`~rknet_jax.tableaus.ButcherTableau` or the name of a shipped one.
    max_order: the largest order checked (6 means all 37 trees with up to 6 nodes).
    tol: absolute tolerance on |Phi(t) - 1/gamma(t)|.

  Returns:
    p in [0, max_order]; 0 means even sum(b) = 1 fails (impossible for a validated
    :class:`~rknet_jax.tableaus.ButcherTableau`).  p == max_order means "at least
    max_order".
  """
  tableau = tableaus_lib.get(tableau)
  max_order = _positive_int(max_order, "max_order")
  if not tol > 0:
    raise ValueError(f"tol must be positive, got {tol!r}")
  for p in range(1, max_order + 1):
    if any(abs(r) > tol for _, r in order_condition_residuals(tableau, p)):
      return p - 1
  return max_order
