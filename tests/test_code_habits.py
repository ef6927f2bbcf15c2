"""Habits of the code base that a reviewer should not have to check by eye."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 80
SKIPPED_DIRS = {"tests", ".venv", ".git", "__pycache__"}


def _python_files():
  for directory, subdirs, files in os.walk(ROOT):
    subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS and not d.startswith(".")]
    for name in files:
      if name.endswith(".py"):
        yield os.path.join(directory, name)


def _long_functions(path: str, limit: int) -> list[str]:
  """``file:line name (N lines)`` of every function or method of ``path`` over ``limit``."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  rel = os.path.relpath(path, ROOT)
  return [
    f"{rel}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
    for node in ast.walk(tree)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    and node.end_lineno - node.lineno + 1 > limit
  ]


def test_the_walk_finds_the_code_and_the_check_can_fail(tmp_path):
  files = {os.path.relpath(p, ROOT) for p in _python_files()}
  assert os.path.join("experiments", "train.py") in files
  assert os.path.join("rknet_jax", "blocks.py") in files
  assert not any(f.startswith("tests" + os.sep) for f in files)
  long_one = tmp_path / "long.py"
  long_one.write_text("def f():\n" + "  x = 1\n" * 80 + "\n\nclass C:\n  def g(self):\n    pass\n")
  assert [s.split(" ", 1)[1] for s in _long_functions(str(long_one), 80)] == ["f (81 lines)"]


def test_no_function_outside_tests_exceeds_80_lines():
  offenders = [o for path in _python_files() for o in _long_functions(path, MAX_FUNCTION_LINES)]
  assert not offenders, (
    f"functions over {MAX_FUNCTION_LINES} lines (split them into well-named pieces): "
    + "; ".join(offenders)
  )
