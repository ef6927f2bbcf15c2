"""Ahead-of-time check of the runner's steps on a TPU slice this machine does not have.

  python -m benchmarks.bench_aot --topology=v5e:4x4 --models=table1 --dtype=float32,bfloat16
  python -m benchmarks.bench_aot --topology=v5e:4x4 --num_slices=2 \
      --models="ERKNet-3×1 3×1 6×1 2×1-B"
  python -m benchmarks.bench_aot --topology=v5e:4x4 --models=table2 --formulation=buffer,loop

``jax.experimental.topologies.get_topology_desc`` gives compile-only devices of a TPU
topology (``libtpu`` installed, run with ``JAX_PLATFORMS=cpu``); the runner's own train and
eval steps (``benchmarks/runner_steps.py``: ``experiments/steps.py``'s ``make_init_fn``,
``make_train_step``, ``make_eval_step``, the optimiser of ``experiments/optim.py``, the model of
``experiments/run_config.py``) are lowered on a mesh of them (``steps.make_mesh``) at a
paper row's batch and image size (``experiments/configs/paper.py``) and compiled by the real
TPU compiler.  Per case it reports: compile time; per-chip HBM (arguments, temporaries,
outputs) against the chip's capacity; XLA's FLOPs per chip and step (``cost_analysis``,
which counts a while-loop body ONCE: the dense blocks' scans make it an undercount) beside
the paper-convention model FLOPs (3 x forward per training image); the collectives (kind,
count, bytes, how many inside while loops, any on u32 data; on several slices the sends to
the other slice, ``dcn-send``, and the all-gathers of their results, "after DCN"); and a
roofline lower bound on
the step time, max(FLOPs / peak, bytes accessed / HBM bandwidth), with the images/s it
allows.  The model's options are the row's (``conv_impl="auto"`` resolves from the mesh's
TPU devices to XLA's native convolutions, ``steps.model_for_mesh``); ``--formulation`` picks
the dense blocks' buffer scans or the loop of layers.
"""

import argparse
from collections.abc import Sequence
import copy
import dataclasses
import json
import math
import os
import re
import sys
import time

CHIPS = {  # name: (dense bf16 peak TFLOP/s, HBM GB/s, HBM GiB per chip)
  "v4": (275.0, 1228.0, 32.0),
  "v5e": (197.0, 819.0, 16.0),
  "v5p": (459.0, 2765.0, 95.0),
  "v6e": (918.0, 1640.0, 32.0),
}
"""Public per-chip specs (source: Google Cloud TPU documentation, system architecture pages).
f32 matmuls/convolutions run on the bf16 MXUs at JAX's default precision, so the bf16 peak
bounds both dtypes."""

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
GROUPS = {"table1": (1,), "table2": (2,), "table3": (3,), "all": (1, 2, 3)}
TRAIN_SIZES = {"cifar10": 45000, "cifar100": 45000, "imagenet2012": 1281167}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}
FORMULATIONS = ("buffer", "loop")
_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}


# ------------------------------------------------------------------ HLO collectives
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_CALLEE = re.compile(
  r"(?:body|condition|calls|to_apply|branch_computations)=\{?([^}\s,]+"
  r"(?:,\s*%[\w.\-]+)*)"
)
_COLLECTIVE = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_DCN_SEND = re.compile(r"= (\(.+?\)) send\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(([^)]*)\)")
_DCN_DEPTH = 8
"""Ops walked back from a collective's operands looking for a cross-slice transfer."""


@dataclasses.dataclass
class Collective:
  """One collective op of a compiled HLO module."""

  kind: str
  bytes: int
  dtypes: tuple
  in_loop: bool
  name: str
  dims: tuple = ()
  after_dcn: bool = False
  """Its operand is, a few ops up (``_DCN_DEPTH``), the result of a transfer between slices
  over the data-centre network (a ``recv-done`` of the megascale runtime): on several
  slices XLA:TPU splits a cross-slice all-reduce into a reduction within the slice, an
  exchange of 1/n of it per chip between slices and an all-gather of the n pieces within
  the slice; this marks that all-gather."""


