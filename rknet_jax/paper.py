"""The rows of the paper's Tables 1-3: one entry per row, read by everything else.

Each :class:`PaperRow` holds the model (a ready-made name plus the spec fields the table
gives it), the datasets and batch size it was trained with, and the values the paper
prints (GFLOPs, parameters, test errors; ``docs/reproducing.md`` lists the rows with
their commands).  :func:`rknet_jax.list_models` lists the rows' names, ``create_model(row.name)``
builds the row's model, ``experiments/configs/paper.py:<row.key>`` trains it,
``python -m experiments.paper_tables`` counts it against the printed values, and the tests read the
same rows.  Adding a row is adding one entry to :data:`ROWS`.
"""

from collections.abc import Mapping
import dataclasses
import re

from rknet_jax import checks, names
from rknet_jax import spec as spec_lib

__all__ = ["PaperRow", "ROWS", "BASELINES", "row", "ready_made", "READY_MADE"]

CIFAR_SHAPE = (32, 32, 3)
IMAGENET_SHAPE = (224, 224, 3)


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One row of the paper's Tables 1-3.

  Attributes:
    table: 1, 2 or 3.
    name: the ready-made model name (``rknet_jax.create_model(name)`` builds the row).
    model: spec fields the table gives the model beyond its name (k, m, widths, ...).
    datasets: the datasets the row reports ("cifar10", "cifar100", "imagenet2012").
    batch_size: the batch size the table states.
    gflops, params_m: the paper's GFLOPs and parameters (millions), as printed (strings,
      so their precision is kept; Table 2 counts parameters for 10 classes).
    errors: the paper's test errors (%) as printed, by dataset ("cifar10", "cifar100") or
      "top1" / "top5" (ImageNet, single 224 crop).
    label: the model as the paper's table prints it (default: ``name``).
  """

  table: int
  name: str
  model: Mapping[str, object]
  datasets: tuple[str, ...]
  batch_size: int
  gflops: str
  params_m: str
  errors: Mapping[str, str]
  label: str = ""

  def __post_init__(self):
    if not self.label:
      object.__setattr__(self, "label", self.name)

  @property
  def key(self) -> str:
    """``table<N>_<name in lower case, x for ×, _ for spaces and dashes>``."""
    slug = re.sub(r"[ -]+", "_", self.name.lower().replace("×", "x"))
    return f"table{self.table}_{slug}"

  @property
  def spec(self) -> spec_lib.ModelSpec:
    """The row's model as the table counts it (10 classes on CIFAR, 1000 on ImageNet)."""
    return names.spec_from_name(self.name, **self.model)

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """The image shape counted: 224x224x3 (ImageNet) or 32x32x3."""
    return IMAGENET_SHAPE if "imagenet2012" in self.datasets else CIFAR_SHAPE


_C10 = ("cifar10",)
_C = ("cifar10", "cifar100")
_K36 = {"growth_rate": 36}  # Table 1: k = 36 in every period, m = 1, multiscale


def _t3(m3):
  """Table 3: k = 32, m = 2, 4, 8, m_3, bottleneck width 4k, last period only."""
  return dict(
    growth_rate=32,
    growth_multipliers=(2, 4, 8, m3),
    bottleneck_width=128,
    num_classes=1000,
    stem="imagenet",
    multiscale=False,
  )


