"""Butcher tableaus of Runge-Kutta methods (paper section 3.1, equations 2-3).

An s-stage Runge-Kutta method for dy/dt = f(t, y) (equation 1) advances one step by

    z_i     = f(t_n + c_i h, y_n + h sum_j a_ij z_j),   i = 1..s       (equation 3)
    y_{n+1} = y_n + h sum_i b_i z_i,   t_{n+1} = t_n + h                (equation 2)

and is fully described by its Butcher tableau (a, b, c).  The method is explicit (ERK)
when a is strictly lower triangular, otherwise implicit (IRK).  The order p of a method is
the largest p with local truncation error O(h^{p+1}); see
:func:`rknet_jax.order_conditions.algebraic_order` for the check of the order conditions.

This module defines :class:`ButcherTableau` (immutable, validated on construction), one
module-level constant per shipped method, and the look-up functions :func:`get` and
:func:`names`.  ``python -m rknet_jax.convergence`` prints the table of shipped methods with
their declared, algebraic (order conditions) and measured (convergence) orders.

References used below:
  [B08]  J. C. Butcher, Numerical Methods for Ordinary Differential Equations, 2nd ed.,
         Wiley, 2008.
  [HNW]  E. Hairer, S. P. Norsett, G. Wanner, Solving Ordinary Differential Equations I:
         Nonstiff Problems, 2nd ed., Springer, 1993.
  [HW]   E. Hairer, G. Wanner, Solving Ordinary Differential Equations II: Stiff and
         Differential-Algebraic Problems, 2nd ed., Springer, 1996.
  [DP80] J. R. Dormand, P. J. Prince, A family of embedded Runge-Kutta formulae,
         J. Comput. Appl. Math. 6(1), 1980.
  [GS98] S. Gottlieb, C.-W. Shu, Total variation diminishing Runge-Kutta schemes,
         Math. Comp. 67(221), 1998.
  [R62]  A. Ralston, Runge-Kutta methods with minimum error bounds, Math. Comp. 16, 1962.
"""

import dataclasses
import math

import numpy as np

__all__ = [
  "ButcherTableau",
  "get",
  "names",
  "aliases",
  "EULER",
  "MIDPOINT",
  "HEUN",
  "RALSTON",
  "KUTTA3",
  "HEUN3",
  "SSPRK3",
  "RK4",
  "RK38",
  "DOPRI5",
  "BACKWARD_EULER",
  "IMPLICIT_MIDPOINT",
  "TRAPEZOID",
  "CRANK_NICOLSON",
  "GAUSS_LEGENDRE2",
  "GAUSS_LEGENDRE3",
  "RADAU_IIA2",
  "RADAU_IIA3",
  "LOBATTO_IIIC2",
  "LOBATTO_IIIC3",
  "SDIRK2",
]

# Consistency tolerance for the row-sum (c_i = sum_j a_ij) and sum(b) = 1 checks.  The
# shipped coefficients are exact fractions or surds rounded to double precision, whose
# sums are exact to a few ulps.
_CONSISTENCY_TOL = 1e-12


