"""Cost of one TableauStep (paper eqs. 2-4) per shipped Butcher tableau.

For every tableau it reports the vector-field evaluations per step
(``TableauStep.num_evaluations``), the compile time and the median time of a jitted
training step (forward + gradient w.r.t. the parameters, batch statistics updated) on
the default JAX device.  Implicit tableaus use the default ``order + 1`` fixed-point
iterations unless ``--iterations`` is given.

    python -m benchmarks.bench_rk                        # all tableaus, 16x16x32, batch 32
    python -m benchmarks.bench_rk --tableaus rk4 gauss_legendre2 --batch 64 --size 32
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from rknet_jax import tableaus
from rknet_jax.tableau_block import TableauStep


def bench(name, x, *, stage_functions, iterations, repeats):
  step = TableauStep(
    tableau=name, stage_functions=stage_functions, implicit_iterations=iterations, step_size=0.5
  )
  variables = jax.jit(lambda v: step.init(jax.random.key(0), v))(x)

  @jax.jit
  def train_step(params, batch_stats, x):
    def loss(p):
      y, updates = step.apply(
        {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      return jnp.mean(y**2), updates

    return jax.grad(loss, has_aux=True)(params)

  start = time.perf_counter()
  jax.block_until_ready(train_step(variables["params"], variables["batch_stats"], x))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(train_step(variables["params"], variables["batch_stats"], x))
    times.append(time.perf_counter() - start)
  return step.num_evaluations, compile_s, statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tableaus", nargs="*", default=tableaus.names())
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=16)
  parser.add_argument("--channels", type=int, default=32)
  parser.add_argument("--stage-functions", default="shared", choices=("shared", "per_stage"))
  parser.add_argument("--iterations", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  x = jnp.ones((args.batch, args.size, args.size, args.channels), jnp.float32)
  print(
    f"device: {jax.devices()[0].device_kind}; x {x.shape}; stage_functions={args.stage_functions}"
  )
  print(f"{'tableau':18s} {'evals':>5s} {'compile s':>10s} {'step ms':>9s} {'ms/eval':>8s}")
  for name in args.tableaus:
    evals, compile_s, step_s = bench(
      name,
      x,
      stage_functions=args.stage_functions,
      iterations=args.iterations,
      repeats=args.repeats,
    )
    print(
      f"{name:18s} {evals:5d} {compile_s:10.2f} {1e3 * step_s:9.2f} {1e3 * step_s / evals:8.2f}"
    )


if __name__ == "__main__":
  main()
