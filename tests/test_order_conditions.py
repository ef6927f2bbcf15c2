"""Tests for rknet_jax.order_conditions (paper section 3.1)."""

import math

import numpy as np
import pytest

from rknet_jax import order_conditions as oc
from rknet_jax import tableaus
from rknet_jax.tableaus import ButcherTableau


def test_number_of_rooted_trees_matches_oeis_a000081():
  assert [len(oc.rooted_trees(n)) for n in range(1, 9)] == [1, 1, 2, 4, 9, 20, 48, 115]


@pytest.mark.parametrize("n", range(1, 8))
def test_trees_have_the_requested_size_and_are_distinct(n):
  trees = oc.rooted_trees(n)
  assert all(oc.tree_size(t) == n for t in trees)
  assert len(set(trees)) == len(trees)


@pytest.mark.parametrize("n", range(1, 8))
def test_densities_satisfy_the_counting_identity(n):
  """alpha(t) = n! / (gamma(t) sigma(t)) counts the monotone labellings of t, and these
  summed over all trees with n nodes give the (n - 1)! recursive trees (Butcher 2008,
  section 30); checks tree generation and densities together."""

  def symmetry(tree):
    out = 1
    for child in set(tree):
      k = tree.count(child)
      out *= math.factorial(k) * symmetry(child) ** k
    return out

  total = sum(math.factorial(n) // (oc.tree_density(t) * symmetry(t)) for t in oc.rooted_trees(n))
  assert total == math.factorial(n - 1)


def test_tall_and_bushy_tree_densities_and_weights():
  tall4 = ((((),),),)  # a chain of 4 nodes: root -> node -> node -> leaf
  bushy4 = ((), (), ())  # root with 3 leaves
  assert oc.tree_size(tall4) == 4 and oc.tree_density(tall4) == 24
  assert oc.tree_size(bushy4) == 4 and oc.tree_density(bushy4) == 4
  a, b, c = tableaus.RK4.numpy()
  assert oc.elementary_weight(tall4, tableaus.RK4) == pytest.approx(b @ a @ a @ c)
  assert oc.elementary_weight(bushy4, tableaus.RK4) == pytest.approx(b @ c**3)


@pytest.mark.parametrize("name", tableaus.names())
def test_algebraic_order_equals_declared_order(name):
  t = tableaus.get(name)
  # max_order 7 so that the order-6 method is not merely capped at the search limit.
  assert oc.algebraic_order(t, max_order=7) == t.order
  # Known barriers (Butcher 2008): explicit s-stage order <= s, implicit order <= 2s.
  assert t.order <= (t.num_stages if t.is_explicit else 2 * t.num_stages)


def test_perturbed_rk4_loses_order():
  # Move delta from a_32 to a_31: still consistent (row sum = c_3), but the third-order
  # condition sum_ij b_i a_ij c_j = 1/6 changes by b_3 * delta * c_2 = delta / 6.
  delta = 1e-3
  a = [list(row) for row in tableaus.RK4.a]
  a[2][1] += delta
  a[2][0] -= delta
  perturbed = ButcherTableau(a=a, b=tableaus.RK4.b, c=tableaus.RK4.c, name="rk4_perturbed", order=4)
  assert oc.algebraic_order(perturbed) < 4
  assert oc.algebraic_order(perturbed) == 2
  residuals = dict(oc.order_condition_residuals(perturbed, 3))
  tall3 = (((),),)  # b^T A c
  assert residuals[tall3] == pytest.approx(delta / 6, rel=1e-6)

  # A tiny perturbation below the tolerance is not detected, one above is.
  b = list(tableaus.RK4.b)
  b[1] += 1e-12
  b[2] -= 1e-12
  assert oc.algebraic_order(ButcherTableau(a=tableaus.RK4.a, b=b, c=tableaus.RK4.c)) == 4
  b[1] += 1e-8
  b[2] -= 1e-8
  assert oc.algebraic_order(ButcherTableau(a=tableaus.RK4.a, b=b, c=tableaus.RK4.c)) < 4


def test_max_order_caps_the_search_and_is_validated():
  assert oc.algebraic_order("rk4", max_order=3) == 3
  assert oc.algebraic_order(tableaus.GAUSS_LEGENDRE3) == 6  # default max_order=6
  with pytest.raises(ValueError, match="max_order"):
    oc.algebraic_order("rk4", max_order=0)
  with pytest.raises(KeyError, match="known names"):
    oc.algebraic_order("no_such_method")


def test_residuals_of_order_conditions_up_to_six_for_gauss3_are_tiny():
  worst = max(
    abs(r)
    for p in range(1, 7)
    for _, r in oc.order_condition_residuals(tableaus.GAUSS_LEGENDRE3, p)
  )
  assert worst < 1e-14
  # ... and some seventh-order condition fails clearly.
  assert max(abs(r) for _, r in oc.order_condition_residuals("gauss_legendre3", 7)) > 1e-6
  assert np.isfinite(worst)
