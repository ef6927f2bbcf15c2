"""Tables 1-3 of the paper: our parameter and FLOP counts next to the paper's.

Usage::

  python -m experiments.paper_tables            # all 16 rows
  python -m experiments.paper_tables --table 3  # one table

The 16 rows are the 13 RKNet rows (the ready-made models of ``rknet_jax.list_models()``)
and the three baselines of Table 2 (DenseNet-BC, two CliqueNets).  Every model is built
with :func:`rknet_jax.create_model` and counted from its own jaxpr by
:mod:`rknet_jax.counting` (paper conventions: params = trainable parameters, BN running
statistics excluded; FLOPs = 2 x multiply-adds of convolutions and FC layers per image).
Inputs: CIFAR 32x32x3 (Tables 1-2, params counted for 10 classes, as the paper states for
Table 2), ImageNet 224x224x3 with 1000 classes (Table 3).  The paper's values are those of
``shared/paper/ARCHITECTURE.md`` (the paper's tables, cleaned up).

A row matches when both our params (M) and GFLOPs lie within one unit of the last digit
the paper prints (0.01 for "0.74", 0.1 for "15.3").  The exit status is 1 if any row does
not match, so the script doubles as a check.
"""

import argparse
import dataclasses
import decimal
import sys
import time
from typing import Any, Mapping, Sequence