def _instructions(hlo_text: str) -> dict:
  """name -> (opcode, operand names, whether it receives data from another slice)."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      operands = tuple(re.findall(r"%([\w.\-]+)", m.group(3)))
      out[m.group(1)] = (m.group(2), operands, "xla_megascale" in line)
  return out


def _after_dcn(instructions: dict, name: str) -> bool:
  """Whether an operand of ``name`` is a cross-slice ``recv-done``'s result moved by at most
  ``_DCN_DEPTH`` single-operand ops (tuple element, bitcast, copy, slice: no arithmetic
  that mixes it with other values)."""
  stack = [(o, 1) for o in instructions.get(name, ("", ()))[1]]
  while stack:
    n, depth = stack.pop()
    opcode, operands, megascale = instructions.get(n, ("", (), False))
    if opcode == "recv-done" and megascale:
      return True
    if depth < _DCN_DEPTH and len(operands) == 1:
      stack.append((operands[0], depth + 1))
  return False


def _collective_of_line(line: str, instructions: dict) -> Collective | None:
  """The collective (or cross-slice send, kind ``"dcn-send"``) an HLO line defines."""
  m = _COLLECTIVE.search(line)
  if m:
    result, kind, largest = m.group(1), m.group(2), bool(m.group(3)) and m.group(2) != "all-reduce"
  elif "xla_megascale" in line and _DCN_SEND.search(line):  # (data, u32[], token[])
    result, kind, largest = _DCN_SEND.search(line).group(1).split(", ")[0], "dcn-send", True
  else:
    return None
  shapes = [
    (t, math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[t])
    for t, dims in _SHAPE.findall(result)
  ]
  size = max(s for _, s in shapes) if largest else sum(s for _, s in shapes)
  name = line.split("=")[0].strip().lstrip("%")
  dims = tuple(int(d) for _, ds in _SHAPE.findall(result) for d in ds.split(",") if d)
  dtypes = tuple(sorted({t for t, _ in shapes}))
  return Collective(kind, size, dtypes, False, name, dims, _after_dcn(instructions, name))


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of a compiled (post-optimisation) HLO module's text, and every send
  to another slice over the data-centre network (kind ``"dcn-send"``: the array this chip
  sends, in its padded layout): its kind, the
  bytes of its result (async ``-start`` ops: the largest array of the result tuple), its
  element types, whether it sits in a while loop's body (any depth of calls), the
  dimensions of its result's arrays (all concatenated) and whether it follows a transfer
  between slices (``Collective.after_dcn``)."""
  instructions = _instructions(hlo_text)
  comp_of_op, callees, current = [], {}, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      callees.setdefault(current, set())
      continue
    if current is None:
      continue
    for body in re.findall(r"body=%?([\w.\-]+)", line):
      callees[current].add(("loop", body))
    for group in _CALLEE.findall(line):
      for name in re.findall(r"%?([\w.\-]+)", group):
        callees[current].add(("call", name))
    op = _collective_of_line(line, instructions)
    if op is not None:
      comp_of_op.append((current, op))
  in_loop, stack = set(), [b for c in callees.values() for k, b in c if k == "loop"]
  while stack:
    c = stack.pop()
    if c in in_loop:
      continue
    in_loop.add(c)
    stack.extend(b for _, b in callees.get(c, ()))
  return [dataclasses.replace(op, in_loop=comp in in_loop) for comp, op in comp_of_op]


def collective_summary(ops: Sequence[Collective]) -> dict[str, dict]:
  """Per kind: count, of which in loops, bytes (all; of those in loops, counted once per
  loop body), the count on u32 data and the count after a cross-slice transfer."""
  out = {}
  for op in ops:
    s = out.setdefault(
      op.kind,
      {"count": 0, "in_loop": 0, "bytes": 0, "in_loop_bytes": 0, "u32": 0, "after_dcn": 0},
    )
    s["count"] += 1
    s["in_loop"] += op.in_loop
    s["bytes"] += op.bytes
    s["in_loop_bytes"] += op.bytes if op.in_loop else 0
    s["u32"] += "u32" in op.dtypes
    s["after_dcn"] += op.after_dcn
  return out


