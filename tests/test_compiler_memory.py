"""experiments/compiler_memory.py: malloc_trim after every XLA compilation."""

import jax
import jax.numpy as jnp
import pytest

from experiments import compiler_memory


@pytest.fixture
def fresh():
  compiler_memory.uninstall()
  yield
  compiler_memory.uninstall()


def test_trim_runs_after_each_compilation_and_not_after_cached_calls(fresh):
  del fresh
  calls = []
  assert compiler_memory.install(trim=calls.append)
  assert compiler_memory.install(trim=calls.append)  # once per process
  f = jax.jit(lambda x: x * 3 + 1)
  x5, x7 = jnp.ones(5), jnp.ones(7)
  jax.block_until_ready((x5, x7))
  calls.clear()
  f(x5).block_until_ready()
  assert calls == [0]  # malloc_trim(0), once for the one compilation
  f(x5).block_until_ready()  # cached: no compilation, no trim
  assert calls == [0]
  f(x7).block_until_ready()  # a new shape compiles again
  assert calls == [0, 0]


def test_opt_out_and_no_glibc(fresh, monkeypatch):
  del fresh
  monkeypatch.setenv("RKNET_MALLOC_TRIM", "0")
  assert not compiler_memory.wanted()
  assert not compiler_memory.install(trim=lambda _: 0)
  monkeypatch.setenv("RKNET_MALLOC_TRIM", "1")
  monkeypatch.setattr(compiler_memory, "_glibc_malloc_trim", lambda: None)
  assert not compiler_memory.install()


def test_glibc_malloc_trim_is_found_on_this_linux_machine():
  trim = compiler_memory._glibc_malloc_trim()
  assert trim is not None and trim(0) in (0, 1)
