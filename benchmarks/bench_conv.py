"""Per-convolution microbenchmark of the formulations in ``rknet_jax.conv``.

For each convolution shape of ERKNet-6x1 6x1 6x1-B (k = 36, batch 64, CIFAR) it times,
with every formulation (``impl``), the forward pass, the input gradient, the kernel
gradient and the full VJP, each as its own jitted function.  Formulations are
interleaved round by round (so machine noise hits them alike) and the table reports
the median over rounds and the spread (min-max) of the per-round medians.  By default
glibc is told to keep freed memory (``--malloc keep``): otherwise every call's fresh
output buffer page-faults, which on a VM costs more than the arithmetic.

    python -m benchmarks.bench_conv                 # all shapes, all impls
    python -m benchmarks.bench_conv --rounds 3 --shapes 3x3
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from rknet_jax import conv as conv_lib

# name -> (N, H, W, C, D, kernel size): the 3x3 conv of a bottleneck layer and the
# widest 1x1 conv of the first period of ERKNet-6x1 6x1 6x1-B (k = w = 36, batch 64).
SHAPES = {
  "3x3": (64, 32, 32, 36, 36, 3),
  "1x1": (64, 32, 32, 252, 36, 1),
  "3x3-16": (64, 16, 16, 36, 36, 3),
}


def _fns(impl, strides=(1, 1), padding="SAME"):
  def fwd(x, k):
    return conv_lib.conv2d(x, k, strides, padding, impl=impl)

  def dx(x, k, g):
    return jax.vjp(lambda x_: fwd(x_, k), x)[1](g)[0]

  def dk(x, k, g):
    return jax.vjp(lambda k_: fwd(x, k_), k)[1](g)[0]

  def vjp(x, k, g):
    return jax.vjp(fwd, x, k)[1](g)

  return {"fwd": jax.jit(fwd), "dx": jax.jit(dx), "dk": jax.jit(dk), "vjp": jax.jit(vjp)}


def _time(fn, args, reps):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument(
    "--impls",
    nargs="+",
    default=["xla", "dot1x1", "dot"],
    choices=[i for i in conv_lib.IMPLS if i != "auto"],
  )
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--reps", type=int, default=5, help="timed calls per round")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument(
    "--malloc",
    default="keep",
    choices=["default", "keep"],
    help="'keep': glibc keeps freed memory (benchmarks/cpu_allocator.py), "
    "so repeated calls do not page-fault on fresh output buffers",
  )
  args = parser.parse_args(argv)
  if args.malloc == "keep":
    from benchmarks.cpu_allocator import keep_freed_memory

    keep_freed_memory()
  dtype = jnp.dtype(args.dtype)
  print(f"backend={jax.default_backend()} devices={jax.device_count()} dtype={dtype.name}")
  print("ms per call: median over rounds [min-max of round medians]")
  for shape_name in args.shapes:
    n, h, w, c, d, ks = SHAPES[shape_name]
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (n, h, w, c), dtype)
    k = jax.random.normal(keys[1], (ks, ks, c, d), dtype)
    g = jax.random.normal(keys[2], (n, h, w, d), dtype)
    gflop = 2 * n * h * w * c * d * ks * ks / 1e9
    fns = {impl: _fns(impl) for impl in args.impls}
    results = {(impl, part): [] for impl in args.impls for part in fns[args.impls[0]]}
    for _ in range(args.rounds):
      for part in ("fwd", "dx", "dk", "vjp"):
        for impl in args.impls:
          fargs = (x, k) if part == "fwd" else (x, k, g)
          results[(impl, part)].append(_time(fns[impl][part], fargs, args.reps) * 1e3)
    print(f"\n{shape_name}: N={n} {h}x{w} {c}->{d} kernel {ks}x{ks}, {gflop:.2f} GFLOP per pass")
    print(f"{'impl':8s}" + "".join(f"{p:>22s}" for p in ("fwd", "dx", "dk", "vjp")))
    for impl in args.impls:
      row = f"{impl:8s}"
      for part in ("fwd", "dx", "dk", "vjp"):
        r = results[(impl, part)]
        row += f"{statistics.median(r):9.1f} [{min(r):5.1f}-{max(r):5.1f}]"
      print(row)


if __name__ == "__main__":
  main()
