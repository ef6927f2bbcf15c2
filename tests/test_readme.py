"""Every command and Python block of the README runs, or is marked and checked as far as it can be.

A fenced block preceded by ``<!-- readme-test: REASON -->`` needs data, a finished run or a long
time: its Python must parse, and each of its commands must name a runnable module and existing
config files. Every other block runs here as written.
"""

import importlib.util
import pathlib
import re
import shlex

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"<!-- readme-test: (.+?) -->\n$")


def readme_blocks():
  """(language, code, marker reason or None, line number) of every fenced block."""
  text = README.read_text()
  blocks = []
  for match in re.finditer(r"```(\w*)\n(.*?)```", text, flags=re.S):
    before = text[: match.start()]
    marker = MARKER.search(before)
    blocks.append(
      (match.group(1), match.group(2), marker.group(1) if marker else None, before.count("\n") + 1)
    )
  return blocks


def _commands(code):
  """Shell commands of a block: continuation lines joined, comments dropped."""
  joined = code.replace("\\\n", " ")
  return [
    shlex.split(line, comments=True)
    for line in joined.splitlines()
    if line.strip() and shlex.split(line, comments=True)
  ]


def _check_command_targets(argv):
  """A command that is not run: its module exists, and its --config file loads (with its
  ``:argument``, as ml_collections' config flags call ``get_config(argument)``)."""
  assert argv[:2] == ["python", "-m"], argv
  module = ROOT / argv[2].replace(".", "/")
  assert module.with_suffix(".py").exists() or (module / "__main__.py").exists(), argv[2]
  for arg in argv[3:]:
    if arg.startswith("--config="):
      file, _, argument = arg.split("=", 1)[1].partition(":")
      assert (ROOT / file).exists(), arg
      spec = importlib.util.spec_from_file_location("readme_config", ROOT / file)
      config_module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(config_module)
      config = config_module.get_config(argument) if argument else config_module.get_config()
      assert config.model, arg


def test_readme_is_a_short_front_door():
  assert len(README.read_text().splitlines()) <= 250


def test_every_block_is_known_kind():
  for lang, _, _, line in readme_blocks():
    assert lang in ("", "python"), f"README line {line}: unknown block language {lang!r}"


def test_marked_blocks_parse_and_name_what_exists():
  marked = [b for b in readme_blocks() if b[2]]
  assert marked, "expected the long / data-dependent blocks to be marked"
  for lang, code, _, line in marked:
    if lang == "python":
      compile(code, f"README.md:{line}", "exec")
    else:
      for argv in _commands(code):
        _check_command_targets(argv)


def test_install_and_test_commands_are_what_ci_runs():
  ci = (ROOT / ".ci" / "run").read_text()
  text = README.read_text()
  assert "pip install -r requirements.txt" in ci and "`pip install -r requirements.txt`" in text
  test_lines = [
    code.strip() for lang, code, marker, _ in readme_blocks() if not marker and "pytest" in code
  ]
  assert test_lines == ["ruff check . && ruff format --check . && python -m pytest -n 2 -q"]
  assert test_lines[0] in ci.splitlines()


def _shell_blocks():
  return [
    (code, line)
    for lang, code, marker, line in readme_blocks()
    if lang == "" and not marker and "pytest" not in code
  ]


@pytest.mark.slow
@pytest.mark.parametrize("code,line", _shell_blocks(), ids=lambda v: str(v)[:40])
def test_unmarked_commands_run(run_python, code, line):
  for argv in _commands(code):
    assert argv[0] == "python", f"README line {line}: {argv}"
    out = run_python(*argv[1:], env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, f"README line {line}: {argv}\n{out.stderr[-2000:]}"
    assert out.stdout.strip()


def _python_blocks():
  return [
    (code, line) for lang, code, marker, line in readme_blocks() if lang == "python" and not marker
  ]


@pytest.mark.slow
def test_readme_library_example_runs():
  code, line = _python_blocks()[0]
  namespace = {}
  exec(compile(code, f"README.md:{line}", "exec"), namespace)
  # dy/dt = -y cos t, y(0) = 1  =>  y(t) = exp(-sin t)
  np.testing.assert_allclose(namespace["y1"]["x"], np.exp(-np.sin(0.1)), rtol=1e-5)
  np.testing.assert_allclose(namespace["yT"]["x"], np.exp(-np.sin(1.0)), rtol=1e-5)
  assert namespace["y"].shape == namespace["x"].shape == namespace["y_erk"].shape
  assert namespace["logits"].shape == (2, 10)
  assert np.all(np.isfinite(namespace["logits"]))


def test_readme_training_loop_learns(capsys):
  code, line = _python_blocks()[1]
  assert "optax" in code and "for step in range(num_steps)" in code
  namespace = {}
  exec(compile(code, f"README.md:{line}", "exec"), namespace)
  labels, test = namespace["labels"], namespace["test"]
  accuracy = np.mean(np.argmax(namespace["logits"], -1) == labels[test])
  assert accuracy > 0.9, accuracy
  assert f"test accuracy {accuracy:.3f}" in capsys.readouterr().out


def test_every_unmarked_python_block_is_run_by_a_test():
  assert len(_python_blocks()) == 2


def test_reproducing_page_table_is_the_paper_module_table():
  from experiments import paper_tables

  assert paper_tables.markdown() in (ROOT / "docs" / "reproducing.md").read_text()


def test_readme_links_point_at_files():
  for target in re.findall(r"\]\(((?!https?:|#)[^)]+)\)", README.read_text()):
    assert (ROOT / target).exists(), target


def test_docs_links_point_at_files():
  for page in (ROOT / "docs").glob("*.md"):
    for target in re.findall(r"\]\(((?!https?:|#)[^)#]+)(?:#[^)]*)?\)", page.read_text()):
      assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_tableaus_page_is_the_convergence_command_output():
  """docs/tableaus.md holds `python -m rknet_jax.convergence --markdown`: every row's declared
  and algebraic orders exactly, and the measured orders of a few tableaus recomputed here."""
  from rknet_jax import convergence

  text = (ROOT / "docs" / "tableaus.md").read_text()
  table = text.split("<!-- generated: python -m rknet_jax.convergence --markdown -->\n", 1)[1]
  table = table.split("<!-- end generated -->", 1)[0]
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()]
  header, _, *rows = rows
  expected_header, *expected = convergence.order_table(empirical=False)
  assert header == expected_header
  assert [r[:5] for r in rows] == [r[:5] for r in expected]
  by_name = {r[0]: r for r in rows}
  for name in ("euler", "rk4"):
    for column, problem in ((5, "linear"), (6, "nonlinear")):
      assert by_name[name][column] == f"{convergence.measured_order(name, problem=problem):.2f}"


def test_tracked_text_is_self_contained():
  """No path outside the repository and no tracker numbers in code, docs or tests."""
  outside = re.compile(
    "|".join([r"\.\./" + "shared", "shared" + r"/(paper|data)/", "[Ii]ssues?" + r" #?[0-9]+"])
  )
  bad = []
  for path in ROOT.rglob("*"):
    parts = path.relative_to(ROOT).parts
    if (
      path.is_dir()
      or parts[0].startswith(".")
      or "__pycache__" in parts
      or path.suffix not in (".py", ".md", ".toml", ".txt", ".cfg")
    ):
      continue
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
      if outside.search(line):
        bad.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
  assert not bad, "\n".join(bad)
