"""Model specs: what a model is, as one frozen, validated value per model family.

A spec holds every choice that defines a model of the paper (section 3.2, Figure 1: the
periods, the RK method of each, growth rates k and multipliers m, the A/B options, classes,
stem) and the layer options (dropout, BatchNorm, compute dtype, rematerialisation).  It is
checked in exactly one place, its ``__post_init__``, so a spec that exists is valid:

* :class:`RKNetSpec` -- ERKNets and IRKNets (sections 3.3.1 and 3.3.2);
* :class:`TableauRKNetSpec` -- RKNets whose time-steps follow a named Butcher tableau;
* :class:`DenseNetSpec`, :class:`CliqueNetSpec` -- the baselines the paper reinterprets.

``spec.name`` formats the paper's notation (:mod:`rknet_jax.names` parses it);
``spec.to_json()`` / :func:`from_json` are the serialisation a training workdir keeps in
``model.json``; ``rknet_jax.create_model(spec)`` builds the Flax module.

Defaults: the architecture fields default to the paper's choices (named per field).  The
layer options default to ``None``, meaning "the model class's own default"
(:mod:`rknet_jax.models`, whose docstrings name each value's source: the authors' code for
RKNets, each baseline's published code for DenseNet and CliqueNet), so every default has
one home.  ``rknet_jax.registry.resolve`` fills them in from the class.

Values are checked by :mod:`rknet_jax.checks`, which the modules use too.
"""

import dataclasses
import json
import re
from typing import Any

from rknet_jax import families
from rknet_jax.checks import (
  DENSE_FORMULATIONS,
  IMPLS,
  MAX_LAYERS,
  MAX_UPDATES,
  MAX_WIDTH,
  METHODS,
  STEMS,
  UPDATE_ORDERS,
  check_bool,
  check_choice,
  check_compression,
  check_epsilon,
  check_int,
  check_keywords,
  check_rate,
  check_shared_weight_stages,
  check_size,
  dtype_name,
  per_period,
  sequence_length,
)

__all__ = [
  "RKNetSpec",
  "TableauRKNetSpec",
  "DenseNetSpec",
  "CliqueNetSpec",
  "ModelSpec",
  "from_json",
  "LAYER_OPTIONS",
  "DENSENET_IMAGENET",
  "TABLEAU_STEP_OPTIONS",
  "bottleneck_widths",
  "tableau_stage_functions",
]

LAYER_OPTIONS = (
  "dropout_rate",
  "bn_momentum",
  "bn_epsilon",
  "dtype",
  "remat",
  "conv_impl",
  "dense_formulation",
)
"""Spec fields whose ``None`` means the model class's default."""


