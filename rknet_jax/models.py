"""RKNets and the baselines the paper reinterprets: DenseNet and CliqueNet.

An RKNet (paper section 3.2, Figure 1) is preprocessor -> P periods separated by transition
layers -> postprocessor -> classifier.  Period n integrates dy/dt = f(t, y) with r_n
time-steps of an s_n-stage Runge-Kutta method; y has m_n k_n channels; every time-step has
its own parameters.  See ``shared/paper/ARCHITECTURE.md``.

* :class:`RKNet` -- ERKNets (each time-step an :class:`~rknet_jax.blocks.ERKStep`, section
  3.3.1) and IRKNets (each an :class:`~rknet_jax.blocks.IRKStep`, section 3.3.2).
* :class:`TableauRKNet` -- the same periods, transitions and head, each time-step a
  :class:`~rknet_jax.tableau_block.TableauStep` driven by a named Butcher tableau.
* :class:`DenseNet` (Huang et al. 2017) and :class:`CliqueNet` (Yang et al. 2018).

Model contract (DESIGN.md): ``variables = model.init({"params": key}, x, train=False)``
has the collections ``params`` and ``batch_stats`` only; ``model.apply(variables, x,
train=...)`` returns float32 logits ``(N, num_classes)`` for float NHWC images ``x``; with
``dropout_rate > 0`` training needs ``rngs={"dropout": key}``.  The modules are normally
built by :func:`rknet_jax.create_model`, which validates every option first.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from rknet_jax import blocks
from rknet_jax import layers

__all__ = ["RKNet", "TableauRKNet", "DenseNet", "CliqueNet", "METHODS", "STEMS"]

METHODS = ("explicit", "implicit")
STEMS = ("cifar", "imagenet")


def _check_common(name, num_classes, stem, dropout_rate):
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"{name}: num_classes={num_classes!r}: expected a positive int")
  if stem not in STEMS:
    raise ValueError(f"{name}: stem={stem!r}: expected one of {STEMS}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"{name}: dropout_rate={dropout_rate!r}: expected 0 <= rate < 1")


def _check_positive_ints(name, field, values, length=None):
  values = tuple(values)
  if length is not None and len(values) != length:
    raise ValueError(f"{name}: {field}={values!r} has {len(values)} entries, expected "
                     f"{length} (one per period)")
  for v in values:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name}: {field}={values!r}: every entry must be a positive int")
  return values


class _PeriodsMixin:
  """Shared forward pass of RKNets: stem -> periods (+transitions) -> postprocessor."""

  def _forward(self, x, train, make_step):
    P = len(self.stages)
    k, m = self.growth_rates, self.growth_multipliers
    x = jnp.asarray(x).astype(self.dtype)
    x = layers.make_stem(self.stem, m[0] * k[0], self.bn_momentum, self.bn_epsilon,
                         self.dtype)(x, train)
    outputs = []
    for p in range(P):
      for t in range(self.steps[p]):
        x = make_step(p, t, name=f"period{p + 1}_step{t + 1}")(x, train)
      outputs.append(x)
      if p < P - 1:
        x = layers.Transition(m[p + 1] * k[p + 1], attention=self.attention,
                              dropout_rate=self.dropout_rate, bn_momentum=self.bn_momentum,
                              bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                              name=f"transition{p + 1}")(x, train)
    used = outputs if self.multiscale else outputs[-1:]
    return layers.Postprocessor(self.num_classes, bn_momentum=self.bn_momentum,
                                bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                                name="postprocessor")(used, train)

  def _check_periods(self):
    name = type(self).__name__
    P = len(self.stages)
    if P < 1:
      raise ValueError(f"{name}: needs at least one period")
    _check_positive_ints(name, "stages", self.stages)
    _check_positive_ints(name, "steps", self.steps, P)
    _check_positive_ints(name, "growth_rates", self.growth_rates, P)
    _check_positive_ints(name, "growth_multipliers", self.growth_multipliers, P)
    _check_common(name, self.num_classes, self.stem, self.dropout_rate)


class RKNet(_PeriodsMixin, nn.Module):
  """ERKNet or IRKNet (paper sections 3.2-3.3), e.g. ``ERKNet-7×1 6×1 6×1``.

  Attributes:
    stages: s per period.
    steps: r per period (time-steps, each with its own parameters).
    growth_rates: k per period.
    growth_multipliers: m per period (y has m k channels; m = 1 for IRKNets, Rule 4).
    method: "explicit" (ERK time-steps, dense blocks) or "implicit" (IRK, clique blocks).
    num_classes: classifier outputs.
    stem: "cifar" (3x3 conv) or "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool).
    bottleneck_widths: None (plain layers) or the bottleneck width w per period ("B").
    attention: attentional transitions ("A").
    multiscale: postprocess every period (multiscale feature strategy) or the last only.
    num_updates, update_order, share_weights: IRK options (see ``CliqueBlock``).
    dropout_rate: dropout after every conv (0 = off).
    bn_momentum, bn_epsilon: BatchNorm settings.
    dtype: compute dtype (params stay float32, logits are float32).
    remat: rematerialise the concat-BN-ReLU-conv segments (jax.checkpoint).
  """
  stages: Tuple[int, ...]
  steps: Tuple[int, ...]
  growth_rates: Tuple[int, ...]
  growth_multipliers: Tuple[int, ...]
  method: str = "explicit"
  num_classes: int = 10
  stem: str = "cifar"
  bottleneck_widths: Optional[Tuple[int, ...]] = None
  attention: bool = False
  multiscale: bool = True
  num_updates: int = 1
  update_order: str = "gauss_seidel"
  share_weights: bool = True
  dropout_rate: float = 0.0
  bn_momentum: float = layers.DEFAULT_BN_MOMENTUM
  bn_epsilon: float = layers.DEFAULT_BN_EPSILON
  dtype: Any = jnp.float32
  remat: bool = False

  def check(self):
    """Raise ValueError on an inconsistent configuration (before any array is built)."""
    name = type(self).__name__
    self._check_periods()
    if self.method not in METHODS:
      raise ValueError(f"{name}: method={self.method!r}: expected one of {METHODS}")
    if self.bottleneck_widths is not None:
      _check_positive_ints(name, "bottleneck_widths", self.bottleneck_widths,
                           len(self.stages))
    if self.method == "implicit":
      if any(m != 1 for m in self.growth_multipliers):
        raise ValueError(f"{name}: Rule 4: IRKNets have m = 1 in every period, got "
                         f"growth_multipliers={tuple(self.growth_multipliers)}")
      if self.update_order not in blocks.UPDATE_ORDERS:
        raise ValueError(f"{name}: update_order={self.update_order!r}: expected one of "
                         f"{blocks.UPDATE_ORDERS}")
      if not isinstance(self.num_updates, int) or self.num_updates < 1:
        raise ValueError(f"{name}: num_updates={self.num_updates!r}: an IRK time-step needs "
                         "at least one alternate update (an int >= 1)")
      if self.share_weights and min(self.stages) < 2:
        raise ValueError(f"{name}: stages={tuple(self.stages)}: an IRK clique block with "
                         "shared weights needs s >= 2 (with s = 1 the update pass has no "
                         "other stage to read, equation 6)")

  @nn.compact
  def __call__(self, x, train: bool = False):
    self.check()
    bw = self.bottleneck_widths

    def make_step(p, t, name):
      del t
      common = dict(dropout_rate=self.dropout_rate, bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon, dtype=self.dtype, remat=self.remat, name=name)
      width = None if bw is None else bw[p]
      if self.method == "explicit":
        return blocks.ERKStep(self.stages[p], self.growth_multipliers[p],
                              self.growth_rates[p], width, **common)
      return blocks.IRKStep(self.stages[p], self.growth_rates[p], width,
                            num_updates=self.num_updates, update_order=self.update_order,
                            share_weights=self.share_weights, **common)

    return self._forward(x, train, make_step)


TABLEAU_STEP_OPTIONS = ("step_size", "learn_coefficients", "learn_step_size",
                        "implicit_iterations", "hidden_features", "kernel_size",
                        "stage_functions")
"""Options of :class:`~rknet_jax.tableau_block.TableauStep` a tableau RKNet passes on."""


def tableau_stage_functions(tableau, vector_fields: int, options) -> str:
  """``stage_functions`` of TableauStep for a name term's first number (1 or s).

  1 -> "shared" (one f(t, y), equation 3); s (the tableau's stage count) -> "per_stage"
  (f_i, equation 4).  For a 1-stage tableau both read "1": ``stage_functions`` in
  ``options`` decides (default "per_stage").  Raises ValueError otherwise or on a conflict.
  """
  s = tableau.num_stages
  if vector_fields not in (1, s):
    raise ValueError(f"a time-step of tableau {tableau.name!r} ({s} stages) has 1 shared "
                     f"vector field or {s} (one per stage): the term's first number must be "
                     f"1 or {s}, got {vector_fields}")
  wanted = options.get("stage_functions")
  if s == 1:
    return wanted or "per_stage"
  implied = "shared" if vector_fields == 1 else "per_stage"
  if wanted is not None and wanted != implied:
    raise ValueError(f"stage_functions={wanted!r} contradicts the name's term "
                     f"'{vector_fields}×r' ({implied}) for tableau {tableau.name!r}")
  return implied


def check_tableau_step_options(options) -> None:
  """ValueError for an option a tableau RKNet does not pass to TableauStep."""
  unknown = sorted(set(options) - set(TABLEAU_STEP_OPTIONS))
  if unknown:
    raise ValueError(f"unknown tableau-step option(s) {unknown}: allowed are "
                     f"{list(TABLEAU_STEP_OPTIONS)} (and bn_momentum, bn_epsilon)")


class TableauRKNet(_PeriodsMixin, nn.Module):
  """RKNet whose time-steps are :class:`~rknet_jax.tableau_block.TableauStep` s.

  Same preprocessor, periods, transitions and postprocessor as :class:`RKNet`; each of the
  r_n time-steps of period n is one step of the Runge-Kutta method ``tableau`` (a name of
  :func:`rknet_jax.tableaus.get`) with a convolutional vector field on m_n k_n channels
  (pre-activation BN -> ReLU -> 3x3 conv, twice).  ``stages`` holds, per period, how many
  vector fields a time-step has: 1 (one f(t, y) shared by all stages and conditioned on the
  stage time, equation 3) or the tableau's stage count s (one f_i per stage, the relaxation
  of equation 4).  Time-step n of a period starts at t_n = n h (h: the initial step size,
  ``step_size``, default 1).  With ``remat`` each whole
  time-step is rematerialised; ``dropout_rate`` applies to the transitions only.

  Attributes:
    tableau: name of the Butcher tableau.
    step_options: extra ``(field, value)`` pairs for every TableauStep (see
      ``TABLEAU_STEP_OPTIONS``; e.g. learn_coefficients, learn_step_size, step_size).
    (the others as :class:`RKNet`)
  """
  tableau: str
  stages: Tuple[int, ...]
  steps: Tuple[int, ...]
  growth_rates: Tuple[int, ...]
  growth_multipliers: Tuple[int, ...]
  num_classes: int = 10
  stem: str = "cifar"
  attention: bool = False
  multiscale: bool = True
  step_options: Tuple[Tuple[str, Any], ...] = ()
  dropout_rate: float = 0.0
  bn_momentum: float = layers.DEFAULT_BN_MOMENTUM
  bn_epsilon: float = layers.DEFAULT_BN_EPSILON
  dtype: Any = jnp.float32
  remat: bool = False

  def _step_kwargs(self, p):
    options = dict(self.step_options)
    check_tableau_step_options(options)
    tab = _get_tableau(self.tableau)
    options["stage_functions"] = tableau_stage_functions(tab, self.stages[p], options)
    return dict(options, tableau=tab.name, momentum=self.bn_momentum,
                epsilon=self.bn_epsilon, dtype=self.dtype)

  def check(self):
    """Raise ValueError on an inconsistent configuration (before any array is built)."""
    from rknet_jax import tableau_block  # pylint: disable=g-import-not-at-top
    self._check_periods()
    for p in range(len(self.stages)):
      try:
        tableau_block.TableauStep(**self._step_kwargs(p), parent=None)
      except (TypeError, KeyError) as e:
        raise ValueError(f"TableauRKNet: bad tableau-step options: {e}") from None

  @nn.compact
  def __call__(self, x, train: bool = False):
    from rknet_jax import tableau_block  # pylint: disable=g-import-not-at-top
    self.check()
    step_cls = layers.maybe_remat(tableau_block.TableauStep, self.remat, train_argnum=2)

    def make_step(p, t, name):
      kwargs = self._step_kwargs(p)
      h = float(kwargs.get("step_size", 1.0))
      return step_cls(time=t * h, name=name, **kwargs)

    return self._forward(x, train, make_step)


def _get_tableau(name):
  from rknet_jax import tableaus  # pylint: disable=g-import-not-at-top
  try:
    return tableaus.get(name)
  except KeyError as e:
    raise ValueError(f"unknown tableau {name!r}: {e}") from None


class DenseNet(nn.Module):
  """DenseNet (Huang et al. 2017), plain or BC, as the paper reinterprets it (section 3.3.1).

  Stem -> dense blocks separated by transitions (BN -> ReLU -> 1x1 conv to
  floor(compression * channels) -> 2x2 avg pool) -> BN -> ReLU -> GAP -> FC.

  Attributes:
    block_layers: layers per dense block.
    growth_rate: k.
    init_features: stem output channels (16 or 2k on CIFAR, 64 on ImageNet).
    bottleneck_width: None (plain layers) or w (BC: 4k).
    compression: transition compression theta (BC: 0.5).
  """
  block_layers: Tuple[int, ...]
  growth_rate: int
  init_features: int
  bottleneck_width: Optional[int] = None
  compression: float = 1.0
  num_classes: int = 10
  stem: str = "cifar"
  dropout_rate: float = 0.0
  bn_momentum: float = layers.DEFAULT_BN_MOMENTUM
  bn_epsilon: float = layers.DEFAULT_BN_EPSILON
  dtype: Any = jnp.float32
  remat: bool = False

  def check(self):
    """Raise ValueError on an inconsistent configuration."""
    _check_positive_ints("DenseNet", "block_layers", self.block_layers)
    _check_positive_ints("DenseNet", "growth_rate", (self.growth_rate,))
    _check_positive_ints("DenseNet", "init_features", (self.init_features,))
    if self.bottleneck_width is not None:
      _check_positive_ints("DenseNet", "bottleneck_width", (self.bottleneck_width,))
    if not 0.0 < self.compression <= 1.0:
      raise ValueError(f"DenseNet: compression={self.compression!r}: expected 0 < c <= 1")
    _check_common("DenseNet", self.num_classes, self.stem, self.dropout_rate)

  def transition_features(self, channels: int) -> int:
    """Output channels of a transition fed ``channels`` channels."""
    return int(self.compression * channels)

  @nn.compact
  def __call__(self, x, train: bool = False):
    self.check()
    k = self.growth_rate
    common = dict(dropout_rate=self.dropout_rate, bn_momentum=self.bn_momentum,
                  bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    x = jnp.asarray(x).astype(self.dtype)
    x = layers.make_stem(self.stem, self.init_features, self.bn_momentum, self.bn_epsilon,
                         self.dtype)(x, train)
    for b, n in enumerate(self.block_layers):
      feats = blocks.DenseBlock(n, k, self.bottleneck_width, remat=self.remat,
                                name=f"block{b + 1}", **common)(x, train)
      x = layers.concat(feats)
      if b < len(self.block_layers) - 1:
        x = layers.Transition(self.transition_features(x.shape[-1]),
                              name=f"transition{b + 1}", **common)(x, train)
    return layers.Postprocessor(self.num_classes, bn_momentum=self.bn_momentum,
                                bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                                name="postprocessor")([x], train)


class CliqueNet(nn.Module):
  """CliqueNet (Yang et al. 2018) with its A/B/C options, as in the authors' CIFAR code.

  Stem (3x3 conv to ``init_features`` = 64 on CIFAR) -> clique blocks (stage I + alternate
  updates, see :class:`~rknet_jax.blocks.CliqueBlock`).  The transition (BN -> ReLU -> 1x1
  conv keeping the s k channels -> [A: channel attention] -> 2x2 avg pool) takes the
  concatenated final stages; the block feature concat(X_0, final stages) -> [C: BN -> ReLU ->
  1x1 conv to half the channels] -> BN -> ReLU -> GAP of every block is concatenated
  (multiscale) -> FC.  B: the W filters are 1x1 (k -> k), each followed by BN -> ReLU -> a
  per-stage 3x3 conv k -> k.

  Attributes:
    block_layers: stages per block: T / 3 each (T = 18: 6, 6, 6), or T / 6 with B, whose
      stages are two conv layers each (T = 30: 5, 5, 5).
    growth_rates: k per block.
  """
  block_layers: Tuple[int, ...]
  growth_rates: Tuple[int, ...]
  init_features: int = 64
  attention: bool = False
  bottleneck: bool = False
  compression: bool = False
  num_updates: int = 1
  update_order: str = "gauss_seidel"
  num_classes: int = 10
  stem: str = "cifar"
  dropout_rate: float = 0.0
  bn_momentum: float = layers.DEFAULT_BN_MOMENTUM
  bn_epsilon: float = layers.DEFAULT_BN_EPSILON
  dtype: Any = jnp.float32
  remat: bool = False

  def check(self):
    """Raise ValueError on an inconsistent configuration."""
    _check_positive_ints("CliqueNet", "block_layers", self.block_layers)
    _check_positive_ints("CliqueNet", "growth_rates", self.growth_rates,
                         len(self.block_layers))
    _check_positive_ints("CliqueNet", "init_features", (self.init_features,))
    if min(self.block_layers) < 2:
      raise ValueError(f"CliqueNet: block_layers={tuple(self.block_layers)}: a clique block "
                       "needs at least 2 layers")
    if self.update_order not in blocks.UPDATE_ORDERS:
      raise ValueError(f"CliqueNet: update_order={self.update_order!r}: expected one of "
                       f"{blocks.UPDATE_ORDERS}")
    if not isinstance(self.num_updates, int) or self.num_updates < 0:
      raise ValueError(f"CliqueNet: num_updates={self.num_updates!r}: expected an int >= 0")
    _check_common("CliqueNet", self.num_classes, self.stem, self.dropout_rate)

  @nn.compact
  def __call__(self, x, train: bool = False):
    self.check()
    common = dict(dropout_rate=self.dropout_rate, bn_momentum=self.bn_momentum,
                  bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    x = jnp.asarray(x).astype(self.dtype)
    x = layers.make_stem(self.stem, self.init_features, self.bn_momentum, self.bn_epsilon,
                         self.dtype)(x, train)
    block_features = []
    B = len(self.block_layers)
    for b in range(B):
      k = self.growth_rates[b]
      _, final = blocks.CliqueBlock(
          self.block_layers[b], k, k if self.bottleneck else None,
          num_updates=self.num_updates, update_order=self.update_order, remat=self.remat,
          name=f"block{b + 1}", **common)(x, train)
      transit = layers.concat(final)
      feature = layers.concat([x.astype(transit.dtype), transit])
      if self.compression:
        feature = layers.BNReLUConv(feature.shape[-1] // 2, (1, 1), name=f"compress{b + 1}",
                                    **common)(feature, train)
      block_features.append(feature)
      if b < B - 1:
        x = layers.Transition(transit.shape[-1], attention=self.attention,
                              name=f"transition{b + 1}", **common)(transit, train)
    return layers.Postprocessor(self.num_classes, bn_momentum=self.bn_momentum,
                                bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                                name="postprocessor")(block_features, train)
