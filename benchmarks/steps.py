"""The train and inference steps every benchmark times (one copy for all of them).

Train: forward, backward, the paper's SGD (section 4.1: Nesterov momentum 0.9, weight decay
1e-4, lr 0.1) and the BatchNorm statistics update. Inference: the eval-mode forward pass.
Both are plain functions of ``(params, batch_stats, ...)``, to be jitted by the caller.
"""

import optax


def paper_sgd():
  """SGD with Nesterov momentum 0.9 and weight decay 1e-4 on every parameter, lr 0.1."""
  return optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))


def train_step_fn(model, tx):
  """``step(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss)``."""
  import jax

  def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply(
        {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return train_step


def infer_fn(model):
  """``infer(params, batch_stats, x) -> logits`` in eval mode."""

  def infer(params, batch_stats, x):
    return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

  return infer
