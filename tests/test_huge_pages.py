"""experiments/huge_pages.py: the CLI turns glibc's huge pages on itself."""

import os
import sys

import pytest

from experiments import huge_pages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "environ, platform, expected",
  [
    ({}, "linux", huge_pages.TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux", None),  # the user's, kept
    ({"RKNET_HUGE_PAGES": "0"}, "linux", None),
    ({"RKNET_HUGE_PAGES": "off"}, "linux", None),
    ({}, "darwin", None),
  ],
)
def test_when_the_environment_changes(environ, platform, expected):
  env = huge_pages.huge_pages_env(environ, platform)
  assert (env or {}).get("GLIBC_TUNABLES") == expected
  if env is not None:
    assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == environ


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables: Linux only")
def test_the_process_reexecutes_itself_once_with_huge_pages(run_python):
  def probe(**env):  # what the child's GLIBC_TUNABLES is after it started
    unset = ("GLIBC_TUNABLES", "RKNET_HUGE_PAGES")
    out = run_python("-m", "experiments.huge_pages", env=env, unset=unset, timeout=60, check=True)
    return out.stdout.strip()

  assert probe() == huge_pages.TUNABLE
  assert probe(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2"
  assert probe(RKNET_HUGE_PAGES="0") == "unset"


def test_the_command_line_entry_points_call_it():
  for module in ("main", "study"):
    src = open(os.path.join(REPO, "experiments", f"{module}.py")).read()
    main_block = src[src.index('if __name__ == "__main__":') :]
    assert "huge_pages.reexec_with_huge_pages()" in main_block, module