def _as_float_tuple(values, what):
  try:
    return tuple(float(v) for v in values)
  except (TypeError, ValueError) as e:
    raise ValueError(f"ButcherTableau: {what} must be a sequence of numbers, got {values!r}") from e


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
  """Immutable, validated Butcher tableau (a, b, c) of an s-stage Runge-Kutta method.

  The coefficients enter equations 2 and 3 of the paper (section 3.1).  Lists, tuples or
  NumPy arrays are accepted and stored as tuples of Python floats, so a tableau is
  hashable and can be a static argument of ``jax.jit``.

  Attributes:
    a: s x s stage matrix, a tuple of s rows of s floats.
    b: the s weights of the stage slopes in the update y_{n+1} = y_n + h sum_i b_i z_i.
    c: the s nodes; stage i is evaluated at t_n + c_i h.  Must equal the row sums of a.
    name: short identifier, e.g. ``"rk4"``.
    order: the method's classical (literature) order p >= 1.
    reference: where the coefficients and the order come from.

  Raises:
    ValueError: on construction when a is not square, b or c do not have s entries,
      a coefficient is NaN or infinite, a row of a does not sum to the matching c_i,
      b does not sum to 1, or order is not a positive integer.
  """

  a: tuple[tuple[float, ...], ...]
  b: tuple[float, ...]
  c: tuple[float, ...]
  name: str = "custom"
  order: int = 1
  reference: str = ""

  def __post_init__(self):
    try:
      rows = tuple(self.a)
    except TypeError as e:
      raise ValueError(
        f"ButcherTableau {self.name!r}: a must be a sequence of rows, got {self.a!r}"
      ) from e
    a = tuple(_as_float_tuple(row, f"row {i} of a") for i, row in enumerate(rows))
    b = _as_float_tuple(self.b, "b")
    c = _as_float_tuple(self.c, "c")
    s = len(a)
    if s == 0:
      raise ValueError(f"ButcherTableau {self.name!r}: a has no stages (it is empty)")
    bad_rows = [i for i, row in enumerate(a) if len(row) != s]
    if bad_rows:
      raise ValueError(
        f"ButcherTableau {self.name!r}: a must be square (s x s with s = {s} rows), "
        f"but rows {bad_rows} have lengths {[len(a[i]) for i in bad_rows]}"
      )
    if len(b) != s:
      raise ValueError(
        f"ButcherTableau {self.name!r}: b has {len(b)} entries, "
        f"expected s = {s} (the number of rows of a)"
      )
    if len(c) != s:
      raise ValueError(
        f"ButcherTableau {self.name!r}: c has {len(c)} entries, "
        f"expected s = {s} (the number of rows of a)"
      )
    for label, values in (("a", [v for row in a for v in row]), ("b", b), ("c", c)):
      if not all(math.isfinite(v) for v in values):
        raise ValueError(
          f"ButcherTableau {self.name!r}: {label} contains NaN or infinite entries: {values}"
        )
    for i, (row, ci) in enumerate(zip(a, c)):
      row_sum = math.fsum(row)
      if abs(row_sum - ci) > _CONSISTENCY_TOL * max(1.0, abs(ci)):
        raise ValueError(
          f"ButcherTableau {self.name!r}: row {i} of a sums to {row_sum!r} but "
          f"c[{i}] = {ci!r}; a Runge-Kutta tableau needs c_i = sum_j a_ij"
        )
    b_sum = math.fsum(b)
    if abs(b_sum - 1.0) > _CONSISTENCY_TOL:
      raise ValueError(
        f"ButcherTableau {self.name!r}: b sums to {b_sum!r}, expected 1 "
        "(consistency, the first-order condition)"
      )
    if (
      isinstance(self.order, bool)
      or not isinstance(self.order, (int, np.integer))
      or self.order < 1
    ):
      raise ValueError(
        f"ButcherTableau {self.name!r}: order must be a positive int, got {self.order!r}"
      )
    object.__setattr__(self, "a", a)
    object.__setattr__(self, "b", b)
    object.__setattr__(self, "c", c)
    object.__setattr__(self, "order", int(self.order))

  @property
  def num_stages(self) -> int:
    """The number of stages s."""
    return len(self.b)

  @property
  def is_explicit(self) -> bool:
    """True when a is strictly lower triangular (an ERK method, paper section 3.1)."""
    return all(
      self.a[i][j] == 0.0 for i in range(self.num_stages) for j in range(i, self.num_stages)
    )

  @property
  def needed_stages(self) -> tuple[bool, ...]:
    """Per stage, whether an explicit step evaluates it with these (fixed) coefficients:
    b_i != 0 or a later needed stage reads it (:func:`needed_stages`)."""
    return needed_stages(self.a, self.b)

  @property
  def zero_rows(self) -> tuple[bool, ...]:
    """Per stage, whether its row of a is zero (an implicit step evaluates it once)."""
    return zero_rows(self.a)

  @property
  def is_implicit(self) -> bool:
    """True for every method that is not explicit (an IRK method, paper section 3.1)."""
    return not self.is_explicit

  @property
  def is_diagonally_implicit(self) -> bool:
    """True when a is lower triangular with at least one non-zero diagonal entry (DIRK).

    Each stage equation then involves only its own slope z_i implicitly.  (Backward Euler,
    the implicit midpoint rule, the trapezoidal rule and the SDIRK method are diagonally
    implicit; Gauss-Legendre, Radau IIA and Lobatto IIIC are fully implicit.)
    """
    s = self.num_stages
    lower = all(self.a[i][j] == 0.0 for i in range(s) for j in range(i + 1, s))
    return lower and any(self.a[i][i] != 0.0 for i in range(s))

  def numpy(self, dtype=np.float64):
    """Returns (a, b, c) as NumPy arrays of shapes (s, s), (s,), (s,)."""
    return (np.asarray(self.a, dtype), np.asarray(self.b, dtype), np.asarray(self.c, dtype))

  def arrays(self, dtype=None):
    """Returns (a, b, c) as ``jax.numpy`` arrays (default dtype: JAX's default float)."""
    import jax.numpy as jnp

    return (jnp.asarray(self.a, dtype), jnp.asarray(self.b, dtype), jnp.asarray(self.c, dtype))

  def __str__(self):
    width = 10

    def fmt(v):
      return f"{v:>{width}.6g}"

    lines = [f"{self.name} (order {self.order}, {self.num_stages} stages)"]
    for ci, row in zip(self.c, self.a):
      lines.append(fmt(ci) + " |" + "".join(fmt(v) for v in row))
    lines.append("-" * (width + 2 + width * self.num_stages))
    lines.append(" " * width + " |" + "".join(fmt(v) for v in self.b))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Explicit methods.  (Laid out by hand: each tableau reads as its rows.)