# ------------------------------------------------------------------ one compile
def topology_devices(topology: str, num_slices: int = 1):
  """Compile-only devices of a TPU topology (``"v5e:4x4"``), ``num_slices`` slices."""
  from jax.experimental import topologies

  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  return topologies.get_topology_desc(topology, "tpu", **kwargs).devices


def chip_specs(topology: str):
  """(peak TFLOP/s, HBM GB/s, HBM GiB) of the topology's chip (``"v5e:4x4"`` -> v5e)."""
  return CHIPS[topology.split(":")[0]]


def row_config(row, dtype: str, batch: int = 0):
  """The runner's config of a paper row (its first dataset) at ``dtype`` [and ``batch``]."""
  from experiments.configs import paper as paper_configs

  config = paper_configs.get_config(row.key)
  config.dtype = dtype
  if batch:
    config.batch_size = batch
    config.eval_batch_size = batch
  return config


def compile_steps(
  config,
  input_shape,
  mesh,
  formulation: str = "buffer",
  which: Sequence[str] = ("train", "eval"),
  compiler_options: dict | None = None,
) -> dict:
  """Lowers and compiles the runner's train and/or eval step for ``mesh``, its dense blocks as
  ``formulation`` (the model option ``dense_formulation``: ``"buffer"``, ``"loop"`` or
  ``"auto"``), with the XLA ``compiler_options`` (e.g.
  ``{"xla_tpu_split_local_ar_for_dcn_ar_threshold": 2**40}``); per step: the compiled
  executable and its compile time (lowering included)."""
  import jax

  from benchmarks import runner_steps

  config = copy.deepcopy(config)
  config.model_kwargs.dense_formulation = formulation
  steps_per_epoch = max(TRAIN_SIZES[config.dataset] // config.batch_size, 1)
  built, _ = runner_steps.build(
    config,
    input_shape,
    num_classes=NUM_CLASSES[config.dataset],
    mesh=mesh,
    steps_per_epoch=steps_per_epoch,
    total_steps=int(config.num_epochs * steps_per_epoch),
  )
  state = jax.eval_shape(lambda: built.init_fn(0))
  out = {}
  for step in which:
    b = config.batch_size if step == "train" else config.eval_batch_size
    batch = runner_steps.batch_shapes(input_shape, b, mesh, eval_batch=step != "train")
    t0 = time.perf_counter()
    if step == "train":
      lowered = built.train_step.lower(state, batch)
    else:
      lowered = built.eval_step.lower(state.model_vars(), batch)
    compiled = lowered.compile(compiler_options)
    out[step] = {"compiled": compiled, "compile_s": time.perf_counter() - t0, "batch": b}
  return out


def analyse(compiled, chips: int, batch: int, chip, model_flops: float) -> dict:
  """The numbers of one compiled step (per chip): memory, FLOPs, collectives, roofline.

  ``model_flops``: the paper-convention FLOPs of the whole global batch's step."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ops = collectives(compiled.as_text())
  peak_tflops, hbm_gbs, hbm_gib = chip
  xla_flops = float(cost.get("flops", 0.0))
  bytes_accessed = float(cost.get("bytes accessed", 0.0))
  flops = max(xla_flops, model_flops / chips)
  step_s = max(flops / (peak_tflops * 1e12), bytes_accessed / (hbm_gbs * 1e9))
  args_b, temp_b, out_b = (
    mem.argument_size_in_bytes,
    mem.temp_size_in_bytes,
    mem.output_size_in_bytes,
  )
  alias_b = getattr(mem, "alias_size_in_bytes", 0)
  total = args_b + temp_b + out_b - alias_b
  return {
    "args_gib": args_b / 2**30,
    "temp_gib": temp_b / 2**30,
    "out_gib": out_b / 2**30,
    "hbm_gib": total / 2**30,
    "hbm_fraction": total / (hbm_gib * 2**30),
    "xla_gflops": xla_flops / 1e9,
    "model_gflops": model_flops / chips / 1e9,
    "gbytes_accessed": bytes_accessed / 1e9,
    "collectives": collective_summary(ops),
    "roofline_ms": 1e3 * step_s,
    "roofline_images_per_s": batch / step_s,
  }


def _collectives_cell(summary: dict) -> str:
  if not summary:
    return "none"
  parts = []
  for kind, s in sorted(summary.items()):
    u32 = f", {s['u32']} u32" if s["u32"] else ""
    u32 += f", {s['after_dcn']} after DCN" if s.get("after_dcn") else ""
    parts.append(
      f"{kind} {s['count']} ({s['in_loop']} in loops{u32}; "
      f"{s['bytes'] / 2**20:.2f} MiB, in loops {s.get('in_loop_bytes', 0) / 2**20:.3f})"
    )
  return "; ".join(parts)


def table(records) -> str:
  """Markdown table of the records (one line per model x dtype x formulation x step)."""
  lines = [
    "| model | dtype | dense | step | batch | compile s | HBM GiB/chip (args + temp + "
    "out) | % HBM | XLA GFLOP/chip (loops once) | model GFLOP/chip | collectives | "
    "roofline ms | roofline img/s |",
    "| --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |",
  ]
  for r in records:
    head = f"| {r['model']} | {r['dtype']} | {r['formulation']} | {r['step']} | {r['batch']} |"
    if "error" in r:
      lines.append(f"{head} {r['error']} | | | | | | | |")
      continue
    lines.append(
      f"{head} {r['compile_s']:.0f} | {r['hbm_gib']:.3f} ({r['args_gib']:.3f} + "
      f"{r['temp_gib']:.3f} + {r['out_gib']:.3f}) | {100 * r['hbm_fraction']:.1f} | "
      f"{r['xla_gflops']:.1f} | {r['model_gflops']:.1f} | "
      f"{_collectives_cell(r['collectives'])} | {r['roofline_ms']:.2f} | "
      f"{r['roofline_images_per_s']:.0f} |"
    )
  return "\n".join(lines)


def select_rows(models: str):
  """Paper rows named by ``--models``: ``table1``/``table2``/``table3``/``all`` or names
  and keys separated by commas."""
  from rknet_jax import paper

  out = []
  for item in [m.strip() for m in models.split(",") if m.strip()]:
    if item in GROUPS:
      out += [r for r in paper.ROWS if r.table in GROUPS[item]]
      continue
    norm = item.replace("x", "×")
    found = [r for r in paper.ROWS if item in (r.key, r.name) or r.name == norm]
    if not found:
      raise ValueError(
        f"--models: {item!r} is neither table1/table2/table3/all nor a paper "
        "row (python -m experiments.paper_tables --keys lists them)"
      )
    out += found
  return out


def run(args) -> list:
  """Every case of ``args``; one record per compiled step."""
  from experiments import steps as steps_lib
  import rknet_jax

  devices = topology_devices(args.topology, args.num_slices)
  mesh = steps_lib.make_mesh(devices)
  chips, chip = len(devices), chip_specs(args.topology)
  records = []
  for row in args.rows:
    for dtype in args.dtypes:
      config = row_config(row, dtype, args.batch)
      flops_per_image = float(
        rknet_jax.count_flops(rknet_jax.create_model(row.name), row.input_shape)
      )
      for formulation in args.formulations:
        base = {
          "model": row.name,
          "dtype": dtype,
          "formulation": formulation,
          "topology": args.topology,
          "num_slices": args.num_slices,
          "chips": chips,
          "xla_options": args.xla_options,
        }
        try:
          compiled = compile_steps(
            config, row.input_shape, mesh, formulation, args.steps, args.xla_options
          )
        except Exception as e:  # one failing cell
          records += [
            dict(base, step=s, batch=0, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            for s in args.steps
          ]
          print(json.dumps(records[-1]), file=sys.stderr, flush=True)
          continue
        for step, c in compiled.items():
          factor = 3 if step == "train" else 1
          rec = dict(
            base,
            step=step,
            batch=c["batch"],
            compile_s=c["compile_s"],
            **analyse(
              c["compiled"], chips, c["batch"], chip, factor * flops_per_image * c["batch"]
            ),
          )
          records.append(rec)
          print(json.dumps(rec), file=sys.stderr, flush=True)
  return records


def _parse(argv):
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.bench_aot", description=__doc__.split("\n\n", maxsplit=1)[0]
  )
  parser.add_argument(
    "--topology",
    default="v5e:4x4",
    help=f"TPU topology '<chip>:<shape>', chip one of {sorted(CHIPS)}",
  )
  parser.add_argument("--num_slices", type=int, default=1, help="slices (over DCN)")
  parser.add_argument(
    "--models",
    default="table1",
    help="table1|table2|table3|all or paper row names/keys, comma-separated",
  )
  parser.add_argument("--dtype", default="float32", help="float32,bfloat16 (comma-separated)")
  parser.add_argument(
    "--formulation", default="buffer", help="dense blocks: buffer,loop (comma-separated)"
  )
  parser.add_argument("--steps", default="train,eval", help="train,eval (comma-separated)")
  parser.add_argument(
    "--batch", type=int, default=0, help="global batch (default: the row's paper batch)"
  )
  parser.add_argument(
    "--xla_option",
    action="append",
    default=[],
    help="NAME=VALUE, an XLA/TPU compiler option for every compile (repeatable)",
  )
  parser.add_argument("--json", default="", help="also write the records to this file")
  args = parser.parse_args(argv)
  args.xla_options = {}
  for item in args.xla_option:
    name, sep, value = item.partition("=")
    if not sep or not name:
      parser.error(f"--xla_option={item!r}: expected NAME=VALUE")
    args.xla_options[name] = int(value) if re.fullmatch(r"-?\d+", value) else value
  chip = args.topology.split(":")[0]
  if chip not in CHIPS or ":" not in args.topology:
    parser.error(
      f"--topology={args.topology!r}: expected '<chip>:<shape>' with chip one of "
      f"{sorted(CHIPS)}, e.g. v5e:4x4"
    )
  if args.num_slices < 1:
    parser.error(f"--num_slices={args.num_slices}: must be >= 1")
  args.dtypes = args.dtype.split(",")
  args.formulations = args.formulation.split(",")
  args.steps = args.steps.split(",")
  for name, values, allowed in (
    ("--dtype", args.dtypes, ("float32", "bfloat16")),
    ("--formulation", args.formulations, FORMULATIONS),
    ("--steps", args.steps, ("train", "eval")),
  ):
    bad = [v for v in values if v not in allowed]
    if bad:
      parser.error(f"{name}: {bad[0]!r} is not one of {', '.join(allowed)}")
  if args.batch < 0:
    parser.error(f"--batch={args.batch}: must be >= 0 (0: the row's paper batch)")
  try:
    args.rows = select_rows(args.models)
  except ValueError as e:
    parser.error(str(e))
  return args


def _check_xla_options(devices, options: dict) -> None:
  """Exits with one line if the TPU compiler rejects ``options`` (a trivial compile)."""
  if not options:
    return
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from experiments import steps as steps_lib

  replicated = NamedSharding(steps_lib.make_mesh(devices), P())
  try:
    jax.jit(lambda x: x + 1, in_shardings=replicated, out_shardings=replicated).lower(
      jax.ShapeDtypeStruct((8,), jnp.float32)
    ).compile(options)
  except Exception as e:  # the compiler's own message says which option
    sys.exit(
      f"bench_aot: --xla_option {options}: rejected by the compiler: {str(e).splitlines()[0]}"
    )


def main(argv=None):
  """Parses the flags, checks batch divisibility, compiles every case, prints the table."""
  args = _parse(argv)
  devices = topology_devices(args.topology, args.num_slices)
  for row in args.rows:
    config = row_config(row, "float32", args.batch)
    for b in (config.batch_size, config.eval_batch_size):
      if b % len(devices):
        sys.exit(
          f"bench_aot: global batch {b} of {row.name} does not divide over the "
          f"{len(devices)} chips of {args.num_slices} x {args.topology}; pass --batch "
          "with a multiple of the chip count"
        )
  _check_xla_options(devices, args.xla_options)
  t0 = time.time()
  records = run(args)
  peak, bw, cap = chip_specs(args.topology)
  print(
    f"{args.num_slices} x {args.topology} ({len(devices)} chips; {peak:g} TFLOP/s bf16, "
    f"{bw:g} GB/s, {cap:g} GiB HBM per chip); {time.strftime('%Y-%m-%d')}; "
    f"{time.time() - t0:.0f} s"
  )
  print(table(records))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=2)
  if any("error" in r for r in records):
    sys.exit(1)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
