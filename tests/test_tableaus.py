"""Tests for rknet_jax.tableaus (paper section 3.1)."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from rknet_jax import tableaus
from rknet_jax.tableaus import ButcherTableau

# (name, literature order, stages, kind).
EXPECTED = [
  ("euler", 1, 1, "explicit"),
  ("midpoint", 2, 2, "explicit"),
  ("heun", 2, 2, "explicit"),
  ("ralston", 2, 2, "explicit"),
  ("kutta3", 3, 3, "explicit"),
  ("heun3", 3, 3, "explicit"),
  ("ssprk3", 3, 3, "explicit"),
  ("rk4", 4, 4, "explicit"),
  ("rk38", 4, 4, "explicit"),
  ("dopri5", 5, 7, "explicit"),
  ("backward_euler", 1, 1, "dirk"),
  ("implicit_midpoint", 2, 1, "dirk"),
  ("trapezoid", 2, 2, "dirk"),
  ("gauss_legendre2", 4, 2, "implicit"),
  ("gauss_legendre3", 6, 3, "implicit"),
  ("radau_iia2", 3, 2, "implicit"),
  ("radau_iia3", 5, 3, "implicit"),
  ("lobatto_iiic2", 2, 2, "implicit"),
  ("lobatto_iiic3", 4, 3, "implicit"),
  ("sdirk2", 3, 2, "dirk"),
]


def test_names_lists_every_required_method_once():
  assert sorted(tableaus.names()) == sorted(name for name, *_ in EXPECTED)


@pytest.mark.parametrize("name,order,stages,kind", EXPECTED)
def test_declared_order_stages_and_kind(name, order, stages, kind):
  t = tableaus.get(name)
  assert t.name == name
  assert t.order == order
  assert t.num_stages == stages
  assert t.is_explicit == (kind == "explicit")
  assert t.is_implicit == (kind != "explicit")
  assert t.is_diagonally_implicit == (kind == "dirk")
  assert t.reference  # every method cites its source
  # Module-level constant with the upper-case name.
  assert getattr(tableaus, name.upper()) is t


def test_get_is_case_insensitive_and_accepts_aliases():
  assert tableaus.get("RK4") is tableaus.RK4
  assert tableaus.get("Gauss-Legendre2") is tableaus.GAUSS_LEGENDRE2
  assert tableaus.get("crank_nicolson") is tableaus.TRAPEZOID
  assert tableaus.CRANK_NICOLSON is tableaus.TRAPEZOID
  assert tableaus.get("Dormand-Prince") is tableaus.DOPRI5
  assert tableaus.get(tableaus.HEUN) is tableaus.HEUN
  for alias, target in tableaus.aliases().items():
    assert tableaus.get(alias) is tableaus.get(target)


def test_unknown_name_raises_key_error_listing_known_names():
  with pytest.raises(KeyError) as info:
    tableaus.get("rk5000")
  message = str(info.value)
  assert "rk5000" in message
  for name in tableaus.names():
    assert name in message


def test_tableau_is_frozen_hashable_and_stores_float_tuples():
  t = ButcherTableau(
    a=np.array([[0, 0], [1, 0]]), b=[0.5, 0.5], c=np.array([0, 1]), name="heun_copy", order=2
  )
  assert t.a == ((0.0, 0.0), (1.0, 0.0)) and isinstance(t.a[1][0], float)
  assert t.b == (0.5, 0.5) and t.c == (0.0, 1.0)
  assert hash(t) == hash(ButcherTableau(a=t.a, b=t.b, c=t.c, name="heun_copy", order=2))
  with pytest.raises(dataclasses.FrozenInstanceError):
    t.order = 3  # type: ignore[misc]


def test_arrays_and_numpy_helpers():
  a, b, c = tableaus.RK4.arrays(jnp.float32)
  assert a.shape == (4, 4) and b.shape == (4,) and c.shape == (4,)
  assert a.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(c), [0, 0.5, 0.5, 1])
  a64, _, _ = tableaus.RK4.numpy()
  assert a64.dtype == np.float64 and a64[2, 1] == 0.5
  assert "rk4" in str(tableaus.RK4)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(a=[[0, 0], [1]], b=[0.5, 0.5], c=[0, 1]), "square"),
    (dict(a=[[0, 0, 0], [1, 0, 0]], b=[0.5, 0.5], c=[0, 1]), "square"),
    (dict(a=[], b=[], c=[]), "no stages"),
    (dict(a=[[0, 0], [1, 0]], b=[0.5, 0.25, 0.25], c=[0, 1]), "b has 3 entries"),
    (dict(a=[[0, 0], [1, 0]], b=[0.5, 0.5], c=[0]), "c has 1 entries"),
    (dict(a=[[0, 0], [1, 0]], b=[0.5, 0.5], c=[0, 0.9]), r"row 1 of a sums to"),
    (dict(a=[[0, 0], [1, 0]], b=[0.5, 0.4], c=[0, 1]), "b sums to"),
    (dict(a=[[0, 0], [math.nan, 0]], b=[0.5, 0.5], c=[0, 1]), "NaN"),
    (dict(a=[[0, 0], [1, 0]], b=[math.nan, 0.5], c=[0, 1]), "NaN"),
    (dict(a=[[0, 0], [1, 0]], b=[0.5, 0.5], c=[0, 1], order=0), "order"),
    (dict(a=[[0, 0], [1, 0]], b=[0.5, 0.5], c=[0, 1], order=2.0), "order"),
    (dict(a=[[0, 0], [1, 0]], b=[0.5, 0.5], c=[0, 1], order=True), "order"),
    (dict(a=[[0, 0], [1, 0]], b="ab", c=[0, 1]), "b must be a sequence of numbers"),
  ],
)
def test_inconsistent_tableaus_raise_value_error(kwargs, match):
  kwargs.setdefault("order", 1)
  with pytest.raises(ValueError, match=match):
    ButcherTableau(name="bad", **kwargs)


@pytest.mark.parametrize("name", tableaus.names())
def test_shipped_tableaus_are_consistent_to_rounding(name):
  """Row sums equal c and sum(b) = 1 to a few ulps (stronger than the 1e-12 check)."""
  a, b, c = tableaus.get(name).numpy()
  np.testing.assert_allclose(a.sum(axis=1), c, rtol=0, atol=4e-16)
  assert abs(math.fsum(b) - 1.0) <= 4e-16