# ------------------------------------------------------------------------------- specs
@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
  """Fields every family shares.

  Attributes:
    num_classes: classifier outputs (CIFAR-10: 10).
    stem: "cifar" or "imagenet" (:data:`STEMS`).
    dropout_rate, bn_momentum, bn_epsilon, dtype, remat, conv_impl, dense_formulation:
      layer options; None = the model class's default (see :mod:`rknet_jax.models` for
      each value and its source).  dtype is a name of ``checks.DTYPES`` (a dtype is
      accepted and stored by name); conv_impl one of ``checks.IMPLS``; dense_formulation
      one of ``checks.DENSE_FORMULATIONS`` (how dense blocks are computed; same values).
  """

  num_classes: int = 10
  stem: str = "cifar"
  dropout_rate: float | None = None
  bn_momentum: float | None = None
  bn_epsilon: float | None = None
  dtype: str | None = None
  remat: bool | None = None
  conv_impl: str | None = None
  dense_formulation: str | None = None

  def _set(self, field, value):
    object.__setattr__(self, field, value)

  @property
  def owner(self) -> str:
    """What error messages call this spec: its name, or its class name when it has none."""
    try:
      return self.name
    except ValueError:
      return type(self).__name__

  def __post_init__(self):
    owner = type(self).__name__
    self._set("num_classes", check_int(owner, "num_classes", self.num_classes, 1, 1 << 24))
    self._set("stem", check_choice(owner, "stem", self.stem, STEMS))
    if self.dropout_rate is not None:
      self._set("dropout_rate", check_rate(owner, "dropout_rate", self.dropout_rate))
    if self.bn_momentum is not None:
      self._set("bn_momentum", check_rate(owner, "bn_momentum", self.bn_momentum))
    if self.bn_epsilon is not None:
      self._set("bn_epsilon", check_epsilon(owner, "bn_epsilon", self.bn_epsilon))
    if self.dtype is not None:
      self._set("dtype", dtype_name(owner, self.dtype))
    if self.remat is not None:
      check_bool(owner, "remat", self.remat)
    if self.conv_impl is not None:
      check_choice(owner, "conv_impl", self.conv_impl, IMPLS)
    if self.dense_formulation is not None:
      check_choice(owner, "dense_formulation", self.dense_formulation, DENSE_FORMULATIONS)

  @property
  def name(self) -> str:
    """The model's name in the paper's notation (:mod:`rknet_jax.names`)."""
    raise NotImplementedError

  @property
  def num_layers(self) -> int:
    """Layers of the blocks (what :data:`MAX_LAYERS` bounds)."""
    raise NotImplementedError

  def fields(self) -> dict:
    """The fields as a dict (tuples kept)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def replace(self, **overrides) -> "ModelSpec":
    """A copy with ``overrides`` (validated again); unknown keywords are named."""
    check_keywords(self.owner, overrides, [f.name for f in dataclasses.fields(self)])
    return dataclasses.replace(self, **overrides)

  def to_json(self) -> str:
    """JSON text: ``{"family": <class name>, "name": ..., <every field>}``."""
    out = {"family": type(self).__name__}
    try:
      out["name"] = self.name  # informational; from_json ignores it
    except ValueError:
      pass
    out.update(self.fields())
    return json.dumps(out, indent=2, sort_keys=True)


def from_json(text_or_dict) -> ModelSpec:
  """The spec of ``ModelSpec.to_json`` output (text or the parsed dict).

  The ``family`` key names a registered family (:mod:`rknet_jax.families`); a module-style
  key of older files (``growth_rates``, ``bottleneck_widths``) is read as the spec's name
  of the same option.
  """
  data = dict(json.loads(text_or_dict) if isinstance(text_or_dict, str) else text_or_dict)
  family = data.pop("family", None)
  data.pop("name", None)
  cls = families.by_spec_name(family).spec
  for old, new in (("growth_rates", "growth_rate"), ("bottleneck_widths", "bottleneck_width")):
    if old in data and new not in data:
      data[new] = data.pop(old)
  check_keywords(family, data, [f.name for f in dataclasses.fields(cls)])
  return cls(**data)


def _terms(stages, steps):
  return " ".join(f"{s}×{r}" for s, r in zip(stages, steps))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PeriodsSpec(ModelSpec):
  """Fields of every RKNet: periods of r time-steps of an s-stage method (section 3.2)."""

  stages: tuple[int, ...]
  steps: tuple[int, ...]
  growth_rate: tuple[int, ...]
  growth_multipliers: tuple[int, ...] = 1
  attention: bool = False
  multiscale: bool = True

  def __post_init__(self):
    super().__post_init__()
    owner = type(self).__name__
    periods = sequence_length(owner, "stages", self.stages)
    if periods < 1:
      raise ValueError(f"{owner}: needs at least one period, got stages={self.stages!r}")
    for field, maximum in (
      ("stages", MAX_LAYERS),
      ("steps", MAX_LAYERS),
      ("growth_rate", MAX_WIDTH),
      ("growth_multipliers", MAX_WIDTH),
    ):
      self._set(field, per_period(owner, field, getattr(self, field), periods, maximum))
    check_bool(owner, "attention", self.attention)
    check_bool(owner, "multiscale", self.multiscale)

  def _k_tag(self):
    k = set(self.growth_rate)
    return f"-k{self.growth_rate[0]}" if len(k) == 1 else ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RKNetSpec(_PeriodsSpec):
  """An ERKNet or IRKNet (sections 3.3.1, 3.3.2), e.g. ``ERKNet-7×1 6×1 6×1``, k = 36.

  Attributes:
    stages, steps: s and r per period.
    growth_rate: k per period (an int is repeated).
    growth_multipliers: m per period (y has m k channels; Rule 4: m = 1 in IRKNets).
    method: "explicit" (ERK) or "implicit" (IRK).
    bottleneck: bottleneck layers ("B" in the name).
    bottleneck_width: w per period; None = 4k for ERK steps (Table 3), k for IRK steps
      (Table 2).
    attention: attentional transitions ("A"); multiscale: postprocess every period (CIFAR).
    num_updates: alternate updates per IRK time-step (the paper: 1).
    update_order: "gauss_seidel" (the paper, CliqueNet) or "jacobi" (the authors' code
      without ``--replace``).
    share_weights: clique-block weight sharing between the two passes (the paper and
      CliqueNet: True; the authors' later code: False).
  """

  method: str = "explicit"
  bottleneck: bool = False
  bottleneck_width: tuple[int, ...] | None = None
  num_updates: int = 1
  update_order: str = "gauss_seidel"
  share_weights: bool = True

  def __post_init__(self):
    super().__post_init__()
    owner = self.owner
    check_choice(owner, "method", self.method, METHODS)
    check_bool(owner, "bottleneck", self.bottleneck)
    check_bool(owner, "share_weights", self.share_weights)
    check_choice(owner, "update_order", self.update_order, UPDATE_ORDERS)
    self._set("num_updates", check_int(owner, "num_updates", self.num_updates, 1, MAX_UPDATES))
    if self.method == "explicit":
      defaults = {f.name: f.default for f in dataclasses.fields(self)}
      for field in ("num_updates", "update_order", "share_weights"):
        if getattr(self, field) != defaults[field]:
          raise ValueError(
            f"{owner}: {field}={getattr(self, field)!r} applies to implicit "
            "(IRK) time-steps only, not to explicit ones"
          )
    else:
      if any(m != 1 for m in self.growth_multipliers):
        raise ValueError(
          f"{owner}: growth_multipliers={self.growth_multipliers}: Rule 4 of "
          "the paper fixes m = 1 in IRKNets (implicit time-steps)"
        )
      if self.share_weights:
        check_shared_weight_stages(owner, self.stages)
    if self.bottleneck_width is not None:
      if not self.bottleneck:
        raise ValueError(
          f"{owner}: bottleneck_width={self.bottleneck_width!r} needs the "
          "bottleneck suffix letter 'B' in the name (bottleneck=True)"
        )
      self._set(
        "bottleneck_width",
        per_period(owner, "bottleneck_width", self.bottleneck_width, len(self.stages)),
      )
    check_size(owner, self.num_layers)

  @property
  def name(self) -> str:
    """``ERKNet-<s×r ...>[-AB][-k<k>]`` (``-k`` when every period has the same k)."""
    family = "ERKNet" if self.method == "explicit" else "IRKNet"
    letters = ("A" if self.attention else "") + ("B" if self.bottleneck else "")
    return (
      f"{family}-{_terms(self.stages, self.steps)}"
      + (f"-{letters}" if letters else "")
      + self._k_tag()
    )

  @property
  def num_layers(self) -> int:
    return sum(s * r * m for s, r, m in zip(self.stages, self.steps, self.growth_multipliers))

  @property
  def bottleneck_widths(self) -> tuple[int, ...] | None:
    """w per period (None without bottleneck): the given widths, or 4k (ERK) / k (IRK)."""
    return bottleneck_widths(self.method, self.bottleneck, self.bottleneck_width, self.growth_rate)


def bottleneck_widths(method, bottleneck, bottleneck_width, growth_rate):
  """w per period of an RKNet: None without bottleneck, the given widths, or by default
  4k for explicit time-steps (Table 3) and k for implicit ones (Table 2)."""
  if not bottleneck:
    return None
  if bottleneck_width is not None:
    return tuple(bottleneck_width)
  factor = 4 if method == "explicit" else 1
  return tuple(factor * k for k in growth_rate)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TableauRKNetSpec(_PeriodsSpec):
  """An RKNet whose time-steps follow a Butcher tableau, e.g. ``RK4Net-1×3 1×3 1×3``.

  Attributes:
    tableau: a name of :func:`rknet_jax.tableaus.get` (stored canonical).
    stages: vector fields per time-step: 1 (one shared f(t, y), equation 3) or the
      tableau's stage count (one f_i per stage, equation 4).
    step_options: ``(option, value)`` pairs passed to every
      :class:`~rknet_jax.tableau_block.TableauStep` (a dict is accepted and sorted); the
      model class checks them.
  """

  tableau: str
  step_options: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    from rknet_jax import tableaus

    super().__post_init__()
    owner = type(self).__name__
    try:
      tab = tableaus.get(self.tableau)
    except (KeyError, TypeError):
      check_choice(owner, "tableau", self.tableau, tableaus.names())  # raises, with a hint
      raise
    self._set("tableau", tab.name)
    options = self.step_options
    if isinstance(options, dict):
      options = options.items()
    self._set("step_options", tuple(sorted((str(k), v) for k, v in options)))
    options = dict(self.step_options)
    check_keywords(self.owner, options, TABLEAU_STEP_OPTIONS)
    for s in self.stages:
      tableau_stage_functions(tab, s, options, self.owner)
    check_size(self.owner, self.num_layers)

  @property
  def name(self) -> str:
    """``<Tableau>Net-<s×r ...>[-A][-k<k>]``."""
    family = (
      "_".join(p.upper() if p.startswith("rk") else p.capitalize() for p in self.tableau.split("_"))
      + "Net"
    )
    return (
      f"{family}-{_terms(self.stages, self.steps)}"
      + ("-A" if self.attention else "")
      + self._k_tag()
    )

  @property
  def num_layers(self) -> int:
    return sum(s * r * m for s, r, m in zip(self.stages, self.steps, self.growth_multipliers))


TABLEAU_STEP_OPTIONS = (
  "step_size",
  "learn_coefficients",
  "learn_step_size",
  "implicit_iterations",
  "hidden_features",
  "kernel_size",
  "stage_functions",
)
"""Options of :class:`~rknet_jax.tableau_block.TableauStep` a tableau RKNet passes on."""


def tableau_stage_functions(tableau, vector_fields: int, options, owner: str = "") -> str:
  """``stage_functions`` of TableauStep for a name term's first number (1 or s).

  1 -> "shared" (one f(t, y), equation 3); s (the tableau's stage count) -> "per_stage"
  (f_i, equation 4).  For a 1-stage tableau both read "1": ``stage_functions`` in
  ``options`` decides (default "per_stage").  Raises ValueError otherwise or on a conflict.
  """
  s, prefix = tableau.num_stages, f"{owner}: " if owner else ""
  if vector_fields not in (1, s):
    raise ValueError(
      f"{prefix}a time-step of tableau {tableau.name!r} ({s} stages) has 1 "
      f"shared vector field or {s} (one per stage): each term's first number "
      f"must be 1 or {s}, got {vector_fields}"
    )
  wanted = options.get("stage_functions")
  if s == 1:
    return wanted or "per_stage"
  implied = "shared" if vector_fields == 1 else "per_stage"
  if wanted is not None and wanted != implied:
    raise ValueError(
      f"{prefix}stage_functions={wanted!r} contradicts the name's term "
      f"'{vector_fields}×r' ({implied}) for tableau {tableau.name!r}"
    )
  return implied


DENSENET_IMAGENET = {
  121: ((6, 12, 24, 16), 32, 64),
  169: ((6, 12, 32, 32), 32, 64),
  201: ((6, 12, 48, 32), 32, 64),
  161: ((6, 12, 36, 24), 48, 96),
}
"""ImageNet DenseNets (Huang et al. 2017, Table 1): depth -> (block layers, k, stem width)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseNetSpec(ModelSpec):
  """DenseNet (Huang et al. 2017), plain or BC.

  Attributes:
    block_layers: layers per dense block.
    growth_rate: k.
    init_features: stem output channels (CIFAR: 16 plain, 2k BC; ImageNet: 2k).
    bottleneck_width: None (plain layers) or w (BC: 4k).
    compression: transition compression theta, 0 < theta <= 1 (BC: 0.5).
  """

  block_layers: tuple[int, ...]
  growth_rate: int
  init_features: int
  bottleneck_width: int | None = None
  compression: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    owner = type(self).__name__
    blocks = sequence_length(owner, "block_layers", self.block_layers)
    if blocks < 1:
      raise ValueError(f"{owner}: block_layers={self.block_layers!r}: needs at least one block")
    self._set(
      "block_layers", per_period(owner, "block_layers", self.block_layers, blocks, MAX_LAYERS)
    )
    self._set("growth_rate", check_int(owner, "growth_rate", self.growth_rate))
    self._set("init_features", check_int(owner, "init_features", self.init_features))
    if self.bottleneck_width is not None:
      self._set("bottleneck_width", check_int(owner, "bottleneck_width", self.bottleneck_width))
    self._set("compression", check_compression(owner, self.compression))
    check_size(owner, self.num_layers)

  @property
  def name(self) -> str:
    """``DenseNet-121|161|169|201``, ``DenseNet-BC-<L>-k<k>`` or ``DenseNet-<L>-k<k>``."""
    k, layers = self.growth_rate, self.block_layers
    for depth, (blocks, kk, init) in DENSENET_IMAGENET.items():
      if (layers, k, self.init_features, self.bottleneck_width, self.compression) == (
        blocks,
        kk,
        init,
        4 * kk,
        0.5,
      ):
        return f"DenseNet-{depth}"
    if len(layers) == 3 and len(set(layers)) == 1:
      n = layers[0]
      if (self.init_features, self.bottleneck_width, self.compression) == (2 * k, 4 * k, 0.5):
        return f"DenseNet-BC-{6 * n + 4}-k{k}"
      if (self.init_features, self.bottleneck_width, self.compression) == (16, None, 1.0):
        return f"DenseNet-{3 * n + 4}-k{k}"
    raise ValueError(
      f"DenseNetSpec{dataclasses.astuple(self)[:3]}: no DenseNet name describes this configuration"
    )

  @property
  def num_layers(self) -> int:
    return sum(self.block_layers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CliqueNetSpec(ModelSpec):
  """CliqueNet (Yang et al. 2018) with its A/B/C options.

  Attributes:
    block_layers: stages per clique block (T/3 each, or T/6 with B).
    growth_rate: k per block (an int is repeated).
    init_features: stem width (CliqueNet's CIFAR code: 64).
    attention, bottleneck, compression: CliqueNet's A, B and C options.
    num_updates: alternate updates (CliqueNet: 1; 0 = stage I only).
    update_order: "gauss_seidel" (CliqueNet) or "jacobi".
  """

  block_layers: tuple[int, ...]
  growth_rate: tuple[int, ...]
  init_features: int = 64
  attention: bool = False
  bottleneck: bool = False
  compression: bool = False
  num_updates: int = 1
  update_order: str = "gauss_seidel"

  def __post_init__(self):
    super().__post_init__()
    owner = type(self).__name__
    blocks = per_period(
      owner,
      "block_layers",
      self.block_layers,
      sequence_length(owner, "block_layers", self.block_layers),
      MAX_LAYERS,
    )
    if min(blocks) < 2:
      raise ValueError(f"{owner}: block_layers={blocks}: a clique block needs at least 2 layers")
    self._set("block_layers", blocks)
    self._set("growth_rate", per_period(owner, "growth_rate", self.growth_rate, len(blocks)))
    self._set("init_features", check_int(owner, "init_features", self.init_features))
    for field in ("attention", "bottleneck", "compression"):
      check_bool(owner, field, getattr(self, field))
    # 0 updates is a CliqueNet with stage I only; an IRK time-step needs >= 1 (RKNetSpec).
    self._set("num_updates", check_int(owner, "num_updates", self.num_updates, 0, MAX_UPDATES))
    check_choice(owner, "update_order", self.update_order, UPDATE_ORDERS)
    check_size(owner, self.num_layers)

  @property
  def name(self) -> str:
    """``CliqueNet[-<letters of ABC>]-T<T>-k<k>`` (T counts conv layers)."""
    blocks, k = self.block_layers, self.growth_rate
    if len(blocks) != 3 or len(set(blocks)) != 1 or len(set(k)) != 1 or self.init_features != 64:
      raise ValueError(
        f"CliqueNetSpec{(blocks, k)}: no CliqueNet name describes this configuration"
      )
    letters = "".join(
      c for c, on in zip("ABC", (self.attention, self.bottleneck, self.compression)) if on
    )
    T = 3 * blocks[0] * (2 if self.bottleneck else 1)
    return "CliqueNet" + (f"-{letters}" if letters else "") + f"-T{T}-k{k[0]}"

  @property
  def num_layers(self) -> int:
    return sum(self.block_layers)


# ------------------------------------------------------------------------------ families
_RK_PREFIX = re.compile(r"(ERKNet|IRKNet|RKNet)-")


def _is_tableau_name(name: str) -> bool:
  from rknet_jax import tableaus

  m = re.match(r"([A-Za-z0-9_]+)Net-", name)
  if not m:
    return False
  try:
    tableaus.get(m.group(1))
  except KeyError:
    return False
  return True


families.register(
  families.Family(
    spec=RKNetSpec,
    module="rknet_jax.models:RKNet",
    matches=lambda name: bool(_RK_PREFIX.match(name)),
    from_name="rknet_jax.names:rknet_spec_from_name",
    study_labels=("ERKNet", "IRKNet"),
  )
)
families.register(
  families.Family(
    spec=TableauRKNetSpec,
    module="rknet_jax.models:TableauRKNet",
    matches=_is_tableau_name,
    from_name="rknet_jax.names:rknet_spec_from_name",
  )
)
families.register(
  families.Family(
    spec=DenseNetSpec,
    module="rknet_jax.models:DenseNet",
    matches=lambda name: name.startswith("DenseNet"),
    from_name="rknet_jax.names:densenet_spec_from_name",
    study_labels=("DenseNet",),
    converter="rknet_jax.registry:erknet_from_densenet",
  )
)
families.register(
  families.Family(
    spec=CliqueNetSpec,
    module="rknet_jax.models:CliqueNet",
    matches=lambda name: name.startswith("CliqueNet"),
    from_name="rknet_jax.names:cliquenet_spec_from_name",
    study_labels=("CliqueNet",),
    converter="rknet_jax.registry:irknet_from_cliquenet",
  )
)