CIFAR_SHAPE = (1, 32, 32, 3)
IMAGENET_SHAPE = (1, 224, 224, 3)


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One row of the paper's Tables 1-3.

  Attributes:
    table: 1, 2 or 3.
    label: the model as the paper's table names it.
    name: the name given to ``rknet_jax.create_model``.
    kwargs: the other ``create_model`` arguments (growth rate, classes, ...).
    input_shape: NHWC shape counted (batch 1).
    gflops: the paper's GFLOPs, as printed (a string, so its precision is kept).
    params_m: the paper's parameters in millions, as printed.
  """
  table: int
  label: str
  name: str
  kwargs: Mapping[str, Any]
  input_shape: tuple
  gflops: str
  params_m: str


def _row(table, label, name, input_shape, num_classes, gflops, params):
  return PaperRow(table, label, name, {"num_classes": num_classes}, input_shape, gflops,
                  params)


# Names are those of rknet_jax.list_models(): each ready-made model carries the table's
# hyper-parameters (k, m_n, bottleneck width, stem, multiscale); the class count is
# passed explicitly, as the tables count it.
ROWS = (
    # Table 1: CIFAR-10, k = 36, m = 1, multiscale.
    _row(1, "ERKNet-6×1 6×1 6×1", "ERKNet-6×1 6×1 6×1", CIFAR_SHAPE, 10, "0.66", "0.74"),
    _row(1, "ERKNet-7×1 6×1 6×1", "ERKNet-7×1 6×1 6×1", CIFAR_SHAPE, 10, "0.83", "0.83"),
    _row(1, "ERKNet-7×1 7×1 6×1", "ERKNet-7×1 7×1 6×1", CIFAR_SHAPE, 10, "0.87", "0.91"),
    _row(1, "ERKNet-7×1 7×1 7×1", "ERKNet-7×1 7×1 7×1", CIFAR_SHAPE, 10, "0.88", "0.99"),
    _row(1, "IRKNet-3×1 3×1 3×1", "IRKNet-3×1 3×1 3×1", CIFAR_SHAPE, 10, "0.38", "0.32"),
    _row(1, "IRKNet-4×1 3×1 3×1", "IRKNet-4×1 3×1 3×1", CIFAR_SHAPE, 10, "0.62", "0.40"),
    _row(1, "IRKNet-4×1 4×1 3×1", "IRKNet-4×1 4×1 3×1", CIFAR_SHAPE, 10, "0.68", "0.49"),
    _row(1, "IRKNet-4×1 4×1 4×1", "IRKNet-4×1 4×1 4×1", CIFAR_SHAPE, 10, "0.69", "0.57"),
    # Table 2: CIFAR, multiscale, params counted for 10 classes.
    _row(2, "DenseNet-BC (depth 250), k=24", "DenseNet-BC-250-k24", CIFAR_SHAPE, 10,
         "10.83", "15.3"),
    _row(2, "CliqueNet (T=18), k=80", "CliqueNet-T18-k80", CIFAR_SHAPE, 10, "9.45",
         "10.14"),
    _row(2, "CliqueNet-ABC (T=30), k=150", "CliqueNet-ABC-T30-k150", CIFAR_SHAPE, 10,
         "10.56", "10.48"),
    _row(2, "IRKNet-5×1 5×1 5×1-AB, k=150", "IRKNet-5×1 5×1 5×1-AB-k150", CIFAR_SHAPE, 10,
         "7.62", "4.87"),
    _row(2, "IRKNet-5×1 5×1 5×1-AB, k=180", "IRKNet-5×1 5×1 5×1-AB-k180", CIFAR_SHAPE, 10,
         "10.98", "6.99"),
    # Table 3: ImageNet, k = 32, m_0..m_2 = 2, 4, 8, bottleneck width 4k, last period only.
    _row(3, "ERKNet-3×1 3×1 3×1 1×1-B, m_3=16", "ERKNet-3×1 3×1 3×1 1×1-B", IMAGENET_SHAPE,
         1000, "5.20", "6.95"),
    _row(3, "ERKNet-3×1 3×1 4×1 2×1-B, m_3=20", "ERKNet-3×1 3×1 4×1 2×1-B", IMAGENET_SHAPE,
         1000, "6.35", "14.49"),
    _row(3, "ERKNet-3×1 3×1 6×1 2×1-B, m_3=28", "ERKNet-3×1 3×1 6×1 2×1-B", IMAGENET_SHAPE,
         1000, "8.50", "25.51"),
)


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
  from rknet_jax import counting, registry  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  model = registry.create_model(row.name, **row.kwargs)
  counts = counting.model_counts(model, row.input_shape)
  return Result(row, counts.params, counts.flops, time.perf_counter() - start)


def _fmt_num(value: float, printed: str) -> str:
  digits = max(0, -decimal.Decimal(printed).as_tuple().exponent) + 2
  return f"{value:.{digits}f}"


def format_results(results: Sequence[Result]) -> str:
  """A text table: paper vs ours for params (M) and GFLOPs, and a match column."""
  header = ("table", "model", "GFLOPs paper", "GFLOPs ours", "params(M) paper",
            "params(M) ours", "match")
  body = []
  for r in results:
    body.append((str(r.row.table), r.row.label, r.row.gflops,
                 _fmt_num(r.gflops, r.row.gflops) + ("" if r.gflops_match else " !"),
                 r.row.params_m,
                 _fmt_num(r.params_m, r.row.params_m) + ("" if r.params_match else " !"),
                 "yes" if r.match else "NO"))
  widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
            for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(
      c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  lines = [fmt(header), "-" * len(fmt(header))]
  lines += [fmt(b) for b in body]
  n_ok = sum(r.match for r in results)
  lines.append(f"{n_ok}/{len(results)} rows match the paper to its printed precision "
               "(one unit of the last printed digit); '!' marks a value that does not.")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Prints the tables; returns 0 if every row printed matches, else 1."""
  parser = argparse.ArgumentParser(
      prog="python -m experiments.paper_tables",
      description="Our params/GFLOPs next to the paper's Tables 1-3.")
  parser.add_argument("--table", type=int, choices=(1, 2, 3), action="append",
                      help="only these tables (repeatable); default all")
  args = parser.parse_args(argv)
  rows = [r for r in ROWS if not args.table or r.table in args.table]
  results = []
  for row in rows:
    results.append(measure(row))
  print(format_results(results))
  print(f"(counted from jaxprs in {sum(r.seconds for r in results):.1f} s)")
  return 0 if all(r.match for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
