"""RKNets and the baselines the paper reinterprets: DenseNet and CliqueNet.

An RKNet (paper section 3.2, Figure 1) is preprocessor -> P periods separated by transition
layers -> postprocessor -> classifier.  Period n integrates dy/dt = f(t, y) with r_n
time-steps of an s_n-stage Runge-Kutta method; y has m_n k_n channels; every time-step has
its own parameters.  See ``docs/architecture.md``.

* :class:`RKNet` -- ERKNets (each time-step an :class:`~rknet_jax.blocks.ERKStep`, section
  3.3.1) and IRKNets (each an :class:`~rknet_jax.blocks.IRKStep`, section 3.3.2).
* :class:`TableauRKNet` -- the same periods, transitions and head, each time-step a
  :class:`~rknet_jax.tableau_block.TableauStep` driven by a named Butcher tableau.
* :class:`DenseNet` (Huang et al. 2017) and :class:`CliqueNet` (Yang et al. 2018).

Model contract (docs/design.md): ``variables = model.init({"params": key}, x, train=False)``
has the collections ``params`` and ``batch_stats`` only; ``model.apply(variables, x,
train=...)`` returns float32 logits ``(N, num_classes)`` for float NHWC images ``x``; with
``dropout_rate > 0`` training needs ``rngs={"dropout": key}``.  The modules are normally
built by :func:`rknet_jax.create_model`, which validates every option first.  Input that
does not fit the model is refused while tracing, before anything is compiled: images that
are not NHWC with the stem's channel count (:func:`rknet_jax.layers.check_images`), and
images too small for the number of periods (a transition would halve a 1-pixel map to none).

Layer options: every model takes ``dropout_rate``, ``bn_momentum``, ``bn_epsilon``,
``dtype``, ``remat``, ``conv_impl`` and ``dense_formulation`` as keyword fields
(:class:`_Network`), turns them into one :class:`~rknet_jax.layers.LayerConfig` and hands
that down to every layer.  The BatchNorm defaults follow each family's published code
(RKNets: the authors' RKCNN code; DenseNet and CliqueNet: their own authors' code; sources in
:mod:`rknet_jax.layers`).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rknet_jax import blocks, families, layers
from rknet_jax import spec as spec_lib
from rknet_jax.layers import LayerConfig

__all__ = ["RKNet", "TableauRKNet", "DenseNet", "CliqueNet"]


def _keyword(default):
  """A keyword-only field (the layer options come after every model's own fields)."""
  return dataclasses.field(default=default, kw_only=True)


def _check_halvable(x, after: str, input_shape) -> None:
  """ValueError if the transition after ``after`` would pool ``x`` down to no pixels."""
  h, w = x.shape[1:3]
  if min(h, w) < 2:
    raise ValueError(
      f"input of shape {tuple(input_shape)} is too small for this model: the output of "
      f"{after} is {h}x{w} and the transition after it halves that to {h // 2}x{w // 2} "
      "(no pixels left, the logits would be NaN); use larger images or fewer periods"
    )


class _Network(nn.Module):
  """Base of the models: the layer options, all keyword-only, and their :class:`LayerConfig`.

  Attributes:
    dropout_rate: dropout after the convolutions that have one (0 = off; > 0 needs a
      'dropout' rng in training).
    bn_momentum, bn_epsilon: BatchNorm settings; the defaults are the authors' RKCNN code's
      (:data:`rknet_jax.layers.RKNET_BN_MOMENTUM`, ``RKNET_BN_EPSILON``); the baselines
      override them with their own code's.
    dtype: compute dtype (params stay float32, logits are float32).
    remat: rematerialise the memory-heavy segments (jax.checkpoint; same results).
    conv_impl: convolution formulation (:mod:`rknet_jax.conv`; "auto" picks by backend at
      trace time, or by the target devices' platform where the caller resolves it first, as
      the runner does: ``experiments.steps.model_for_mesh``).
    dense_formulation: how dense blocks are computed (:class:`rknet_jax.blocks.DenseBlock`;
      "auto" picks by depth and backend; same values and variables either way).
  """

  dropout_rate: float = _keyword(0.0)
  bn_momentum: float = _keyword(layers.RKNET_BN_MOMENTUM)
  bn_epsilon: float = _keyword(layers.RKNET_BN_EPSILON)
  dtype: Any = _keyword(jnp.float32)
  remat: bool = _keyword(False)
  conv_impl: str = _keyword("auto")
  dense_formulation: str = _keyword("auto")

  def spec(self) -> spec_lib.ModelSpec:
    """This module's configuration as its family's spec (:mod:`rknet_jax.families`).

    Module and spec fields share names; building the spec validates every option, so a
    module checks its options with the spec's one validator.
    """
    family = families.of_module(type(self))
    return family.spec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(family.spec)})

  def check(self):
    """Raise ValueError on an invalid configuration (before any array is built)."""
    self.spec()

  def layer_config(self) -> LayerConfig:
    """The :class:`LayerConfig` every layer of this model is built with."""
    return LayerConfig(
      **{
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(LayerConfig)
        if hasattr(self, f.name)
      }
    )

  def _stem_features(self) -> int:
    """Output channels of the preprocessor (the baselines' ``init_features``)."""
    return self.init_features

  def _begin(self, x, train: bool):
    """Checks the configuration and runs the preprocessor (``stem``) on ``x`` cast to
    ``dtype``; returns (its output, the LayerConfig, the input's shape)."""
    self.check()
    cfg = self.layer_config()
    x = jnp.asarray(x)
    stem = layers.make_stem(self.stem, self._stem_features(), cfg)
    return stem(x.astype(self.dtype), train), cfg, x.shape


