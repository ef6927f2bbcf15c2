"""Checks of model options, shared by the specs and the modules (one message per mistake).

Each check returns the value it accepts (normalised: ints, tuples, dtype names) or raises
ValueError naming the owner, the field, the bad value and what is allowed.  The constants are
the allowed values.  This module imports no model code, so every module can use it.
"""

import difflib
from typing import Any

import jax.numpy as jnp

__all__ = [
  "METHODS",
  "STEMS",
  "UPDATE_ORDERS",
  "DTYPES",
  "IMPLS",
  "DENSE_FORMULATIONS",
  "MAX_LAYERS",
  "MAX_WIDTH",
  "MAX_UPDATES",
  "MAX_COUNT",
  "check_choice",
  "check_int",
  "check_optional_int",
  "check_bool",
  "check_rate",
  "check_epsilon",
  "check_compression",
  "check_shared_weight_stages",
  "per_period",
  "sequence_length",
  "dtype_name",
  "check_keywords",
  "check_size",
]

METHODS = ("explicit", "implicit")
"""RK time-steps of an RKNet: explicit (dense blocks) or implicit (clique blocks)."""
STEMS = ("cifar", "imagenet")
"""Preprocessors: 3x3 conv (CIFAR, SVHN, digits) or 7x7/2 conv + BN + ReLU + max-pool."""
UPDATE_ORDERS = ("gauss_seidel", "jacobi")
"""Alternate-update orders of a clique block (the paper's / CliqueNet's is gauss_seidel)."""
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
"""Compute dtypes by name (parameters stay float32, logits are float32)."""
IMPLS = ("auto", "xla", "dot1x1", "dot")
"""Convolution formulations of :mod:`rknet_jax.conv` (``"auto"``: by backend at trace time)."""
DENSE_FORMULATIONS = ("auto", "buffer", "loop")
"""Dense-block formulations (:class:`rknet_jax.blocks.DenseBlock`; ``"auto"``: by depth and
backend)."""

MAX_LAYERS = 1000
"""Largest model a spec may describe, in layers (sum over periods of s·m·r, or of the
blocks' layers): the paper's largest has 123.  Tracing grows with the layer count, so an
absurd name fails here at once instead of running for minutes."""
MAX_WIDTH = 1 << 16
"""Largest growth rate, multiplier, bottleneck width or stem width (channels)."""
MAX_UPDATES = 100
"""Most alternate updates per clique block / IRK time-step (the paper uses 1)."""


# ------------------------------------------------------------------------------ checks
def _suggest(word, choices):
  close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(owner: str, field: str, value, allowed) -> Any:
  """``value`` if it is one of ``allowed``, else ValueError naming both."""
  if isinstance(value, str) and value in allowed:
    return value
  raise ValueError(
    f"{owner}: {field}={value!r}: expected one of {tuple(allowed)}" + _suggest(value, allowed)
  )


MAX_COUNT = 1 << 31
"""Bound of the counts that have no natural one (steps, iterations, orders, depths)."""


def check_int(
  owner: str, field: str, value, minimum: int = 1, maximum: int = MAX_WIDTH, note: str = ""
) -> int:
  """``int(value)`` for an integer in [minimum, maximum] (bools, floats and strings
  refused; NumPy integers accepted).  The one integer/range check of the library;
  ``note`` ends the message (what the value means)."""
  if (
    isinstance(value, bool)
    or not hasattr(value, "__index__")
    or not minimum <= int(value) <= maximum
  ):
    raise ValueError(
      f"{owner}: {field}={value!r}: expected an int from {minimum} to "
      f"{maximum}" + (f" ({note})" if note else "")
    )
  return int(value)


def check_optional_int(
  owner: str, field: str, value, minimum: int = 1, maximum: int = MAX_WIDTH, note: str = ""
):
  """None, or ``check_int(owner, field, value, minimum, maximum, note)``."""
  return None if value is None else check_int(owner, field, value, minimum, maximum, note)


def check_bool(owner: str, field: str, value) -> bool:
  """``value`` if it is True or False."""
  if not isinstance(value, bool):
    raise ValueError(f"{owner}: {field}={value!r}: expected True or False")
  return value


