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
    rknet_jax.no_such_thing  # noqa: B018  # pylint: disable=pointless-statement


@pytest.mark.parametrize("module", [
    "rknet_jax.tableaus", "rknet_jax.order_conditions", "rknet_jax.rk",
    "rknet_jax.tableau_block", "rknet_jax.conv", "rknet_jax.layers",
    "rknet_jax.blocks", "rknet_jax.models", "rknet_jax.checks", "rknet_jax.spec",
    "rknet_jax.names", "rknet_jax.paper", "rknet_jax.registry",
    "rknet_jax.counting", "rknet_jax.checkpoint"])
def test_public_functions_and_classes_are_documented(module):
  mod = importlib.import_module(module)
  missing = []
  for name, obj in vars(mod).items():
    if name.startswith("_") or getattr(obj, "__module__", None) != module:
      continue
    if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
      missing.append(name)
  assert not missing, f"{module}: undocumented public symbols {missing}"


def test_spec_layers_import_no_model_code():
  """checks, spec and names stay below the modules (which may use them): no import cycle."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys, rknet_jax.names, rknet_jax.paper; "
          "print(sorted(m for m in ('rknet_jax.models', 'rknet_jax.blocks', 'rknet_jax.layers', "
          "'rknet_jax.registry') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