class _Periods(_Network):
  """Shared forward pass of RKNets: stem -> periods (+transitions) -> postprocessor."""

  def _stem_features(self) -> int:
    """m_1 k_1: the state of the first period (Rule 1)."""
    return self.growth_multipliers[0] * self.growth_rate[0]

  def _forward(self, x, train, make_step):
    x, cfg, input_shape = self._begin(x, train)
    P = len(self.stages)
    k, m = self.growth_rate, self.growth_multipliers
    outputs = []
    for p in range(P):
      for t in range(self.steps[p]):
        x = make_step(p, t, name=f"period{p + 1}_step{t + 1}")(x, train)
      outputs.append(x)
      if p < P - 1:
        _check_halvable(x, f"period {p + 1}", input_shape)
        x = layers.Transition(
          m[p + 1] * k[p + 1], attention=self.attention, config=cfg, name=f"transition{p + 1}"
        )(x, train)
    used = outputs if self.multiscale else outputs[-1:]
    return layers.Postprocessor(self.num_classes, cfg, name="postprocessor")(used, train)


class RKNet(_Periods):
  """ERKNet or IRKNet (paper sections 3.2-3.3), e.g. ``ERKNet-7×1 6×1 6×1``.

  Attributes:
    stages: s per period.
    steps: r per period (time-steps, each with its own parameters).
    growth_rate: k per period.
    growth_multipliers: m per period (y has m k channels; m = 1 for IRKNets, Rule 4).
    method: "explicit" (ERK time-steps, dense blocks) or "implicit" (IRK, clique blocks).
    num_classes: classifier outputs.
    stem: "cifar" (3x3 conv) or "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool).
    bottleneck: bottleneck layers ("B").
    bottleneck_width: w per period, or None for the default (4k for explicit time-steps,
      k for implicit ones; :func:`rknet_jax.spec.bottleneck_widths`).
    attention: attentional transitions ("A").
    multiscale: postprocess every period (multiscale feature strategy) or the last only.
    num_updates, update_order, share_weights: IRK options (see ``CliqueBlock``).
    (keywords) dropout_rate, bn_momentum, bn_epsilon, dtype, remat, conv_impl,
      dense_formulation: the layer options of :class:`_Network`; BatchNorm defaults: the
      authors' RKCNN code (``BatchNorm2d(eps=0.001, momentum=0.01)``: epsilon 1e-3, flax
      momentum 0.99).
  """

  stages: tuple[int, ...]
  steps: tuple[int, ...]
  growth_rate: tuple[int, ...]
  growth_multipliers: tuple[int, ...]
  method: str = "explicit"
  num_classes: int = 10
  stem: str = "cifar"
  bottleneck: bool = False
  bottleneck_width: tuple[int, ...] | None = None
  attention: bool = False
  multiscale: bool = True
  num_updates: int = 1
  update_order: str = "gauss_seidel"
  share_weights: bool = True

  @property
  def bottleneck_widths(self) -> tuple[int, ...] | None:
    """w per period (None without bottleneck; :func:`rknet_jax.spec.bottleneck_widths`)."""
    return spec_lib.bottleneck_widths(
      self.method, self.bottleneck, self.bottleneck_width, self.growth_rate
    )

  @nn.compact
  def __call__(self, x, train: bool = False):
    bw, cfg = self.bottleneck_widths, self.layer_config()

    def make_step(p, t, name):
      del t
      width = None if bw is None else bw[p]
      if self.method == "explicit":
        return blocks.ERKStep(
          self.stages[p], self.growth_multipliers[p], self.growth_rate[p], width, cfg, name=name
        )
      return blocks.IRKStep(
        self.stages[p],
        self.growth_rate[p],
        width,
        num_updates=self.num_updates,
        update_order=self.update_order,
        share_weights=self.share_weights,
        config=cfg,
        name=name,
      )

    return self._forward(x, train, make_step)