# One paper row per line, as the tables print them.
# fmt: off
ROWS = (
    # Table 1: CIFAR-10 without augmentation, batch 64.
    PaperRow(1, "ERKNet-6×1 6×1 6×1", _K36, _C10, 64, "0.66", "0.74", {"cifar10": "7.08"}),
    PaperRow(1, "ERKNet-7×1 6×1 6×1", _K36, _C10, 64, "0.83", "0.83", {"cifar10": "7.02"}),
    PaperRow(1, "ERKNet-7×1 7×1 6×1", _K36, _C10, 64, "0.87", "0.91", {"cifar10": "6.67"}),
    PaperRow(1, "ERKNet-7×1 7×1 7×1", _K36, _C10, 64, "0.88", "0.99", {"cifar10": "6.61"}),
    PaperRow(1, "IRKNet-3×1 3×1 3×1", _K36, _C10, 64, "0.38", "0.32", {"cifar10": "7.18"}),
    PaperRow(1, "IRKNet-4×1 3×1 3×1", _K36, _C10, 64, "0.62", "0.40", {"cifar10": "6.89"}),
    PaperRow(1, "IRKNet-4×1 4×1 3×1", _K36, _C10, 64, "0.68", "0.49", {"cifar10": "6.63"}),
    PaperRow(1, "IRKNet-4×1 4×1 4×1", _K36, _C10, 64, "0.69", "0.57", {"cifar10": "6.50"}),
    # Table 2: CIFAR-10/100 without augmentation, batch 32 (the baselines as published).
    PaperRow(2, "DenseNet-BC-250-k24", {}, _C, 32, "10.83", "15.3",
             {"cifar10": "5.19", "cifar100": "19.64"}, "DenseNet-BC (depth 250), k=24"),
    PaperRow(2, "CliqueNet-T18-k80", {}, _C, 32, "9.45", "10.14",
             {"cifar10": "5.06", "cifar100": "23.14"}, "CliqueNet (T=18), k=80"),
    PaperRow(2, "CliqueNet-ABC-T30-k150", {}, _C, 32, "10.56", "10.48",
             {"cifar10": "5.06", "cifar100": "21.83"}, "CliqueNet-ABC (T=30), k=150"),
    PaperRow(2, "IRKNet-5×1 5×1 5×1-AB-k150", {}, _C, 32, "7.62", "4.87",
             {"cifar10": "4.60", "cifar100": "21.63"}, "IRKNet-5×1 5×1 5×1-AB, k=150"),
    PaperRow(2, "IRKNet-5×1 5×1 5×1-AB-k180", {}, _C, 32, "10.98", "6.99",
             {"cifar10": "4.56", "cifar100": "21.09"}, "IRKNet-5×1 5×1 5×1-AB, k=180"),
    # Table 3: ImageNet, batch 256, single 224 centre crop.
    PaperRow(3, "ERKNet-3×1 3×1 3×1 1×1-B", _t3(16), ("imagenet2012",), 256, "5.20", "6.95",
             {"top1": "25.47", "top5": "7.81"}, "ERKNet-3×1 3×1 3×1 1×1-B, m_3=16"),
    PaperRow(3, "ERKNet-3×1 3×1 4×1 2×1-B", _t3(20), ("imagenet2012",), 256, "6.35", "14.49",
             {"top1": "24.12", "top5": "7.17"}, "ERKNet-3×1 3×1 4×1 2×1-B, m_3=20"),
    PaperRow(3, "ERKNet-3×1 3×1 6×1 2×1-B", _t3(28), ("imagenet2012",), 256, "8.50", "25.51",
             {"top1": "23.14", "top5": "6.66"}, "ERKNet-3×1 3×1 6×1 2×1-B, m_3=28"),
)
# fmt: on
"""Every row of Tables 1-3, in the paper's order."""

BASELINES = ("DenseNet-121", "DenseNet-169", "DenseNet-201")
"""Further ready-made baselines (ImageNet DenseNets; their names fix every field)."""

READY_MADE = tuple(r.name for r in ROWS) + BASELINES
"""The names ``rknet_jax.list_models()`` returns."""

_BY_KEY = {r.key: r for r in ROWS}


def row(key: str) -> PaperRow:
  """The row with ``row.key == key`` (e.g. ``table1_erknet_6x1_6x1_6x1``); ValueError else."""
  if key not in _BY_KEY:
    checks.check_keywords("paper row", [key], list(_BY_KEY))
  return _BY_KEY[key]


def _parsed(name: str):
  """The parts of an RKNet name, or None for another family's (or a bad) name."""
  try:
    return names.parse(name)
  except ValueError:
    return None


def _lookup_key(name: str) -> str:
  parsed = _parsed(name)
  return name if parsed is None else parsed.canonical()


_PRESETS = {_lookup_key(r.name): dict(r.model) for r in ROWS}


def ready_made(name: str) -> dict:
  """Spec fields of the ready-made model ``name`` is (``{}`` when it is none).

  ``x`` may replace ``×``, and a ``-k<N>`` tag on a ready-made name overrides its growth
  rate (``ERKNet-3×1 3×1 3×1 1×1-B-k32`` is Table 3's first row).
  """
  name = name.strip()
  key = _lookup_key(name)
  if key in _PRESETS:
    return dict(_PRESETS[key])
  parsed = _parsed(name)
  if parsed is not None and parsed.growth_rate is not None:
    untagged = dataclasses.replace(parsed, growth_rate=None).canonical()
    if untagged in _PRESETS:
      return {k: v for k, v in _PRESETS[untagged].items() if k != "growth_rate"}
  return {}
