"""Compile time of the training step and of inference for the largest paper models.

Nothing is allocated: parameters come from ``jax.eval_shape`` of ``init`` and the jitted
steps are lowered and compiled from abstract shapes (``jax.ShapeDtypeStruct``), so even the
ImageNet models compile on a small machine.  The train step is forward + backward + optax
SGD (Nesterov 0.9, weight decay 1e-4) + BatchNorm statistics, as in ``experiments/steps.py``.

    python -m benchmarks.bench_compile                      # largest CIFAR and ImageNet models
    python -m benchmarks.bench_compile --models "IRKNet-3x1 3x1 3x1" --batch 64
"""

import argparse
import time

import jax
import jax.numpy as jnp

import rknet_jax
from benchmarks import steps as bench_steps

DEFAULT_MODELS = ("IRKNet-5×1 5×1 5×1-AB-k180", "DenseNet-BC-250-k24",
                  "ERKNet-3×1 3×1 6×1 2×1-B")


def _input_shape(model):
  return (224, 224, 3) if getattr(model, "stem", "cifar") == "imagenet" else (32, 32, 3)


def compile_times(name, batch):
  """Returns (seconds to lower+compile the train step, the same for inference) for `name`."""
  model = rknet_jax.create_model(name)
  x = jax.ShapeDtypeStruct((batch,) + _input_shape(model), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  tx = bench_steps.paper_sgd()
  opt_state = jax.eval_shape(tx.init, variables["params"])
  train_step, infer = bench_steps.train_step_fn(model, tx), bench_steps.infer_fn(model)

  t0 = time.perf_counter()
  jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(
      variables["params"], variables["batch_stats"], opt_state, x, y).compile()
  t1 = time.perf_counter()
  jax.jit(infer).lower(variables["params"], variables["batch_stats"], x).compile()
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  print(f"backend: {jax.default_backend()}, batch {args.batch}")
  print("| model | params (M) | train-step compile (s) | inference compile (s) |")
  print("| --- | --- | --- | --- |")
  for name in args.models:
    model = rknet_jax.create_model(name)
    params = rknet_jax.count_params(model, _input_shape(model)) / 1e6
    train_s, infer_s = compile_times(name, args.batch)
    print(f"| {name} | {params:.2f} | {train_s:.1f} | {infer_s:.1f} |", flush=True)


if __name__ == "__main__":
  main()
