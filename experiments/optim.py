"""The optimiser of the paper's recipe (section 4.1): SGD + Nesterov momentum, L2 weight decay.

Learning rate 0.1 divided by 10 at 50% and 75% of training (CIFAR) or every 30 epochs
(ImageNet); cosine decay, a constant rate and a linear warm-up are options.
"""

import flax
import jax
import jax.numpy as jnp
import optax


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
        base, {b: float(config.lr_decay_factor) for b in boundaries if b > 0})
  elif config.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(base, max(total_steps - warmup, 1))
  else:
    main = optax.constant_schedule(base)
  if warmup <= 0:
    return main
  if config.lr_schedule == "cosine":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base, warmup), main], [warmup])
  # step/constant: boundaries are absolute steps, so warm-up only scales the start.
  return lambda step: main(step) * jnp.minimum(1.0, step / warmup)


def weight_decay_mask(params, which: str):
  """True for the parameters weight decay applies to.

  ``"kernels"``: the ``kernel`` leaves (all conv and dense weights); BN scale/bias and
  dense biases are not decayed. ``"all"``: every trainable parameter.
  """
  if which == "all":
    return jax.tree.map(lambda _: True, params)
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def make_optimizer(config, schedule):
  """SGD + Nesterov momentum with L2 weight decay added to the gradient (as torch SGD)."""
  return optax.chain(
      optax.add_decayed_weights(
          config.weight_decay,
          mask=lambda p: weight_decay_mask(p, config.weight_decay_params)),
      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
