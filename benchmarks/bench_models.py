"""Throughput, compile time and peak memory of the paper's CIFAR models.

For every selected configuration (model x conv formulation x remat) it measures, each in
a fresh subprocess so that the peak resident set size (RSS) belongs to that one
configuration:

* train: the runner's jitted training step (``benchmarks/runner_steps.py``: forward,
  backward, the paper's SGD of section 4.1 -- Nesterov momentum 0.9, weight decay 1e-4 --,
  the BatchNorm statistics update, the step's metrics; the state donated) at batch 64;
* infer: the runner's jitted evaluation step (eval-mode forward pass, masked loss and top-1 /
  top-5 sums) at batch 256.

Reported per configuration: images/s (batch / median wall-clock step time after
warm-up), CPU s/step (median user+system CPU time of the step, all threads: a proxy for
the work done that a busy machine disturbs less than wall time), compile
time (lowering + XLA compilation of the step, seconds), peak RSS of the subprocess (the
whole process: Python, JAX, compiled code, buffers; what ``/usr/bin/time`` would show),
and XLA's own estimate of the step's temporary buffers.

Timings on a shared machine are noisy.  With ``--rounds R`` every configuration is run
R times, round-robin (so slow phases of the machine hit all configurations alike); the
table shows the median over rounds and the spread (min-max) of the round results, and the
load average at the start and end.  Compare configurations of one run, not across runs.

Examples::

    python -m benchmarks.bench_models                       # ERKNet-6x1 6x1 6x1-B, k=w=36
    python -m benchmarks.bench_models --impls xla dot --rounds 3     # formulation A/B
    python -m benchmarks.bench_models --models table1 --remat both   # all of Table 1
    python -m benchmarks.bench_models --modes train --steps 5 --warmup 2   # quick look

``--impls`` are the formulations of ``rknet_jax.conv`` (``auto`` = ``dot`` on CPU,
``xla`` on GPU/TPU; ``xla`` is a straight port using XLA's native convolutions).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BOTTLENECK_MODEL = "ERKNet-6×1 6×1 6×1-B"
TABLE1 = (
  "ERKNet-6×1 6×1 6×1",
  "ERKNet-7×1 6×1 6×1",
  "ERKNet-7×1 7×1 6×1",
  "ERKNet-7×1 7×1 7×1",
  "IRKNet-3×1 3×1 3×1",
  "IRKNet-4×1 3×1 3×1",
  "IRKNet-4×1 4×1 3×1",
  "IRKNet-4×1 4×1 4×1",
)
GROWTH_RATE = 36
BOTTLENECK_WIDTH = 36

# Reference numbers of the authors' PyTorch code (same network, this 2-core machine type,
# interleaved runs).
PYTORCH_REFERENCE = {"train_img_s": 81.0, "infer_img_s": (127.0, 136.0), "peak_rss_gb": 1.44}


# --------------------------------------------------------------------------------------
# Worker: one configuration, in its own process.
# --------------------------------------------------------------------------------------
def _config(args):
  """The runner's config of the worker's model (k = w = 36 for "-B" names)."""
  from benchmarks import runner_steps

  return runner_steps.model_config(
    args.model,
    growth_rate=GROWTH_RATE,
    bottleneck_width=BOTTLENECK_WIDTH if args.model.endswith("-B") else None,
    remat=args.remat,
    dtype=args.dtype,
    conv_impl=args.impl,
    dense_formulation=args.dense,
  )


def _cpu_seconds():
  """User + system CPU time of this process (all threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _set_malloc(malloc: str):
  """Applies ``--malloc keep`` / ``runner`` inside the worker (``thp`` is an env variable)."""
  if malloc == "keep":
    from benchmarks.cpu_allocator import keep_freed_memory

    if not keep_freed_memory():
      raise RuntimeError("--malloc keep needs glibc's mallopt")
  if malloc == "runner":
    from experiments import compiler_memory

    if not compiler_memory.install():
      raise RuntimeError("--malloc runner needs glibc's malloc_trim")


def _time_steps(run, state, warmup: int, steps: int) -> dict:
  """Runs ``warmup`` + ``steps`` steps; wall and CPU seconds of the timed ones, page faults."""
  import jax
  import numpy as np

  times, cpu_times = [], []
  for i in range(warmup + steps):
    if i == warmup:
      faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0, c0 = time.perf_counter(), _cpu_seconds()
    state, out = run(state)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
      cpu_times.append(_cpu_seconds() - c0)
    if not np.all(np.isfinite(np.asarray(out, np.float32))):
      raise FloatingPointError(f"non-finite output at step {i}")
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
  return {"step_s": times, "cpu_s": cpu_times, "page_faults_per_step": faults / steps}


def _worker(args):
  """Runs one configuration (the runner's train or eval step) and prints one JSON line."""
  import jax
  import numpy as np

  from benchmarks import runner_steps
  from rknet_jax import conv as conv_lib

  _set_malloc(args.malloc)
  shape = (32, 32, 3)
  built, mesh = runner_steps.build(_config(args), shape)
  state = built.init_fn(0)
  batch = runner_steps.random_batch(
    shape, args.batch, built.model.num_classes, mesh, eval_batch=args.mode != "train"
  )
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  t0 = time.perf_counter()
  compiled, run = runner_steps.compile_step(built, mesh, args.mode, state, batch)
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp_bytes = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  timed = _time_steps(run, state, args.warmup, args.steps)
  median = statistics.median(timed["step_s"])
  record = {
    "model": args.model,
    "impl": args.impl,
    "resolved_impl": conv_lib.resolve_impl(args.impl),
    "remat": args.remat,
    "mode": args.mode,
    "batch": args.batch,
    "dtype": args.dtype,
    "params": num_params,
    "compile_s": compile_s,
    "step_s": timed["step_s"],
    "median_step_s": median,
    "img_s": args.batch / median,
    "median_cpu_s": statistics.median(timed["cpu_s"]),
    "malloc": args.malloc,
    "page_faults_per_step": timed["page_faults_per_step"],
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "xla_temp_gb": None if temp_bytes is None else temp_bytes / 2**30,
    "backend": jax.default_backend(),
  }
  print(json.dumps(record))


# --------------------------------------------------------------------------------------
# Driver: round-robin over configurations, one subprocess each, then the table.
# --------------------------------------------------------------------------------------
def _configs(args):
  models = []
  for m in args.models:
    if m == "table1":
      models.extend(TABLE1)
    elif m == "B":
      models.append(BOTTLENECK_MODEL)
    else:
      models.append(m)
  remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
  out = []
  for model in models:
    for mode in args.modes:
      for remat in remats:
        for impl in args.impls:
          for malloc in args.malloc:
            out.append(dict(model=model, mode=mode, remat=remat, impl=impl, malloc=malloc))
  return out


def _run_config(cfg, args):
  batch = args.train_batch if cfg["mode"] == "train" else args.infer_batch
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.bench_models",
    "--worker",
    "--model",
    cfg["model"],
    "--mode",
    cfg["mode"],
    "--impl",
    cfg["impl"],
    "--batch",
    str(batch),
    "--steps",
    str(args.steps),
    "--warmup",
    str(args.warmup),
    "--dtype",
    args.dtype,
    "--malloc_one",
    cfg["malloc"],
    "--dense",
    args.dense,
  ] + (["--remat_on"] if cfg["remat"] else [])
  env = dict(os.environ)
  if cfg["malloc"] in ("thp", "runner"):
    env["GLIBC_TUNABLES"] = ":".join(
      t for t in (env.get("GLIBC_TUNABLES", ""), "glibc.malloc.hugetlb=1") if t
    )
  proc = subprocess.run(
    cmd,
    capture_output=True,
    text=True,
    env=env,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  if proc.returncode != 0:
    sys.stderr.write(proc.stderr[-3000:])
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(values, fmt):
  if not values:
    return "-"
  med = statistics.median(values)
  if len(values) == 1:
    return format(med, fmt)
  return f"{format(med, fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def _driver(args):
  configs = _configs(args)
  print(
    f"{len(configs)} configurations x {args.rounds} round(s); "
    f"train batch {args.train_batch}, inference batch {args.infer_batch}, "
    f"{args.warmup} warm-up + {args.steps} timed steps each, dtype {args.dtype}, "
    f"dense blocks {args.dense}; "
    f"load average at start {os.getloadavg()[0]:.2f}, CPUs {os.cpu_count()}",
    flush=True,
  )
  results = {i: [] for i in range(len(configs))}
  for r in range(args.rounds):
    for i, cfg in enumerate(configs):
      res = _run_config(cfg, args)
      results[i].append(res)
      if args.verbose:
        shown = {k: v for k, v in res.items() if k != "step_s"}
        print(f"  round {r + 1} {cfg}: {json.dumps(shown)}", flush=True)
  print(f"load average at end {os.getloadavg()[0]:.2f}\n")
  print(
    "| model | mode | batch | conv impl | remat | malloc | params | images/s | "
    "step ms | CPU s/step | faults/step | compile s | peak RSS GB | XLA temp GB |"
  )
  print(
    "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  )
  for i, cfg in enumerate(configs):
    ok = [r for r in results[i] if "error" not in r]
    if not ok:
      err = results[i][0]["error"][:60]
      print(
        f"| {cfg['model']} | {cfg['mode']} | | {cfg['impl']} | {cfg['remat']} | "
        f"{cfg['malloc']} | FAILED: {err} | | | | | | | |"
      )
      continue
    r0 = ok[0]
    impl = (
      cfg["impl"]
      if cfg["impl"] == r0["resolved_impl"]
      else (f"{cfg['impl']}->{r0['resolved_impl']}")
    )
    temp = [r["xla_temp_gb"] for r in ok if r["xla_temp_gb"] is not None]
    print(
      f"| {cfg['model']} | {cfg['mode']} | {r0['batch']} | {impl} | "
      f"{'on' if cfg['remat'] else 'off'} | {cfg['malloc']} | "
      f"{r0['params']:,} | "
      f"{_fmt([r['img_s'] for r in ok], '.1f')} | "
      f"{_fmt([r['median_step_s'] * 1e3 for r in ok], '.0f')} | "
      f"{_fmt([r['median_cpu_s'] for r in ok], '.2f')} | "
      f"{_fmt([r['page_faults_per_step'] for r in ok], '.0f')} | "
      f"{_fmt([r['compile_s'] for r in ok], '.1f')} | "
      f"{_fmt([r['peak_rss_gb'] for r in ok], '.2f')} | {_fmt(temp, '.2f')} |"
    )
  ref = PYTORCH_REFERENCE
  print(
    f"\nReference (authors' PyTorch, same network and machine type): train "
    f"{ref['train_img_s']:.0f} images/s at batch 64, peak RSS {ref['peak_rss_gb']} GB; "
    f"inference {ref['infer_img_s'][0]:.0f}-{ref['infer_img_s'][1]:.0f} images/s at "
    f"batch 256.  Targets: train >= 1.0x, inference >= 1.5x, peak RSS <= PyTorch's."
  )
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"configs": configs, "results": results}, f, indent=1)


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__.split("\n\n", 1)[1],
  )
  parser.add_argument(
    "--models",
    nargs="+",
    default=["B"],
    help="model names; 'B' = ERKNet-6×1 6×1 6×1-B (w = k = 36), "
    "'table1' = the eight Table 1 models (k = 36)",
  )
  parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
  parser.add_argument(
    "--impls",
    nargs="+",
    default=["auto"],
    choices=["auto", "xla", "dot1x1", "dot"],
    help="conv formulations (rknet_jax.conv); several = A/B comparison",
  )
  parser.add_argument("--remat", default="both", choices=["off", "on", "both"])
  parser.add_argument(
    "--malloc",
    nargs="+",
    default=["thp"],
    choices=["default", "thp", "runner", "keep"],
    help="glibc malloc of the worker: 'default' = as the process starts; "
    "'thp' = GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge "
    "pages for malloc: 512x fewer page faults); 'runner' = thp and "
    "malloc_trim after every compilation, as the runner does "
    "(experiments/compiler_memory.py); 'keep' = never return "
    "freed memory (benchmarks/cpu_allocator.py: no faults, but the heap "
    "fragments and RSS grows)",
  )
  parser.add_argument(
    "--dense",
    default="auto",
    choices=["auto", "buffer", "loop"],
    help="the models' dense_formulation option: 'auto' = DenseBlock's choice (on "
    "CPU the loop of layers for blocks of at most blocks.LOOP_MAX_LAYERS "
    "layers); 'buffer' = every block on the channel buffer "
    "(rknet_jax/dense_buffer.py); 'loop' = every block as the loop of layers",
  )
  parser.add_argument("--train_batch", type=int, default=64)
  parser.add_argument("--infer_batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
  parser.add_argument(
    "--rounds", type=int, default=1, help="run every configuration this many times, round-robin"
  )
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--json_out", default="", help="also write all raw results here")
  parser.add_argument("--verbose", action="store_true", help="print each run as it ends")
  # worker-only flags
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  parser.add_argument("--mode", help=argparse.SUPPRESS)
  parser.add_argument("--impl", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--remat_on", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--malloc_one", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    args.remat = args.remat_on
    args.malloc = args.malloc_one
    _worker(args)
  else:
    for name, value in (
      ("--steps", args.steps),
      ("--rounds", args.rounds),
      ("--train_batch", args.train_batch),
      ("--infer_batch", args.infer_batch),
    ):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if args.warmup < 0:
      raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    _driver(args)


if __name__ == "__main__":
  main()
