"""One-command accelerator check: throughput, compile time, peak device memory and MFU.

  python -m benchmarks.bench_device                  # on one GPU, about 5-8 minutes
  python -m benchmarks.bench_device --smoke          # tiny models, any backend (a test runs it)

Cases, each in float32 and bfloat16 compute, each in its own subprocess
so that the peak device memory belongs to that case alone; each times the runner's own train
or evaluation step (``benchmarks/runner_steps.py``):

* ERKNet-6x1 6x1 6x1-B, k = w = 36, CIFAR 32x32x3: training step at batch 64, inference at
  batch 256;
* ERKNet-3x1 3x1 4x1 2x1-B (Table 3), ImageNet 224x224x3: training and inference at batch 64.

Every case runs with each dense-block formulation of ``--dense`` (the models'
``dense_formulation`` option; default: ``buffer`` and ``loop``: the channel buffer's scans
that ``DenseBlock`` picks on GPU/TPU, and the loop of layers it picks on CPU for shallow
blocks), so the first run on a GPU settles which is faster there; the model column names the
formulation.

Per case: compile time of the jitted step (lowering + XLA), images/s (median over the timed
steps after warm-up), peak device memory (``memory_stats()['peak_bytes_in_use']`` where the
backend reports it), and MFU = model FLOPs per second / the chip's peak (``--peak_tflops``,
default 989.4: the dense bf16 peak of an H100/H200 SXM). Model FLOPs follow the paper's
convention (2 x multiply-adds of convolutions and FC layers, ``rknet_jax.count_flops``); a
training step counts 3x the forward pass (forward + backward), inference 1x.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = (  # name, model kwargs, image shape, mode, batch
  ("ERKNet-6x1 6x1 6x1-B", {"growth_rate": 36, "bottleneck_width": 36}, (32, 32, 3), "train", 64),
  ("ERKNet-6x1 6x1 6x1-B", {"growth_rate": 36, "bottleneck_width": 36}, (32, 32, 3), "infer", 256),
  ("ERKNet-3x1 3x1 4x1 2x1-B", {}, (224, 224, 3), "train", 64),
  ("ERKNet-3x1 3x1 4x1 2x1-B", {}, (224, 224, 3), "infer", 64),
)
SMOKE_CASES = (
  ("ERKNet-1x1 1x1-B", {"growth_rate": 4}, (8, 8, 3), "train", 4),
  ("ERKNet-1x1 1x1-B", {"growth_rate": 4}, (8, 8, 3), "infer", 4),
)
DTYPES = ("float32", "bfloat16")
TRAIN_FLOPS_FACTOR = 3  # forward + backward ~ 3 forward passes


def _worker(case: dict, steps: int, warmup: int) -> dict:
  """Measures one case (the runner's train or eval step) in this process; one record."""
  from benchmarks import runner_steps

  config = runner_steps.model_config(
    case["model"], dtype=case["dtype"], dense_formulation=case.get("dense"), **case["kwargs"]
  )
  return _measure(case, config, steps, warmup)


def _measure(case: dict, config, steps: int, warmup: int) -> dict:
  """Compiles and times ``case``'s step of the model of ``config``."""
  import jax

  from benchmarks import runner_steps
  import rknet_jax

  shape, batch = tuple(case["shape"]), case["batch"]
  built, mesh = runner_steps.build(config, shape)
  flops = float(rknet_jax.count_flops(built.model, shape))
  state = built.init_fn(0)
  data = runner_steps.random_batch(
    shape, batch, built.model.num_classes, mesh, eval_batch=case["mode"] != "train"
  )
  factor = TRAIN_FLOPS_FACTOR if case["mode"] == "train" else 1
  t0 = time.perf_counter()
  _, run = runner_steps.compile_step(built, mesh, case["mode"], state, data)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, out = run(state)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  device = jax.devices()[0]
  memory = device.memory_stats() or {}
  return dict(
    case,
    compile_s=compile_s,
    step_s=step_s,
    images_per_s=batch / step_s,
    model_gflops_per_image=flops / 1e9,
    achieved_tflops=factor * flops * batch / step_s / 1e12,
    peak_bytes=memory.get("peak_bytes_in_use"),
    device=device.device_kind,
    backend=jax.default_backend(),
  )


def _run_case(case: dict, steps: int, warmup: int, timeout: float) -> dict:
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.bench_device",
    "--worker",
    json.dumps(case),
    "--steps",
    str(steps),
    "--warmup",
    str(warmup),
  ]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(case, error=f"timed out after {timeout:.0f} s")
  if proc.returncode != 0:
    return dict(case, error=proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(records, peak_tflops: float) -> str:
  """Markdown table of the records (one row per case)."""
  lines = [
    "| model | input | mode | batch | dtype | compile s | images/s | peak memory GB | MFU % |",
    "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
  ]
  for r in records:
    model = r["model"] + (f" [{r['dense']}]" if r.get("dense", "auto") != "auto" else "")
    head = (
      f"| {model} | {'x'.join(map(str, r['shape']))} | {r['mode']} | {r['batch']} | {r['dtype']} |"
    )
    if "error" in r:
      lines.append(f"{head} {r['error']} | | | |")
      continue
    mem = f"{r['peak_bytes'] / 1e9:.2f}" if r.get("peak_bytes") else "n/a"
    lines.append(
      f"{head} {r['compile_s']:.1f} | {r['images_per_s']:.0f} | {mem} | "
      f"{100 * r['achieved_tflops'] / peak_tflops:.2f} |"
    )
  return "\n".join(lines)


def main(argv=None):
  """Runs every case (or ``--worker`` one) and prints the table."""
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.bench_device", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--smoke", action="store_true", help="tiny models (any backend)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
  parser.add_argument(
    "--dense",
    nargs="+",
    default=None,
    choices=["auto", "buffer", "loop"],
    help="dense-block formulations (default: buffer loop; --smoke: auto)",
  )
  parser.add_argument(
    "--peak_tflops", type=float, default=989.4, help="the chip's dense bf16 peak, for MFU"
  )
  parser.add_argument(
    "--case_timeout",
    type=float,
    default=240.0,
    help="seconds per case before it is reported as timed out",
  )
  parser.add_argument("--json", default="", help="also write the records to this file")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    parser.error(f"--steps must be >= 1 and --warmup >= 0; got {args.steps}, {args.warmup}")
  if args.worker:
    print(json.dumps(_worker(json.loads(args.worker), args.steps, args.warmup)))
    return
  records = []
  dense = args.dense or (["auto"] if args.smoke else ["buffer", "loop"])
  for name, kwargs, shape, mode, batch in SMOKE_CASES if args.smoke else CASES:
    for dtype in args.dtypes:
      for formulation in dense:
        case = {
          "model": name,
          "kwargs": kwargs,
          "shape": list(shape),
          "mode": mode,
          "batch": batch,
          "dtype": dtype,
          "dense": formulation,
        }
        records.append(_run_case(case, args.steps, args.warmup, args.case_timeout))
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
  found = [r for r in records if "device" in r]
  if found:
    print(
      f"device: {found[0]['device']} ({found[0]['backend']}), "
      f"peak {args.peak_tflops:g} TFLOP/s bf16"
    )
  print(table(records, args.peak_tflops))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=2)
  if any("error" in r for r in records):
    sys.exit(1)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