# fmt: off

EULER = ButcherTableau(
    a=((0.0,),), b=(1.0,), c=(0.0,), name="euler", order=1,
    reference="explicit (forward) Euler method; [B08] chapter 2, [HNW] section II.1")

MIDPOINT = ButcherTableau(
    a=((0.0, 0.0), (0.5, 0.0)), b=(0.0, 1.0), c=(0.0, 0.5), name="midpoint", order=2,
    reference="explicit midpoint rule (Runge 1895); [HNW] section II.1")

HEUN = ButcherTableau(
    a=((0.0, 0.0), (1.0, 0.0)), b=(0.5, 0.5), c=(0.0, 1.0), name="heun", order=2,
    reference="Heun's method (explicit trapezoidal rule); [B08] chapter 2, [HNW] II.1")

RALSTON = ButcherTableau(
    a=((0.0, 0.0), (2 / 3, 0.0)), b=(0.25, 0.75), c=(0.0, 2 / 3), name="ralston",
    order=2, reference="Ralston's minimum-error second-order method; [R62]")

KUTTA3 = ButcherTableau(
    a=((0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (-1.0, 2.0, 0.0)),
    b=(1 / 6, 2 / 3, 1 / 6), c=(0.0, 0.5, 1.0), name="kutta3", order=3,
    reference="Kutta's third-order method (1901); [HNW] section II.1")

HEUN3 = ButcherTableau(
    a=((0.0, 0.0, 0.0), (1 / 3, 0.0, 0.0), (0.0, 2 / 3, 0.0)),
    b=(0.25, 0.0, 0.75), c=(0.0, 1 / 3, 2 / 3), name="heun3", order=3,
    reference="Heun's third-order method (1900); [HNW] section II.1")

SSPRK3 = ButcherTableau(
    a=((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.25, 0.25, 0.0)),
    b=(1 / 6, 1 / 6, 2 / 3), c=(0.0, 1.0, 0.5), name="ssprk3", order=3,
    reference="Shu-Osher strong-stability-preserving SSPRK(3,3); [GS98]")

RK4 = ButcherTableau(
    a=((0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0), (0.0, 0.5, 0.0, 0.0),
       (0.0, 0.0, 1.0, 0.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6), c=(0.0, 0.5, 0.5, 1.0), name="rk4", order=4,
    reference="classic Runge-Kutta method (Kutta 1901); [B08] chapter 2, [HNW] II.1")

RK38 = ButcherTableau(
    a=((0.0, 0.0, 0.0, 0.0), (1 / 3, 0.0, 0.0, 0.0), (-1 / 3, 1.0, 0.0, 0.0),
       (1.0, -1.0, 1.0, 0.0)),
    b=(1 / 8, 3 / 8, 3 / 8, 1 / 8), c=(0.0, 1 / 3, 2 / 3, 1.0), name="rk38", order=4,
    reference="Kutta's 3/8-rule (1901); [HNW] section II.1")

DOPRI5 = ButcherTableau(
    a=((0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
       (1 / 5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
       (3 / 40, 9 / 40, 0.0, 0.0, 0.0, 0.0, 0.0),
       (44 / 45, -56 / 15, 32 / 9, 0.0, 0.0, 0.0, 0.0),
       (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0.0, 0.0, 0.0),
       (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0.0, 0.0),
       (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0), name="dopri5", order=5,
    reference="Dormand-Prince 5(4), fifth-order weights used with a fixed step (the "
              "7th, FSAL stage has weight 0); [DP80], [HNW] section II.5")

# ----------------------------------------------------------------------------------------
# Implicit methods.

BACKWARD_EULER = ButcherTableau(
    a=((1.0,),), b=(1.0,), c=(1.0,), name="backward_euler", order=1,
    reference="implicit (backward) Euler method; [HW] section IV.3; [B08] chapter 3")

IMPLICIT_MIDPOINT = ButcherTableau(
    a=((0.5,),), b=(1.0,), c=(0.5,), name="implicit_midpoint", order=2,
    reference="implicit midpoint rule (1-stage Gauss-Legendre); [HW] section IV.5")

TRAPEZOID = ButcherTableau(
    a=((0.0, 0.0), (0.5, 0.5)), b=(0.5, 0.5), c=(0.0, 1.0), name="trapezoid", order=2,
    reference="implicit trapezoidal rule / Crank-Nicolson (2-stage Lobatto IIIA); "
              "[HW] section IV.5")
CRANK_NICOLSON = TRAPEZOID

_S3 = math.sqrt(3.0)
GAUSS_LEGENDRE2 = ButcherTableau(
    a=((0.25, 0.25 - _S3 / 6), (0.25 + _S3 / 6, 0.25)),
    b=(0.5, 0.5), c=(0.5 - _S3 / 6, 0.5 + _S3 / 6), name="gauss_legendre2", order=4,
    reference="2-stage Gauss-Legendre collocation (Hammer-Hollingsworth 1955); "
              "[HW] section IV.5; [B08] chapter 3")

_S15 = math.sqrt(15.0)
GAUSS_LEGENDRE3 = ButcherTableau(
    a=((5 / 36, 2 / 9 - _S15 / 15, 5 / 36 - _S15 / 30),
       (5 / 36 + _S15 / 24, 2 / 9, 5 / 36 - _S15 / 24),
       (5 / 36 + _S15 / 30, 2 / 9 + _S15 / 15, 5 / 36)),
    b=(5 / 18, 4 / 9, 5 / 18), c=(0.5 - _S15 / 10, 0.5, 0.5 + _S15 / 10),
    name="gauss_legendre3", order=6,
    reference="3-stage Gauss-Legendre collocation (Kuntzmann-Butcher); "
              "[HW] section IV.5; [B08] chapter 3")

RADAU_IIA2 = ButcherTableau(
    a=((5 / 12, -1 / 12), (0.75, 0.25)), b=(0.75, 0.25), c=(1 / 3, 1.0),
    name="radau_iia2", order=3,
    reference="2-stage Radau IIA (Ehle 1969); [HW] section IV.5")

_S6 = math.sqrt(6.0)
RADAU_IIA3 = ButcherTableau(
    a=(((88 - 7 * _S6) / 360, (296 - 169 * _S6) / 1800, (-2 + 3 * _S6) / 225),
       ((296 + 169 * _S6) / 1800, (88 + 7 * _S6) / 360, (-2 - 3 * _S6) / 225),
       ((16 - _S6) / 36, (16 + _S6) / 36, 1 / 9)),
    b=((16 - _S6) / 36, (16 + _S6) / 36, 1 / 9),
    c=((4 - _S6) / 10, (4 + _S6) / 10, 1.0), name="radau_iia3", order=5,
    reference="3-stage Radau IIA (Ehle 1969), the basis of RADAU5; "
              "[HW] section IV.5")

LOBATTO_IIIC2 = ButcherTableau(
    a=((0.5, -0.5), (0.5, 0.5)), b=(0.5, 0.5), c=(0.0, 1.0), name="lobatto_iiic2",
    order=2, reference="2-stage Lobatto IIIC (Chipman 1971); [HW] section IV.5")

LOBATTO_IIIC3 = ButcherTableau(
    a=((1 / 6, -1 / 3, 1 / 6), (1 / 6, 5 / 12, -1 / 12), (1 / 6, 2 / 3, 1 / 6)),
    b=(1 / 6, 2 / 3, 1 / 6), c=(0.0, 0.5, 1.0), name="lobatto_iiic3", order=4,
    reference="3-stage Lobatto IIIC (Chipman 1971); [HW] section IV.5")

_GAMMA = (3 + _S3) / 6
SDIRK2 = ButcherTableau(
    a=((_GAMMA, 0.0), (1 - 2 * _GAMMA, _GAMMA)), b=(0.5, 0.5), c=(_GAMMA, 1 - _GAMMA),
    name="sdirk2", order=3,
    reference="2-stage singly diagonally implicit RK of order 3 with gamma = "
              "(3 + sqrt 3)/6, A-stable (Norsett 1974, Crouzeix 1975); [HW] section "
              "IV.6")

# fmt: on

# Canonical name -> tableau, in presentation order (explicit first).
_TABLEAUS = {
  t.name: t
  for t in (
    EULER,
    MIDPOINT,
    HEUN,
    RALSTON,
    KUTTA3,
    HEUN3,
    SSPRK3,
    RK4,
    RK38,
    DOPRI5,
    BACKWARD_EULER,
    IMPLICIT_MIDPOINT,
    TRAPEZOID,
    GAUSS_LEGENDRE2,
    GAUSS_LEGENDRE3,
    RADAU_IIA2,
    RADAU_IIA3,
    LOBATTO_IIIC2,
    LOBATTO_IIIC3,
    SDIRK2,
  )
}

# Alternative spellings accepted by get() (after normalisation, see _normalise).
_ALIASES = {
  "forward_euler": "euler",
  "explicit_euler": "euler",
  "explicit_midpoint": "midpoint",
  "ralston2": "ralston",
  "ssp33": "ssprk3",
  "classic_rk4": "rk4",
  "three_eighths": "rk38",
  "3/8": "rk38",
  "dormand_prince": "dopri5",
  "dormand_prince5": "dopri5",
  "implicit_euler": "backward_euler",
  "crank_nicolson": "trapezoid",
  "implicit_trapezoid": "trapezoid",
  "gauss2": "gauss_legendre2",
  "gauss3": "gauss_legendre3",
  "radau2": "radau_iia2",
  "radau3": "radau_iia3",
  "radau5": "radau_iia3",
  "lobatto2": "lobatto_iiic2",
  "lobatto3": "lobatto_iiic3",
}


def is_static_zero(v) -> bool:
  """A coefficient that is statically 0 (a Python or NumPy number; traced values are not)."""
  return isinstance(v, (int, float, np.floating, np.integer)) and v == 0


def needed_stages(a, b, is_zero=is_static_zero) -> tuple[bool, ...]:
  """Per stage of an explicit method: needed iff b_i is not zero or a later needed stage
  reads it through a non-zero a_ki (the FSAL stage of Dormand-Prince is not).  Coefficients
  that ``is_zero`` does not call zero (e.g. learned, traced ones) count as non-zero."""
  s = len(b)
  needed = [False] * s
  for i in reversed(range(s)):
    needed[i] = not is_zero(b[i]) or any(
      needed[k] and not is_zero(a[k][i]) for k in range(i + 1, s)
    )
  return tuple(needed)


def zero_rows(a, is_zero=is_static_zero) -> tuple[bool, ...]:
  """Per stage, whether its row of a is (statically) zero: an explicit stage even in an
  implicit method, evaluated once at y_n."""
  return tuple(all(is_zero(v) for v in row) for row in a)


def _normalise(name: str) -> str:
  return name.strip().lower().replace("-", "_").replace(" ", "_")


def names():
  """Canonical names of the shipped tableaus (explicit first), for :func:`get`."""
  return list(_TABLEAUS)


def aliases():
  """A copy of the alias -> canonical name map accepted by :func:`get`."""
  return dict(_ALIASES)


def get(name) -> ButcherTableau:
  """Returns the shipped tableau called ``name`` (case-insensitive; aliases accepted).

  A :class:`ButcherTableau` passed in is returned unchanged, so APIs can accept either.

  Raises:
    KeyError: for an unknown name; the message lists the known names and aliases.
  """
  if isinstance(name, ButcherTableau):
    return name
  if not isinstance(name, str):
    raise KeyError(f"tableau name must be a str, got {name!r}; known: {names()}")
  key = _normalise(name)
  key = _ALIASES.get(key, key)
  if key not in _TABLEAUS:
    raise KeyError(
      f"unknown Butcher tableau {name!r}; known names: {names()}; aliases: {sorted(_ALIASES)}"
    )
  return _TABLEAUS[key]