def check_rate(owner: str, field: str, value, low_open=False) -> float:
  """``float(value)`` for 0 <= value < 1 (0 < value < 1 with ``low_open``)."""
  ok = (
    not isinstance(value, bool)
    and isinstance(value, (int, float))
    and (0.0 < value if low_open else 0.0 <= value)
    and value < 1.0
  )
  if not ok:
    raise ValueError(
      f"{owner}: {field}={value!r}: expected {'0 <' if low_open else '0 <='} {field} < 1"
    )
  return float(value)


def per_period(owner: str, field: str, value, periods: int, maximum: int = MAX_WIDTH):
  """One positive int per period from an int (repeated) or a sequence of ``periods``."""
  if isinstance(value, (str, bytes)):
    raise ValueError(
      f"{owner}: {field}={value!r} is a string: expected an int or a "
      f"sequence of {periods} ints (one per period), e.g. {field}=36"
    )
  if hasattr(value, "__index__") and not isinstance(value, bool):
    value = (value,) * periods
  try:
    value = tuple(value)
  except TypeError:
    raise ValueError(
      f"{owner}: {field}={value!r}: expected a positive int or a sequence "
      f"of {periods} positive ints (one per period)"
    ) from None
  if len(value) != periods:
    raise ValueError(
      f"{owner}: {field}={value!r} has {len(value)} entries, expected {periods} (one per period)"
    )
  for v in value:
    if isinstance(v, bool) or not hasattr(v, "__index__") or not 1 <= int(v) <= maximum:
      raise ValueError(
        f"{owner}: {field}={value!r}: every entry must be an int from 1 to {maximum}, got {v!r}"
      )
  return tuple(int(v) for v in value)


def sequence_length(owner: str, field: str, value) -> int:
  """Length of a non-string sequence, else ValueError."""
  if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
    raise ValueError(f"{owner}: {field}={value!r}: expected a sequence of ints")
  return len(value)


def dtype_name(owner: str, value) -> str:
  """The name in :data:`DTYPES` of a dtype given by name or as a dtype."""
  if isinstance(value, str) and value in DTYPES:
    return value
  try:
    dt = jnp.dtype(value)
  except TypeError:
    dt = None
  for name, candidate in DTYPES.items():
    if dt == jnp.dtype(candidate):
      return name
  raise ValueError(f"{owner}: dtype={value!r}: expected one of {tuple(DTYPES)}")


def check_epsilon(owner: str, field: str, value) -> float:
  """``float(value)`` for 0 < value < 1 (a BatchNorm epsilon)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
    raise ValueError(f"{owner}: {field}={value!r}: expected 0 < {field} < 1")
  return float(value)


def check_compression(owner: str, value) -> float:
  """``float(value)`` for a transition compression 0 < value <= 1 (DenseNet's theta)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
    raise ValueError(f"{owner}: compression={value!r}: expected 0 < compression <= 1")
  return float(value)


def check_shared_weight_stages(owner: str, stages) -> None:
  """ValueError unless every clique block / IRK time-step with shared weights has s >= 2.

  With s = 1 the update pass of a clique block has no other stage to read (equation 6 of
  the paper: stage i of the implicit method reads every stage j != i).
  """
  for n, s in enumerate(stages):
    if s < 2:
      raise ValueError(
        f"{owner}: a clique block with shared weights needs s >= 2 stages "
        f"(equation 6: with s = 1 the update pass has no other stage to read), "
        f"got s = {s} in block {n + 1} of stages {tuple(stages)}"
      )


def check_keywords(owner: str, given, allowed) -> None:
  """ValueError naming each unknown keyword and the closest allowed one (difflib)."""
  unknown = [k for k in given if k not in allowed]
  if unknown:
    hints = "; ".join(f"{k!r}{_suggest(k, allowed)}" for k in unknown)
    raise ValueError(f"{owner}: unknown option(s) {hints}; allowed: {sorted(allowed)}")


def check_size(owner: str, layers: int) -> None:
  """ValueError when a model of ``layers`` layers exceeds :data:`MAX_LAYERS`."""
  if layers > MAX_LAYERS:
    raise ValueError(
      f"{owner}: {layers} layers is more than the {MAX_LAYERS} a model may "
      "have (rknet_jax.spec.MAX_LAYERS; the paper's largest has 123)"
    )