TABLEAU_STEP_OPTIONS = spec_lib.TABLEAU_STEP_OPTIONS
"""Options of :class:`~rknet_jax.tableau_block.TableauStep` a tableau RKNet passes on."""


class TableauRKNet(_Periods):
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
    (the others as :class:`RKNet`; BatchNorm defaults: the authors' RKCNN code's)
  """

  tableau: str
  stages: tuple[int, ...]
  steps: tuple[int, ...]
  growth_rate: tuple[int, ...]
  growth_multipliers: tuple[int, ...]
  num_classes: int = 10
  stem: str = "cifar"
  attention: bool = False
  multiscale: bool = True
  step_options: tuple[tuple[str, Any], ...] = ()

  def _step_kwargs(self, p):
    options = dict(self.step_options)
    tab = _get_tableau(self.tableau)
    options["stage_functions"] = spec_lib.tableau_stage_functions(tab, self.stages[p], options)
    return dict(options, tableau=tab.name, config=self.layer_config())

  def check(self):
    """Raise ValueError on an invalid configuration (before any array is built): the spec's
    checks, then the step options' values as :class:`TableauStep` checks them."""
    from rknet_jax import tableau_block

    super().check()
    for p in range(len(self.stages)):
      try:
        tableau_block.TableauStep(**self._step_kwargs(p), parent=None)
      except (TypeError, KeyError) as e:
        raise ValueError(f"TableauRKNet: bad tableau-step options: {e}") from None

  @nn.compact
  def __call__(self, x, train: bool = False):
    from rknet_jax import tableau_block

    step_cls = self.layer_config().maybe_remat(tableau_block.TableauStep, train_argnum=2)

    def make_step(p, t, name):
      kwargs = self._step_kwargs(p)
      h = float(kwargs.get("step_size", 1.0))
      return step_cls(time=t * h, name=name, **kwargs)

    return self._forward(x, train, make_step)


def _get_tableau(name):
  from rknet_jax import tableaus

  try:
    return tableaus.get(name)
  except KeyError as e:
    raise ValueError(f"unknown tableau {name!r}: {e}") from None


