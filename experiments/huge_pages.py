"""Transparent huge pages for the runner's memory on Linux, with no variable for users to set.

XLA:CPU allocates each step's scratch memory afresh through glibc's malloc. With 4 KiB pages
every step then pays hundreds of thousands of page faults, up to a quarter of a CPU training
step (``benchmarks/README.md``). glibc >= 2.35 backs large allocations with transparent huge
pages when ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` is set before the process starts, so the
command-line entry points re-execute themselves once with it (same pid, same arguments).

Nothing happens when ``GLIBC_TUNABLES`` is already set (the user's choice is kept), off Linux,
or with ``RKNET_HUGE_PAGES=0``. On other C libraries or with huge pages disabled in the kernel
the variable is ignored; on GPU/TPU it changes nothing that matters.

``python -m experiments.huge_pages`` prints the value the process ends up with.
"""

from collections.abc import Mapping
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_env(environ: Mapping[str, str], platform: str) -> dict | None:
  """The environment to re-execute with, or None when no re-execution is wanted."""
  if not platform.startswith("linux") or "GLIBC_TUNABLES" in environ:
    return None
  if environ.get("RKNET_HUGE_PAGES", "1").strip().lower() in ("0", "false", "no", "off"):
    return None
  return dict(environ, GLIBC_TUNABLES=TUNABLE)


def reexec_with_huge_pages():
  """Re-executes this process (``sys.orig_argv``) with huge pages on, where wanted.

  Call it first thing in a ``__main__`` block, before JAX or anything else is imported.
  """
  env = huge_pages_env(os.environ, sys.platform)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)


if __name__ == "__main__":
  reexec_with_huge_pages()
  print(os.environ.get("GLIBC_TUNABLES", "unset"))
