"""Compile time and XLA temporary memory of the training step, from abstract shapes.

Nothing is allocated: parameters come from ``jax.eval_shape`` of ``init`` and the jitted
steps are lowered and compiled from abstract shapes (``jax.ShapeDtypeStruct``), so even the
ImageNet models compile on a small machine.  The steps are the runner's own
(``benchmarks/runner_steps.py``): the train step is forward + backward + the paper's SGD
(Nesterov 0.9, weight decay 1e-4) + BatchNorm statistics + the step's metrics; inference is
the evaluation step.
Every case runs in its own subprocess with a time limit (``--timeout``), so one slow model
cannot stall the table and no compilation cache is shared between cases.

Two tables (the dense-block compile-time and memory work; benchmarks/README.md):

* ``compile``: every ``rknet_jax.list_models()`` model, train step at batch 8 (and inference):
  lower + compile seconds, and the optimised HLO's instruction count.
* ``memory``: DenseNet-BC-{40,64,100}-k12 (6, 10, 16 layers per block), train step at batch
  64: XLA's temporary buffer size and the compile time.

    python -m benchmarks.bench_compile                              # both tables
    python -m benchmarks.bench_compile --tables memory
    python -m benchmarks.bench_compile --conv_impl xla              # the GPU/TPU formulation
    python -m benchmarks.bench_compile --models "DenseNet-BC-250-k24" --batch 8
"""

import argparse
import json
import subprocess
import sys
import time

MEMORY_MODELS = ("DenseNet-BC-40-k12", "DenseNet-BC-64-k12", "DenseNet-BC-100-k12")


def _hlo_instructions(compiled) -> int:
  """Instructions in the optimised HLO module(s) (lines of the text that assign a value)."""
  text = compiled.as_text()
  return sum(1 for line in text.splitlines() if " = " in line and not line.startswith("HloModule"))


def measure(name, batch, conv_impl, infer=True):
  """Compile the runner's train step (and eval step) of ``name`` at ``batch``; a JSON-able
  dict."""
  import jax

  from benchmarks import runner_steps
  import rknet_jax

  config = runner_steps.model_config(name, conv_impl=conv_impl)
  shape = runner_steps.image_shape(config)
  built, mesh = runner_steps.build(config, shape)
  state = jax.eval_shape(lambda: built.init_fn(0))
  t0 = time.perf_counter()
  compiled = built.train_step.lower(state, runner_steps.batch_shapes(shape, batch, mesh)).compile()
  t1 = time.perf_counter()
  mem = compiled.memory_analysis()
  out = {
    "model": name,
    "batch": batch,
    "conv_impl": conv_impl or "auto",
    "params_m": rknet_jax.count_params(built.model, shape) / 1e6,
    "train_compile_s": t1 - t0,
    "train_hlo": _hlo_instructions(compiled),
    "train_temp_gb": (mem.temp_size_in_bytes / 1e9) if mem is not None else None,
  }
  if infer:
    t2 = time.perf_counter()
    eval_batch = runner_steps.batch_shapes(shape, batch, mesh, eval_batch=True)
    built.eval_step.lower(state.model_vars(), eval_batch).compile()
    out["infer_compile_s"] = time.perf_counter() - t2
  return out


def _run_case(name, batch, conv_impl, infer, timeout):
  """``measure`` in a fresh subprocess; {'model':..., 'timeout': s} when it ran too long."""
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.bench_compile",
    "--worker",
    json.dumps({"model": name, "batch": batch, "conv_impl": conv_impl, "infer": infer}),
  ]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"model": name, "batch": batch, "timeout": timeout}
  lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
  if done.returncode != 0 or not lines:
    return {"model": name, "batch": batch, "error": done.stderr.strip().splitlines()[-1:]}
  return json.loads(lines[-1])


def _row(label, result, cells):
  """One Markdown row: ``label``, then ``(key, format)`` cells of ``result``; a case that ran
  out of time or failed gets one cell saying so."""
  if "timeout" in result:
    values = [f"> {result['timeout']:.0f} s, stopped"]
  elif "error" in result:
    values = ["error: " + " ".join(result["error"])]
  else:
    values = ["" if result.get(k) is None else format(result[k], fmt) for k, fmt in cells]
  values += [""] * (len(cells) - len(values))
  return "| " + " | ".join([label] + values) + " |"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--tables", nargs="+", choices=("compile", "memory"), default=["compile", "memory"]
  )
  parser.add_argument(
    "--models",
    nargs="+",
    default=None,
    help="models of the compile table (default: rknet_jax.list_models())",
  )
  parser.add_argument("--batch", type=int, default=8, help="batch of the compile table")
  parser.add_argument("--memory_batch", type=int, default=64)
  parser.add_argument(
    "--conv_impl",
    default=None,
    choices=("auto", "xla", "dot1x1", "dot"),
    help="force a convolution formulation (default: the backend's)",
  )
  parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
  parser.add_argument("--json_out", default=None, help="also write every result here")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    case = json.loads(args.worker)
    print(json.dumps(measure(case["model"], case["batch"], case["conv_impl"], case["infer"])))
    return

  import jax

  import rknet_jax

  results = []
  impl = args.conv_impl or "auto"
  print(f"backend: {jax.default_backend()}, conv_impl {impl}")
  if "compile" in args.tables:
    names = args.models or list(rknet_jax.list_models())
    print(f"\nTrain step (and inference) compile, batch {args.batch}\n")
    print("| model | params (M) | train compile (s) | HLO instructions | inference compile (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    cells = [
      ("params_m", ".2f"),
      ("train_compile_s", ".1f"),
      ("train_hlo", ",d"),
      ("infer_compile_s", ".1f"),
    ]
    for name in names:
      r = _run_case(name, args.batch, args.conv_impl, True, args.timeout)
      results.append(dict(r, table="compile"))
      print(_row(name, r, cells), flush=True)
  if "memory" in args.tables:
    print(f"\nTrain step XLA temp, batch {args.memory_batch}\n")
    print("| model | layers per block | XLA temp (GB) | train compile (s) |")
    print("| --- | ---: | ---: | ---: |")
    for name in MEMORY_MODELS:
      r = _run_case(name, args.memory_batch, args.conv_impl, False, args.timeout)
      results.append(dict(r, table="memory"))
      layers = (int(name.split("-")[2]) - 4) // 6
      print(
        _row(f"{name} | {layers}", r, [("train_temp_gb", ".2f"), ("train_compile_s", ".1f")]),
        flush=True,
      )
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
