"""Tables 1-3 of the paper: our parameter and FLOP counts next to the paper's.

Usage::

  python -m experiments.paper_tables            # all 16 rows
  python -m experiments.paper_tables --table 3  # one table
  python -m experiments.paper_tables --keys     # the rows' keys for configs/paper.py
  python -m experiments.paper_tables --markdown # docs/reproducing.md's table: rows and commands

The rows are those of :data:`rknet_jax.paper.ROWS` (13 RKNets and the three baselines of
Table 2).  Every model is built from its row's spec and counted from its own jaxpr by
:mod:`rknet_jax.counting` (paper conventions: params = trainable parameters, BN running
statistics excluded; FLOPs = 2 x multiply-adds of convolutions and FC layers per image).
Inputs: CIFAR 32x32x3 (Tables 1-2, params counted for 10 classes, as the paper states for
Table 2), ImageNet 224x224x3 with 1000 classes (Table 3).

A row matches when both our params (M) and GFLOPs lie within one unit of the last digit
the paper prints (0.01 for "0.74", 0.1 for "15.3").  The exit status is 1 if any row does
not match, so the script doubles as a check.
"""

import argparse
from collections.abc import Sequence
import dataclasses
import decimal
import sys
import time

from rknet_jax.paper import ROWS, PaperRow

__all__ = ["ROWS", "PaperRow", "Result", "agrees", "measure", "format_results", "main"]


def _unit(printed: str) -> float:
  """One unit of the last printed digit: "0.74" -> 0.01, "15.3" -> 0.1."""
  return float(decimal.Decimal(1).scaleb(decimal.Decimal(printed).as_tuple().exponent))


def agrees(ours: float, printed: str) -> bool:
  """Whether ``ours`` lies within one unit of the last digit of the paper's ``printed``."""
  return abs(ours - float(printed)) <= _unit(printed) * (1 + 1e-9)


@dataclasses.dataclass(frozen=True)
class Result:
  """Our counts for one :class:`PaperRow` and whether they match the paper's."""

  row: PaperRow
  params: int
  flops: float
  seconds: float

  @property
  def params_m(self) -> float:
    return self.params / 1e6

  @property
  def gflops(self) -> float:
    return self.flops / 1e9

  @property
  def params_match(self) -> bool:
    return agrees(self.params_m, self.row.params_m)

  @property
  def gflops_match(self) -> bool:
    return agrees(self.gflops, self.row.gflops)

  @property
  def match(self) -> bool:
    return self.params_match and self.gflops_match


def measure(row: PaperRow) -> Result:
  """Builds the row's model and counts it (``eval_shape`` / ``make_jaxpr`` only).

  Nothing of the model's size is allocated; the time is that of tracing.
  """
  from rknet_jax import counting, registry

  start = time.perf_counter()
  model = registry.create_model(row.spec)
  counts = counting.model_counts(model, (1,) + row.input_shape)
  return Result(row, counts.params, counts.flops, time.perf_counter() - start)


def _fmt_num(value: float, printed: str) -> str:
  digits = max(0, -decimal.Decimal(printed).as_tuple().exponent) + 2
  return f"{value:.{digits}f}"


def format_results(results: Sequence[Result]) -> str:
  """A text table: paper vs ours for params (M) and GFLOPs, and a match column."""
  header = (
    "table",
    "model",
    "GFLOPs paper",
    "GFLOPs ours",
    "params(M) paper",
    "params(M) ours",
    "match",
  )
  body = []
  for r in results:
    body.append(
      (
        str(r.row.table),
        r.row.label,
        r.row.gflops,
        _fmt_num(r.gflops, r.row.gflops) + ("" if r.gflops_match else " !"),
        r.row.params_m,
        _fmt_num(r.params_m, r.row.params_m) + ("" if r.params_match else " !"),
        "yes" if r.match else "NO",
      )
    )
  widths = [
    max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
  ]

  def fmt(cells):
    return "  ".join(
      c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )

  lines = [fmt(header), "-" * len(fmt(header))]
  lines += [fmt(b) for b in body]
  n_ok = sum(r.match for r in results)
  lines.append(
    f"{n_ok}/{len(results)} rows match the paper to its printed precision "
    "(one unit of the last printed digit); '!' marks a value that does not."
  )
  return "\n".join(lines)


def markdown() -> str:
  """docs/reproducing.md's table of the paper's rows: what the paper reports, command per row."""
  lines = [
    "| table | model | data (batch) | paper: params (M), GFLOPs, test error (%) | command |",
    "| --- | --- | --- | --- | --- |",
  ]
  for row in ROWS:
    data = " / ".join(row.datasets) + f" ({row.batch_size})"
    errors = ", ".join(f"{v} {k}" for k, v in row.errors.items())
    lines.append(
      f"| {row.table} | {row.label} | {data} | {row.params_m}, {row.gflops}, "
      f"{errors} | `python -m experiments.main --config=experiments/configs/paper.py:"
      f"{row.key} --workdir=runs/{row.key}` |"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Prints the tables; returns 0 if every row printed matches, else 1."""
  parser = argparse.ArgumentParser(
    prog="python -m experiments.paper_tables",
    description="Our params/GFLOPs next to the paper's Tables 1-3.",
  )
  parser.add_argument(
    "--table",
    type=int,
    choices=(1, 2, 3),
    action="append",
    help="only these tables (repeatable); default all",
  )
  parser.add_argument(
    "--markdown",
    action="store_true",
    help="print docs/reproducing.md's table of rows and commands and exit",
  )
  parser.add_argument(
    "--keys",
    action="store_true",
    help="list the rows' keys (experiments/configs/paper.py:<key>) and exit",
  )
  args = parser.parse_args(argv)
  if args.markdown:
    print(markdown())
    return 0
  if args.keys:
    for row in ROWS:
      print(f"{row.key}  ({', '.join(row.datasets)}, batch {row.batch_size})")
    return 0
  rows = [r for r in ROWS if not args.table or r.table in args.table]
  results = []
  for row in rows:
    results.append(measure(row))
  print(format_results(results))
  print(f"(counted from jaxprs in {sum(r.seconds for r in results):.1f} s)")
  return 0 if all(r.match for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