class DenseNet(_Network):
  """DenseNet (Huang et al. 2017), plain or BC, as the paper reinterprets it (section 3.3.1).

  Stem -> dense blocks separated by transitions (BN -> ReLU -> 1x1 conv to
  floor(compression * channels) -> 2x2 avg pool) -> BN -> ReLU -> GAP -> FC.

  Attributes:
    block_layers: layers per dense block.
    growth_rate: k.
    init_features: stem output channels (16 or 2k on CIFAR, 64 on ImageNet).
    bottleneck_width: None (plain layers) or w (BC: 4k).
    compression: transition compression theta (BC: 0.5).
    bn_momentum, bn_epsilon: default 0.9 / 1e-5, DenseNet's published code (LuaTorch and
      torchvision: BatchNorm defaults eps 1e-5, momentum 0.1).
    (keywords) the other layer options of :class:`_Network`.
  """

  block_layers: tuple[int, ...]
  growth_rate: int
  init_features: int
  bottleneck_width: int | None = None
  compression: float = 1.0
  num_classes: int = 10
  stem: str = "cifar"
  bn_momentum: float = _keyword(layers.DENSENET_BN_MOMENTUM)
  bn_epsilon: float = _keyword(layers.DENSENET_BN_EPSILON)

  def transition_features(self, channels: int) -> int:
    """Output channels of a transition fed ``channels`` channels."""
    return int(self.compression * channels)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x, cfg, input_shape = self._begin(x, train)
    for b, n in enumerate(self.block_layers):
      x = blocks.DenseBlock(n, self.growth_rate, self.bottleneck_width, cfg, name=f"block{b + 1}")(
        x, train
      )
      if b < len(self.block_layers) - 1:
        _check_halvable(x, f"dense block {b + 1}", input_shape)
        x = layers.Transition(
          self.transition_features(x.shape[-1]), config=cfg, name=f"transition{b + 1}"
        )(x, train)
    return layers.Postprocessor(self.num_classes, cfg, name="postprocessor")([x], train)


class CliqueNet(_Network):
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
    growth_rate: k per block.
    bn_momentum, bn_epsilon: default 0.999 / 1e-3, the authors' TensorFlow code
      (iboing/CliqueNet: ``tf.contrib.layers.batch_norm`` with its defaults decay 0.999,
      epsilon 0.001).
    (keywords) the other layer options of :class:`_Network`.
  """

  block_layers: tuple[int, ...]
  growth_rate: tuple[int, ...]
  init_features: int = 64
  attention: bool = False
  bottleneck: bool = False
  compression: bool = False
  num_updates: int = 1
  update_order: str = "gauss_seidel"
  num_classes: int = 10
  stem: str = "cifar"
  bn_momentum: float = _keyword(layers.CLIQUENET_BN_MOMENTUM)
  bn_epsilon: float = _keyword(layers.CLIQUENET_BN_EPSILON)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x, cfg, input_shape = self._begin(x, train)
    block_features = []
    B = len(self.block_layers)
    for b in range(B):
      k = self.growth_rate[b]
      _, final = blocks.CliqueBlock(
        self.block_layers[b],
        k,
        k if self.bottleneck else None,
        num_updates=self.num_updates,
        update_order=self.update_order,
        config=cfg,
        name=f"block{b + 1}",
      )(x, train)
      transit = layers.concat(final)
      feature = layers.concat([x.astype(transit.dtype), transit])
      if self.compression:
        feature = layers.BNReLUConv(
          feature.shape[-1] // 2, (1, 1), config=cfg, name=f"compress{b + 1}"
        )(feature, train)
      block_features.append(feature)
      if b < B - 1:
        _check_halvable(transit, f"clique block {b + 1}", input_shape)
        x = layers.Transition(
          transit.shape[-1], attention=self.attention, config=cfg, name=f"transition{b + 1}"
        )(transit, train)
    return layers.Postprocessor(self.num_classes, cfg, name="postprocessor")(block_features, train)
