"""The paper's optimiser (section 4.1): SGD with Nesterov momentum and L2 weight decay.

:func:`paper_sgd` is the recipe as one ``optax.GradientTransformation``; :func:`weight_decay_mask`
says which parameters the decay applies to, by their role rather than their names.

Which parameters are weights (``"kernels"``). Weight decay is meant for the weights of the
linear maps on features: every convolution kernel (HWIO, 4 axes: the dense and ERK blocks'
convs, CliqueNet/IRKNet clique filters ``W_{j}_{i}``, tableau vector fields, transitions,
stems) and every fully connected kernel ((in, out), 2 axes: the attention FCs and the
classifier). The rule is one test on a parameter: **a weight has at least two axes**, which
no BatchNorm scale/bias and no bias (one axis) has, whatever a module names its leaves. The
one parameter with two axes that is not a weight is the learned Runge-Kutta matrix ``a`` of
:class:`rknet_jax.tableau_block.TableauStep` (``learn_coefficients=True``), excluded with the
other learned coefficients of that module, :data:`BUTCHER_PARAMS`.

Learned Butcher coefficients (``a``, ``b``, ``c``) and step sizes (``log_step_size``) are not
decayed under ``"kernels"``. They are not weights of a linear map on features but the
coefficients of the integration method (paper equations 1-3): L2 decay is a prior pulling them
to zero, i.e. towards a degenerate method, not a simpler function of the features. ``b -> 0``
makes the step the identity (``y_{n+1} = y_n``, consistency ``sum_i b_i = 1`` is lost), ``a ->
0`` evaluates every stage at ``y_n`` (an explicit Euler-like combination, whatever order the
tableau had), ``c -> 0`` evaluates every stage at ``t_n``, and ``log h -> 0`` pulls the step
size to 1 in whatever unit of time the model happens to use. Decay on a kernel followed by
BatchNorm, by contrast, only controls the kernel's scale (the layer is scale-invariant), which
is the effect weight decay is used for in these networks. ``"all"`` decays every parameter,
these included, as PyTorch's ``SGD(model.parameters(), weight_decay=...)`` in the authors' code.
"""

from typing import Any

import flax
import jax
import optax

__all__ = ["WEIGHT_DECAY_PARAMS", "BUTCHER_PARAMS", "is_weight", "weight_decay_mask", "paper_sgd"]

WEIGHT_DECAY_PARAMS = ("kernels", "all")
"""Values of ``weight_decay_params``: conv and dense weights only, or every parameter."""

BUTCHER_PARAMS = ("a", "b", "c", "log_step_size")
"""Leaf names of :class:`rknet_jax.tableau_block.TableauStep`'s learned Runge-Kutta
coefficients and step size: never weights (see the module docstring)."""


def is_weight(path: tuple, leaf: Any) -> bool:
  """Whether the parameter at ``path`` (a tuple of names) is a conv or dense weight.

  A weight has at least two axes (conv kernels HWIO, dense kernels (in, out)); BatchNorm
  scale/bias and biases have one. The Runge-Kutta coefficients :data:`BUTCHER_PARAMS` are
  not weights whatever their shape.
  """
  return len(getattr(leaf, "shape", ())) >= 2 and str(path[-1]) not in BUTCHER_PARAMS


def weight_decay_mask(params, which: str):
  """The tree of ``params`` with True where weight decay applies.

  Args:
    params: a model's ``params`` collection (arrays or ``jax.ShapeDtypeStruct`` s).
    which: ``"kernels"``: every convolution and dense weight of every model family
      (:func:`is_weight`), never BatchNorm scale/bias, biases or learned Butcher
      coefficients and step sizes; ``"all"``: every parameter.
  """
  if which not in WEIGHT_DECAY_PARAMS:
    raise ValueError(f"weight_decay_params={which!r}; allowed: {WEIGHT_DECAY_PARAMS}")
  if which == "all":
    return jax.tree.map(lambda _: True, params)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return flax.traverse_util.unflatten_dict({k: is_weight(k, v) for k, v in flat.items()})


def paper_sgd(
  learning_rate: float | optax.Schedule,
  *,
  momentum: float = 0.9,
  nesterov: bool = True,
  weight_decay: float = 1e-4,
  weight_decay_params: str = "kernels",
) -> optax.GradientTransformation:
  """SGD + Nesterov momentum with L2 weight decay added to the gradient (section 4.1).

  The update is PyTorch's ``SGD(momentum=0.9, nesterov=True, weight_decay=1e-4)``: the
  gradient ``g + weight_decay * w`` (only for the parameters :func:`weight_decay_mask`
  selects) goes into Nesterov momentum, scaled by the learning rate.

  Args:
    learning_rate: a float or an optax schedule (step -> rate); the paper's CIFAR schedule
      is 0.1 divided by 10 at 50% and 75% of training.
    momentum: momentum coefficient (paper: 0.9).
    nesterov: Nesterov momentum (paper: yes).
    weight_decay: L2 coefficient (paper: 1e-4).
    weight_decay_params: ``"kernels"`` (conv and dense weights) or ``"all"``.

  Example (zero gradient: only the decay moves the conv weight; BatchNorm is not decayed;
  Nesterov's first step is ``(1 + momentum)`` times the gradient):

  >>> import jax.numpy as jnp
  >>> from rknet_jax.optim import paper_sgd
  >>> params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2))},
  ...           "bn": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
  >>> tx = paper_sgd(0.1)
  >>> grads = {"conv": {"kernel": jnp.zeros((3, 3, 1, 2))},
  ...          "bn": {"scale": jnp.zeros(2), "bias": jnp.zeros(2)}}
  >>> updates, _ = tx.update(grads, tx.init(params), params)
  >>> round(float(updates["conv"]["kernel"][0, 0, 0, 0]), 8)  # -0.1 * 1.9 * 1e-4 * 1
  -1.9e-05
  >>> float(jnp.abs(updates["bn"]["scale"]).max())
  0.0
  """
  if weight_decay_params not in WEIGHT_DECAY_PARAMS:
    raise ValueError(f"weight_decay_params={weight_decay_params!r}; allowed: {WEIGHT_DECAY_PARAMS}")
  return optax.chain(
    optax.add_decayed_weights(
      weight_decay, mask=lambda p: weight_decay_mask(p, weight_decay_params)
    ),
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )
