"""rknet_jax: Runge-Kutta convolutional networks (RKNets) in JAX and Flax Linen.

The public API is imported lazily, so ``import rknet_jax`` is cheap and pulling in
one part (say the Butcher tableaus) does not import the model zoo or the checkpoint
code.  Everything listed in ``__all__`` is reachable as ``rknet_jax.<name>``.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
  # numerics (paper section 3.1, equations 1-3)
  "ButcherTableau": "rknet_jax.tableaus",
  "algebraic_order": "rknet_jax.order_conditions",
  "rk_step": "rknet_jax.rk",
  "odeint_fixed": "rknet_jax.rk",
  # Flax Linen building blocks
  "TableauStep": "rknet_jax.tableau_block",
  "ConvVectorField": "rknet_jax.tableau_block",
  "Conv": "rknet_jax.conv",
  # models (paper section 3.3) and the model zoo
  "RKNet": "rknet_jax.models",
  "TableauRKNet": "rknet_jax.models",
  "DenseNet": "rknet_jax.models",
  "CliqueNet": "rknet_jax.models",
  "ERKStep": "rknet_jax.blocks",
  "IRKStep": "rknet_jax.blocks",
  "DenseBlock": "rknet_jax.blocks",
  "CliqueBlock": "rknet_jax.blocks",
  "RKNetSpec": "rknet_jax.spec",
  "TableauRKNetSpec": "rknet_jax.spec",
  "DenseNetSpec": "rknet_jax.spec",
  "CliqueNetSpec": "rknet_jax.spec",
  "parse_name": "rknet_jax.registry",
  "create_model": "rknet_jax.registry",
  "list_models": "rknet_jax.registry",
  "erknet_from_densenet": "rknet_jax.registry",
  "irknet_from_cliquenet": "rknet_jax.registry",
  # counting in the paper's conventions
  "count_params": "rknet_jax.counting",
  "count_flops": "rknet_jax.counting",
  # training recipe (section 4.1)
  "paper_sgd": "rknet_jax.optim",
  # trained models from an experiments workdir
  "load_checkpoint": "rknet_jax.checkpoint",
}

_SUBMODULES = (
  "tableaus",
  "order_conditions",
  "rk",
  "tableau_block",
  "conv",
  "layers",
  "blocks",
  "models",
  "checks",
  "spec",
  "names",
  "paper",
  "registry",
  "counting",
  "summary",
  "checkpoint",
  "preprocessing",
  "convergence",
  "optim",
)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)

if TYPE_CHECKING:
  # What editors and type checkers see: the same names, imported eagerly (never at run time).
  # tests/test_public_api.py checks these lines against _EXPORTS and _SUBMODULES.
  from rknet_jax import (
    blocks,
    checkpoint,
    checks,
    conv,
    convergence,
    counting,
    layers,
    models,
    names,
    optim,
    order_conditions,
    paper,
    preprocessing,
    registry,
    rk,
    spec,
    summary,
    tableau_block,
    tableaus,
  )
  from rknet_jax.blocks import CliqueBlock, DenseBlock, ERKStep, IRKStep
  from rknet_jax.checkpoint import load_checkpoint
  from rknet_jax.conv import Conv
  from rknet_jax.counting import count_flops, count_params
  from rknet_jax.models import CliqueNet, DenseNet, RKNet, TableauRKNet
  from rknet_jax.optim import paper_sgd
  from rknet_jax.order_conditions import algebraic_order
  from rknet_jax.registry import (
    create_model,
    erknet_from_densenet,
    irknet_from_cliquenet,
    list_models,
    parse_name,
  )
  from rknet_jax.rk import odeint_fixed, rk_step
  from rknet_jax.spec import CliqueNetSpec, DenseNetSpec, RKNetSpec, TableauRKNetSpec
  from rknet_jax.tableau_block import ConvVectorField, TableauStep
  from rknet_jax.tableaus import ButcherTableau


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  if name in _SUBMODULES:
    module = importlib.import_module(f"rknet_jax.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module 'rknet_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
