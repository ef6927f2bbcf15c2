"""Per-period parameter and FLOP table of a model built by name.

Usage::

  python -m rknet_jax.summary "ERKNet-7x1 6x1 6x1" --growth_rate 36
  python -m rknet_jax.summary "IRKNet-5x1 5x1 5x1-AB" --growth_rate 150 --num_classes 100
  python -m rknet_jax.summary "ERKNet-3x1 3x1 3x1 1x1-B" --stem imagenet --num_classes 1000

One row per top-level submodule of the model (preprocessor/stem, each period, each
transition, postprocessor, classifier), in execution order, then the totals.  Counts follow
the paper's conventions (section 4, Tables 1-3), measured from the model's own jaxpr by
:mod:`rknet_jax.counting`: params = trainable parameters (BN running statistics
excluded); FLOPs = 2 x multiply-adds of convolutions and dense layers per image.
"""

import argparse
from collections.abc import Sequence
import re
import sys

from rknet_jax import checks, counting


def _growth_rate(text: str):
  try:
    values = [int(v) for v in text.replace(" ", "").split(",") if v]
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"--growth_rate must be an int or comma-separated ints (one per period); got {text!r}"
    ) from None
  if not values:
    raise argparse.ArgumentTypeError(f"--growth_rate is empty: {text!r}")
  return values[0] if len(values) == 1 else tuple(values)


def _positive_int(text: str) -> int:
  try:
    return checks.check_int("summary", "value", int(text))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive int; got {text!r}") from None


def default_image_size(model) -> int:
  """224 for models with the ImageNet preprocessor, 32 (CIFAR/SVHN) otherwise."""
  return 224 if getattr(model, "stem", None) == "imagenet" else 32


_STEP = re.compile(r"^(period\d+)_step(\d+)$")


def rows(counts: counting.Counts, group_steps: bool = True):
  """``(label, params, flops)`` per top-level submodule, in execution order.

  With ``group_steps`` the time-steps ``period<p>_step<t>`` of rknet_jax.models (each a
  top-level submodule, with its own parameters) are summed into one ``period<p>`` row,
  labelled with its number of time-steps r.
  """
  out, index = [], {}
  for name in counts.modules:
    p = counts.params_by_module.get(name, 0)
    f = counts.flops_by_module.get(name, 0)
    match = _STEP.match(name) if group_steps else None
    if match is None:
      out.append([name or "(root)", p, f, None])
      continue
    period = match.group(1)
    if period not in index:
      index[period] = len(out)
      out.append([period, 0, 0, 0])
    row = out[index[period]]
    row[1] += p
    row[2] += f
    row[3] += 1
  return [(label if n is None else f"{label} (r={n})", p, f) for label, p, f, n in out]


def format_table(title: str, counts: counting.Counts, group_steps: bool = True) -> str:
  """The per-period table of ``counts`` (see :class:`rknet_jax.counting.Counts`)."""
  table = rows(counts, group_steps)
  width = max([len("module"), len("total")] + [len(r[0]) for r in table])
  lines = [
    title,
    f"input {'x'.join(map(str, counts.input_shape[1:]))} (NHWC, per image); "
    "params: trainable (BN running stats excluded); "
    "FLOPs: 2 x multiply-adds of convs and FCs",
    f"{'module':<{width}}  {'params':>13}  {'params (M)':>10}  {'GFLOPs':>9}",
  ]
  rule = "-" * len(lines[-1])
  lines.append(rule)
  for name, p, f in table:
    lines.append(f"{name:<{width}}  {p:>13,}  {p / 1e6:>10.4f}  {f / 1e9:>9.4f}")
  lines.append(rule)
  lines.append(
    f"{'total':<{width}}  {counts.params:>13,}  {counts.params / 1e6:>10.4f}  "
    f"{counts.flops / 1e9:>9.4f}"
  )
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m rknet_jax.summary",
    description="Per-period params / GFLOPs table of a model built by "
    "rknet_jax.create_model (paper conventions, measured from its jaxpr).",
  )
  parser.add_argument(
    "name", help="model name, e.g. 'ERKNet-7x1 6x1 6x1' or one of rknet_jax.list_models()"
  )
  parser.add_argument(
    "--growth_rate",
    type=_growth_rate,
    default=None,
    help="k: one int, or comma-separated ints, one per period",
  )
  parser.add_argument("--num_classes", type=_positive_int, default=None)
  parser.add_argument(
    "--stem", choices=checks.STEMS, default=None, help="preprocessor (default: the model's)"
  )
  parser.add_argument("--bottleneck_width", type=_positive_int, default=None)
  parser.add_argument(
    "--image_size",
    type=_positive_int,
    default=None,
    help="square input side (default 224 for the ImageNet stem, else 32)",
  )
  parser.add_argument(
    "--channels", type=_positive_int, default=3, help="input channels (default 3)"
  )
  parser.add_argument(
    "--steps", action="store_true", help="one row per time-step instead of per period"
  )
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  args = build_parser().parse_args(argv)
  from rknet_jax import registry

  kwargs = {
    k: getattr(args, k)
    for k in ("growth_rate", "num_classes", "stem", "bottleneck_width")
    if getattr(args, k) is not None
  }
  try:
    model = registry.create_model(args.name, **kwargs)
  except (ValueError, TypeError) as e:
    print(f"error: cannot build {args.name!r}: {e}", file=sys.stderr)
    return 2
  size = args.image_size or default_image_size(model)
  counts = counting.model_counts(model, (1, size, size, args.channels))
  title = f"{args.name}  ({type(model).__name__}, {getattr(model, 'num_classes', '?')} classes)"
  print(format_table(title, counts, group_steps=not args.steps))
  return 0


if __name__ == "__main__":
  sys.exit(main())
