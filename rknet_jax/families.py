"""The model families, each registered once: spec, module, name grammar, study label.

A family is one record (:class:`Family`) naming everything the library needs to know about
it (the idea of timm's ``register_model``, one record per family rather than per variant):

* ``spec``: its :class:`~rknet_jax.spec.ModelSpec` subclass (the validated value);
* ``module``: its Flax module class, whose fields carry the spec's field names, so
  :func:`rknet_jax.registry.build` is ``module(**spec fields)`` for every family;
* ``matches`` / ``from_name``: which model names are its and how one reads into a spec
  (:mod:`rknet_jax.names`);
* ``study_labels``: the name prefixes the study groups its models by (plot markers);
* ``converter``: optional, the paper's conversion of this baseline into an RKNet
  (:func:`rknet_jax.registry.erknet_from_densenet`, ``irknet_from_cliquenet``).

``module``, ``from_name`` and ``converter`` may be given as ``"package.module:attribute"``
text, imported on first use, so that registering a family (and the whole spec layer) does
not import Flax.  The built-in families are registered at the end of :mod:`rknet_jax.spec`;
a new family is its module plus one :func:`register` call.

This module imports nothing of the model code.
"""

from collections.abc import Callable
import dataclasses
import importlib
from typing import Any

__all__ = [
  "Family",
  "register",
  "unregister",
  "families",
  "by_spec_name",
  "of_spec",
  "of_module",
  "for_name",
  "study_labels",
]

Lazy = str | Callable[..., Any] | type


def _resolve(target: Lazy):
  """``target`` itself, or the attribute a ``"package.module:attribute"`` text names."""
  if not isinstance(target, str):
    return target
  module, _, attribute = target.partition(":")
  return getattr(importlib.import_module(module), attribute)


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family (see the module docstring).

  Attributes:
    spec: the spec class (its ``__name__`` is the ``family`` key of ``model.json``).
    module: the Flax module class (or its import text); its fields include every field of
      ``spec`` under the same name.
    matches: ``matches(name) -> bool`` for a stripped model name.
    from_name: ``from_name(name, hint, fields) -> spec`` (or its import text): the spec a
      name and keyword fields describe; ``hint`` ends a "growth_rate is required" error.
    study_labels: name prefixes the study groups this family's models under.
    converter: the baseline-to-RKNet converter of the paper (or its import text), if any.
  """

  spec: type
  module: Lazy
  matches: Callable[[str], bool]
  from_name: Lazy
  study_labels: tuple[str, ...] = ()
  converter: Lazy | None = None

  @property
  def name(self) -> str:
    """The spec class's name: the family's key."""
    return self.spec.__name__

  def module_class(self) -> type:
    """The Flax module class (imported on first use when given as text)."""
    return _resolve(self.module)

  def spec_from_name(self, name: str, hint: str, fields: dict[str, Any]):
    """The spec of ``name`` with ``fields`` (see ``from_name``)."""
    return _resolve(self.from_name)(name, hint, fields)

  def convert(self, config):
    """The paper's RKNet of a baseline config (ValueError for a family without one)."""
    if self.converter is None:
      raise ValueError(f"{self.name}: no RKNet conversion is registered for this family")
    return _resolve(self.converter)(config)


_REGISTRY: dict[str, Family] = {}


def _builtins():
  importlib.import_module("rknet_jax.spec")  # registers the built-in families


def register(family: Family) -> Family:
  """Adds ``family``; ValueError if a family of that spec name is registered already."""
  if not isinstance(family, Family):
    raise ValueError(f"register: expected a families.Family, got {type(family).__name__}")
  if family.name in _REGISTRY:
    raise ValueError(f"register: a family {family.name!r} is registered already")
  _REGISTRY[family.name] = family
  return family


def unregister(name: str) -> None:
  """Removes the family of spec class name ``name`` (tests' toy families)."""
  _REGISTRY.pop(name, None)


def families() -> tuple[Family, ...]:
  """The registered families, in registration order."""
  _builtins()
  return tuple(_REGISTRY.values())


def by_spec_name(name: str) -> Family:
  """The family whose spec class is called ``name``; ValueError listing the known ones."""
  _builtins()
  if name not in _REGISTRY:
    raise ValueError(f"model spec: family={name!r}: expected one of {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def of_spec(spec) -> Family:
  """The family of a spec instance; ValueError for anything else."""
  _builtins()
  family = _REGISTRY.get(type(spec).__name__)
  if family is None or family.spec is not type(spec):
    raise ValueError(
      f"create_model: expected a model name or a spec of a registered family "
      f"({', '.join(sorted(_REGISTRY))}), got {type(spec).__name__}"
    )
  return family


def of_module(module_cls: type) -> Family:
  """The family whose module class is ``module_cls`` (or a base of it)."""
  for exact in (True, False):
    for family in families():
      cls = family.module_class()
      if module_cls is cls or (not exact and issubclass(module_cls, cls)):
        return family
  raise ValueError(f"{module_cls.__name__}: not the module of a registered model family")


def for_name(name: str) -> Family | None:
  """The first registered family that claims the (stripped) model name, or None."""
  for family in families():
    if family.matches(name):
      return family
  return None


def study_labels() -> tuple[str, ...]:
  """The study's family labels (name prefixes), in registration order."""
  return tuple(label for family in families() for label in family.study_labels)
