"""Tests for rknet_jax.convergence: the measured-order tool."""

import pytest

from rknet_jax import convergence


def test_measured_order_matches_declared_order():
  assert abs(convergence.measured_order("rk4", "linear") - 4) < 0.3
  assert abs(convergence.measured_order("radau_iia2", "nonlinear") - 3) < 0.3
  # Euler is first order, not fourth: the measurement can tell them apart.
  assert abs(convergence.measured_order("euler", "linear") - 1) < 0.3


def test_bad_problem_and_step_counts_are_named():
  with pytest.raises(ValueError, match="problem must be one of"):
    convergence.measured_order("rk4", "chaotic")
  with pytest.raises(ValueError, match="num_steps entry=0: expected an int from 1.*positive ints"):
    convergence.convergence_errors("rk4", "linear", num_steps=(8, 0))


def test_order_table_without_measurement_lists_every_tableau():
  header, *rows = convergence.order_table(empirical=False)
  assert header[:5] == ["name", "kind", "stages", "declared", "algebraic"]
  by_name = {r[0]: r for r in rows}
  assert by_name["rk4"][1:5] == ["explicit", "4", "4", "4"]
  assert by_name["gauss_legendre2"][1] == "implicit"
  assert by_name["gauss_legendre2"][4] == "4"


def test_command_line_prints_markdown_table(capsys):
  convergence.main(["--no-empirical", "--markdown"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("| name | kind | stages | declared | algebraic")
  assert any(line.startswith("| dopri5 | explicit | 7 | 5 | 5 |") for line in lines)


def test_library_modules_import_without_cycles():
  """tableaus and order_conditions never import rk or convergence (no cycle, lazy or not)."""
  import ast
  import pathlib

  import rknet_jax

  root = pathlib.Path(rknet_jax.__file__).parent
  for module in ("tableaus", "order_conditions", "rk"):
    tree = ast.parse((root / f"{module}.py").read_text())
    imported = {
      alias.name
      for node in ast.walk(tree)
      if isinstance(node, ast.ImportFrom) and node.module == "rknet_jax"
      for alias in node.names
    }
    assert "convergence" not in imported, module
    if module != "rk":
      assert "rk" not in imported, module
