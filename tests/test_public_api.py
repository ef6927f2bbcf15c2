"""The lazily imported public API resolves, and every public symbol is documented."""

import importlib
import inspect

import pytest

import rknet_jax


@pytest.mark.parametrize("name", rknet_jax.__all__)
def test_public_name_resolves_and_has_docstring(name):
  obj = getattr(rknet_jax, name)
  assert inspect.getdoc(obj), f"rknet_jax.{name} has no docstring"


def test_unknown_attribute_raises_attribute_error():
  with pytest.raises(AttributeError, match="no_such_thing"):
    rknet_jax.no_such_thing  # noqa: B018


@pytest.mark.parametrize(
  "module",
  [
    "rknet_jax.tableaus",
    "rknet_jax.order_conditions",
    "rknet_jax.rk",
    "rknet_jax.tableau_block",
    "rknet_jax.conv",
    "rknet_jax.layers",
    "rknet_jax.blocks",
    "rknet_jax.models",
    "rknet_jax.checks",
    "rknet_jax.spec",
    "rknet_jax.names",
    "rknet_jax.paper",
    "rknet_jax.registry",
    "rknet_jax.counting",
    "rknet_jax.checkpoint",
  ],
)
def test_public_functions_and_classes_are_documented(module):
  mod = importlib.import_module(module)
  missing = []
  for name, obj in vars(mod).items():
    if name.startswith("_") or getattr(obj, "__module__", None) != module:
      continue
    if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
      missing.append(name)
  assert not missing, f"{module}: undocumented public symbols {missing}"


def test_spec_layers_import_no_model_code(run_python):
  """checks, spec and names stay below the modules (which may use them): no import cycle."""
  code = (
    "import sys, rknet_jax.names, rknet_jax.paper; "
    "print(sorted(m for m in ('rknet_jax.models', 'rknet_jax.blocks', 'rknet_jax.layers', "
    "'rknet_jax.registry') if m in sys.modules))"
  )
  out = run_python("-c", code, check=True)
  assert out.stdout.strip() == "[]"


def _pyproject():
  import pathlib

  try:
    import tomllib
  except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

  return tomllib.loads((pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_library_install_declares_exactly_what_rknet_jax_imports():
  """`pip install .` is the library only: its dependencies are the third-party modules that
  rknet_jax/*.py import (no TensorFlow, no runner or test tools), and only rknet_jax is packaged."""
  import ast
  import pathlib
  import re
  import sys

  project = _pyproject()["project"]
  declared = {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
  # import name -> distribution name, where they differ
  distribution = {"orbax": "orbax-checkpoint", "PIL": "pillow"}
  imported = set()
  for path in pathlib.Path(rknet_jax.__file__).parent.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        imported.add(node.module.split(".")[0])
  third_party = {
    distribution.get(m, m)
    for m in imported
    if m not in sys.stdlib_module_names and m != "rknet_jax"
  }
  # optax: the library's optimiser (the paper's SGD); flax depends on it anyway.
  assert third_party <= declared, f"imported but not declared: {third_party - declared}"
  unused = declared - third_party - {"optax"}
  assert not unused, f"declared but never imported: {unused}"
  assert not any("tensorflow" in d for d in declared)
  packages = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
  assert packages == ["rknet_jax", "rknet_jax.*"]
  assert {"train", "dev"} <= set(project["optional-dependencies"])


def test_every_declared_dependency_is_pinned_in_requirements():
  """`pip install -r requirements.txt` (CI's install) is the library and both extras, pinned:
  a dependency added to pyproject.toml but not pinned there would be missing in CI."""
  import pathlib
  import re

  def name(spec):
    return re.split(r"[\[<>=!~; ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")

  root = pathlib.Path(__file__).resolve().parents[1]
  lines = (root / "requirements.txt").read_text().splitlines()
  pinned = {name(l) for l in lines if l.strip() and not l.startswith("#")}
  project = _pyproject()["project"]
  declared = list(project["dependencies"])
  for deps in project["optional-dependencies"].values():
    declared += [d for d in deps if "python_version < '3.11'" not in d]  # CI runs 3.11
  missing = {name(d) for d in declared} - pinned - {"rknet-jax"}
  assert not missing, f"in pyproject.toml but not pinned in requirements.txt: {missing}"


def test_one_version_string():
  assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
    "attr": "rknet_jax.__version__"
  }
  assert "version" in _pyproject()["project"]["dynamic"]


@pytest.mark.parametrize(
  "name", ["rk_step", "odeint_fixed", "create_model", "count_params", "TableauStep"]
)
def test_docstring_examples_run(name):
  """The doctested examples of the main entry points (what an editor shows on hover)."""
  import doctest

  obj = getattr(rknet_jax, name)
  tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs={})
  assert tests and tests[0].examples, f"rknet_jax.{name} has no doctest example"
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in tests:
    runner.run(test)
  assert runner.summarize(verbose=False).failed == 0


def test_type_checking_imports_are_the_lazy_exports():
  """Editors and type checkers read the ``if TYPE_CHECKING:`` imports of rknet_jax/__init__.py;
  they name exactly the lazily exported symbols and submodules, from the same modules."""
  import ast
  import pathlib

  tree = ast.parse(pathlib.Path(rknet_jax.__file__).read_text())
  block = next(
    node
    for node in tree.body
    if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
  )
  seen = {}
  for node in block.body:
    for alias in node.names:
      seen[alias.name] = node.module
  expected = dict(rknet_jax._EXPORTS)
  expected.update({m: "rknet_jax" for m in rknet_jax._SUBMODULES})
  assert seen == expected
