"""The optimiser of the paper's recipe (section 4.1): SGD + Nesterov momentum, L2 weight decay.

Learning rate 0.1 divided by 10 at 50% and 75% of training (CIFAR) or every 30 epochs
(ImageNet); cosine decay, a constant rate and a linear warm-up are options. The optimiser
itself is the library's ``rknet_jax.optim.paper_sgd`` (weight decay by role: every conv and
dense weight under ``weight_decay_params="kernels"``).
"""

import jax.numpy as jnp
import optax

from rknet_jax import optim as rk_optim
from rknet_jax.optim import weight_decay_mask  # noqa: F401  (re-exported)


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int):
  """Per-step learning rate (section 4.1): step decay, cosine or constant, + warm-up."""
  base = float(config.learning_rate)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.lr_schedule == "step":
    if config.lr_decay_every_epochs > 0:
      every = max(int(config.lr_decay_every_epochs * steps_per_epoch), 1)
      boundaries = list(range(every, total_steps, every))
    else:
      boundaries = [int(round(f * total_steps)) for f in config.lr_decay_fractions]
    main = optax.piecewise_constant_schedule(
      base, {b: float(config.lr_decay_factor) for b in boundaries if b > 0}
    )
  elif config.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(base, max(total_steps - warmup, 1))
  else:
    main = optax.constant_schedule(base)
  if warmup <= 0:
    return main
  if config.lr_schedule == "cosine":
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])
  # step/constant: boundaries are absolute steps, so warm-up only scales the start.
  return lambda step: main(step) * jnp.minimum(1.0, step / warmup)


def make_optimizer(config, schedule):
  """``rknet_jax.optim.paper_sgd`` with the config's momentum, Nesterov and weight decay."""
  return rk_optim.paper_sgd(
    schedule,
    momentum=config.momentum,
    nesterov=config.nesterov,
    weight_decay=config.weight_decay,
    weight_decay_params=config.weight_decay_params,
  )
