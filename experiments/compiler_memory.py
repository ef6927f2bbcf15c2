"""Give XLA's compile-time memory back to the operating system after every compilation.

XLA:CPU compiles on its own threads; glibc keeps what the compiler frees in those threads'
malloc arenas, where the training step (run from other threads) cannot reuse it. The step's
scratch memory then comes on top of it.  ``malloc_trim(0)`` after each compilation returns
it, at the same speed: the peak-RSS numbers, and the command that measures them, are in
``benchmarks/README.md`` ("Peak RSS: the compiler's freed memory").

:func:`install` registers a ``jax.monitoring`` listener for the backend-compile event that
calls glibc's ``malloc_trim(0)``.  It is installed once per process (the runner calls it at
the start of ``train_and_evaluate``); nothing happens off glibc, or with
``RKNET_MALLOC_TRIM=0``.
"""

from collections.abc import Callable
import ctypes
import ctypes.util
import os

import jax.monitoring

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
"""The ``jax.monitoring`` duration event JAX records when XLA finished compiling."""

_listener = None


def _glibc_malloc_trim() -> Callable[[int], int] | None:
  """glibc's ``malloc_trim``, or None on another C library."""
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    return ctypes.CDLL(name).malloc_trim
  except (OSError, AttributeError):
    return None


def wanted(environ=os.environ) -> bool:
  """False when the user turned it off with ``RKNET_MALLOC_TRIM=0`` (or false/no/off)."""
  return environ.get("RKNET_MALLOC_TRIM", "1").strip().lower() not in ("0", "false", "no", "off")


def install(trim: Callable[[int], int] | None = None) -> bool:
  """Calls ``trim(0)`` (default: glibc's ``malloc_trim``) after every XLA compilation from
  now on in this process.  Returns whether the listener is installed (once per process)."""
  global _listener
  if _listener is not None:
    return True
  trim = trim or _glibc_malloc_trim()
  if trim is None or not wanted():
    return False

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == COMPILE_EVENT:
      trim(0)

  jax.monitoring.register_event_duration_secs_listener(listener)
  _listener = listener
  return True


def uninstall() -> None:
  """Removes the listener :func:`install` registered, if any."""
  global _listener
  if _listener is not None:
    jax.monitoring.unregister_event_duration_listener(_listener)
    _listener = None
