"""Dense and clique blocks, and the ERK / IRK time-steps built from them.

Paper section 3.3 (``docs/architecture.md``, "ERK time-step" and "IRK time-step"):

* :class:`DenseLayer` / :class:`DenseBlock` -- DenseNet's dense connectivity (Huang et al.
  2017): layer l reads the concatenation of the block input and all earlier growths.
* :class:`ERKStep` -- one time-step of an s-stage ERK method (equation 5, Figure 2): a dense
  block of s*m layers at growth rate k; growths (i-1)m+1 .. im form group i = h b_i z_i
  (Rules 1-3), and y_{n+1} = y_n + sum_i group_i (an explicit, parameter-free summation).
* :class:`CliqueBlock` -- CliqueNet's alternately updated clique (Yang et al. 2018) with its
  weight sharing: stage I, then N alternate updates (Gauss-Seidel or Jacobi order).
* :class:`IRKStep` -- one time-step of an s-stage IRK method (equation 6, Figure 3):
  y_{n+1} = y_n + sum_i X_i over the final stage values (Rule 4: m = 1).
"""

import flax.linen as nn
import jax.numpy as jnp

from rknet_jax import checks, dense_buffer, layers
from rknet_jax import conv as conv_lib
from rknet_jax import rk as rk_lib
from rknet_jax.layers import LayerConfig

__all__ = ["DenseLayer", "DenseBlock", "ERKStep", "CliqueBlock", "IRKStep"]


def _sum(arrays):
  # Explicit additions (no einsum), so FLOP counting sees no multiply-add here.
  out = arrays[0]
  for a in arrays[1:]:
    out = out + a
  return out


class DenseLayer(nn.Module):
  """One dense layer on the concatenation of ``inputs``, giving ``growth_rate`` channels.

  Plain: BN -> ReLU -> 3x3 conv.  Bottleneck ("B"): BN -> ReLU -> 1x1 conv (width w) ->
  BN -> ReLU -> 3x3 conv.  Pre-activation, no biases, dropout after each conv if > 0.
  With ``config.remat`` the segment concat -> BN -> ReLU -> first conv, whose input grows
  linearly along a block (quadratic memory over the block), is rematerialised
  (jax.checkpoint).

  Attributes:
    growth_rate: k, output channels.
    bottleneck_width: w, or None for the plain layer.
    config: shared layer options (:class:`~rknet_jax.layers.LayerConfig`).
  """

  growth_rate: int
  bottleneck_width: int | None = None
  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, inputs, train: bool):
    cfg = self.config
    first = cfg.maybe_remat(layers.BNReLUConv, train_argnum=2)
    if self.bottleneck_width is None:
      return first(self.growth_rate, (3, 3), config=cfg, name="bn_relu_conv3x3")(inputs, train)
    h = first(self.bottleneck_width, (1, 1), config=cfg, name="bn_relu_conv1x1")(inputs, train)
    return layers.BNReLUConv(self.growth_rate, (3, 3), config=cfg, name="bn_relu_conv3x3")(h, train)


DENSE_FORMULATIONS = checks.DENSE_FORMULATIONS
"""``DenseBlock.formulation`` / ``LayerConfig.dense_formulation`` values."""
LOOP_MAX_LAYERS = 8
"""Deepest block the ``"auto"`` formulation runs as a loop of layers on CPU: for shallow
blocks the loop's training step is faster there (XLA:CPU runs the buffer's backward scans
slower) while its quadratic memory is still small; deeper blocks use the buffer.  The
measurements behind the threshold: benchmarks/README.md (``python -m
benchmarks.bench_models --dense auto|buffer``)."""


class _BNVariables(nn.Module):
  """A BatchNorm's variables (:class:`rknet_jax.layers.BNVariables`) for numerics computed
  elsewhere; given batch ``stats`` (mean, var) it folds them into the running averages."""

  features: int

  @nn.compact
  def __call__(self, stats=None, momentum: float = 0.0) -> dense_buffer.BNVars:
    bn = layers.BNVariables.declare(self, self.features)
    if stats is not None:
      bn.update(*stats, momentum)
    return dense_buffer.BNVars(bn.scale, bn.bias, bn.mean.value, bn.var.value)


class _DropoutKey(nn.Module):
  """The 'dropout' rng a ``flax.linen.Dropout`` at this module's path would draw."""

  @nn.compact
  def __call__(self):
    return self.make_rng("dropout")


class _DenseLayerVariables(nn.Module):
  """The variables of a :class:`DenseLayer` under its names (``bn_relu_conv1x1`` with a
  bottleneck, ``bn_relu_conv3x3``; each ``bn`` + ``conv/kernel``) and the dropout keys its
  ``Dropout_0`` modules would draw; with ``stats`` it updates the running averages instead."""

  in_features: int
  growth_rate: int
  bottleneck_width: int | None = None

  @nn.compact
  def __call__(self, dropout: bool, stats=None, momentum: float = 0.0):
    c, k, w = self.in_features, self.growth_rate, self.bottleneck_width
    units = (
      [("bn_relu_conv3x3", c, k, (3, 3))]
      if w is None
      else [("bn_relu_conv1x1", c, w, (1, 1)), ("bn_relu_conv3x3", w, k, (3, 3))]
    )
    out = []
    for i, (name, cin, cout, ksize) in enumerate(units):
      unit = _Scope(name=name)
      out.append(unit(cin, cout, ksize, dropout, None if stats is None else stats[i], momentum))
    return dense_buffer.LayerVars(*out)


class _Scope(nn.Module):
  """One BN -> ReLU -> conv unit's variables (see :class:`_DenseLayerVariables`)."""

  @nn.compact
  def __call__(self, cin, cout, ksize, dropout, stats, momentum):
    bn = _BNVariables(cin, name="bn")(stats, momentum)
    kernel = layers.ConvKernel(tuple(ksize) + (cin, cout), name="conv")()
    key = _DropoutKey(name="Dropout_0")() if dropout else None
    return dense_buffer.ConvUnitVars(bn, kernel, key)


class DenseBlock(nn.Module):
  """DenseNet dense block (Huang et al. 2017) of ``num_layers`` dense layers at growth rate k.

  Layer l reads the concatenation of the block input and the l - 1 earlier growths and adds k
  channels: BN -> ReLU -> 3x3 conv, or with a bottleneck ("B", width w) BN -> ReLU -> 1x1 conv
  to w -> BN -> ReLU -> 3x3 conv, dropout after each conv (the :class:`DenseLayer` s, computed
  together).  Returns the concatenation ``[x, g_1, .., g_L]`` (c_0 + L k channels); DenseNet
  passes it on, the ERK time-step sums groups of it.  With ``as_list`` it returns the list
  ``[x, g_1, .., g_L]`` instead.

  Two formulations with the same variables (those of L :class:`DenseLayer` s,
  ``layer{l}/bn_relu_conv{1x1,3x3}/{bn,conv}``, same initial values and dropout rngs), so a
  checkpoint of one loads in the other:

  * ``"buffer"``: one channel buffer with memory and program size linear in L
    (:mod:`rknet_jax.dense_buffer`: concatenations are buffer prefixes, BN -> ReLU of them is
    rebuilt in the backward pass from the final buffer); ``config.remat`` changes nothing.
  * ``"loop"``: the :class:`DenseLayer` s on the growing list of features (quadratic memory
    and program size; on CPU its per-part BatchNorm is the fastest for shallow blocks).
  * ``"auto"``: the buffer for blocks of more than :data:`LOOP_MAX_LAYERS` layers
    and whenever the convolutions are XLA's native ones (GPU/TPU), the loop otherwise
    (shallow blocks on CPU, e.g. every CIFAR ERKNet of the paper).

  ``formulation`` None (the default) takes ``config.dense_formulation`` (a model's
  ``dense_formulation`` option, default ``"auto"``).
  """

  num_layers: int
  growth_rate: int
  bottleneck_width: int | None = None
  config: LayerConfig = LayerConfig()
  formulation: str | None = None
  as_list: bool = False

  def uses_buffer(self) -> bool:
    """Whether this block runs on the channel buffer (see the class docstring)."""
    formulation = self.config.dense_formulation if self.formulation is None else (self.formulation)
    checks.check_choice("DenseBlock", "formulation", formulation, DENSE_FORMULATIONS)
    if formulation != "auto":
      return formulation == "buffer"
    return (
      self.num_layers > LOOP_MAX_LAYERS or conv_lib.resolve_impl(self.config.conv_impl) == "xla"
    )

  @nn.compact
  def __call__(self, x, train: bool):
    cfg = self.config
    k, w = self.growth_rate, self.bottleneck_width
    if not self.uses_buffer():
      feats = [x]
      for l in range(self.num_layers):
        feats.append(DenseLayer(k, w, cfg, name=f"layer{l + 1}")(list(feats), train))
      if self.as_list:
        return feats
      return layers.concat([f.astype(feats[-1].dtype) for f in feats])
    plan = dense_buffer.DenseBlockPlan(
      in_channels=x.shape[-1],
      num_layers=self.num_layers,
      growth_rate=k,
      bottleneck_width=w,
      train=train,
      epsilon=cfg.bn_epsilon,
      dtype=jnp.dtype(cfg.dtype).name,
      conv_impl=conv_lib.resolve_impl(cfg.conv_impl),
      dropout_rate=cfg.dropout_rate,
    )
    decls, layer_vars = [], []
    for l in range(self.num_layers):
      decl = _DenseLayerVariables(plan.in_width(l), k, w, name=f"layer{l + 1}")
      decls.append(decl)
      layer_vars.append(decl(plan.dropout))
    buf, stats = dense_buffer.dense_block(plan, x, layer_vars)
    if train and not self.is_initializing():
      for decl, layer_stats in zip(decls, stats):
        decl(False, layer_stats, cfg.bn_momentum)
    if self.as_list:
      return [buf[..., : plan.in_width(0)]] + [
        buf[..., plan.in_width(l) : plan.in_width(l) + k] for l in range(self.num_layers)
      ]
    return buf


class ERKStep(nn.Module):
  """One ERK time-step: dense block + explicit summation (paper section 3.3.1, Figure 2).

  ``y`` must have m*k channels (Rule 1).  The dense block has s*m layers (Rule 3); growths
  (i-1)m+1 .. im concatenated are group i, standing for h b_i z_i (Rule 2); the output is
  y + sum_i group_i.  With s = m = 1 and no bottleneck this is a pre-activation residual
  unit y + conv(relu(bn(y))).

  Attributes:
    num_stages: s.
    growth_multiplier: m.
    growth_rate: k.
    bottleneck_width: None (plain layers) or the bottleneck width w.
    config: shared layer options.
  """

  num_stages: int
  growth_multiplier: int
  growth_rate: int
  bottleneck_width: int | None = None
  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, y, train: bool):
    s, m, k = self.num_stages, self.growth_multiplier, self.growth_rate
    if y.shape[-1] != m * k:
      raise ValueError(
        f"ERKStep: Rule 1 needs y with m*k = {m}*{k} = {m * k} channels, got {y.shape[-1]}"
      )
    feats = DenseBlock(
      s * m, k, self.bottleneck_width, self.config, as_list=True, name="dense_block"
    )(y, train)
    growths = feats[1:]
    groups = [layers.concat(growths[i * m : (i + 1) * m]) for i in range(s)]
    return _sum([y.astype(groups[0].dtype)] + groups)


class _CliqueOptions(nn.Module):
  """The fields a clique block and an IRK time-step share (see :class:`CliqueBlock`)."""

  num_stages: int
  growth_rate: int
  bottleneck_width: int | None = None
  num_updates: int = 1
  update_order: str = "gauss_seidel"
  share_weights: bool = True
  config: LayerConfig = LayerConfig()


class CliqueBlock(_CliqueOptions):
  """CliqueNet's alternately updated clique block (Yang et al. 2018; paper section 3.3.2).

  Stages X_1..X_s of k channels each; X_0 = the block input (any width c_0).

  ``share_weights=True`` (CliqueNet, the paper): one filter W_0i (c_0 -> k) from X_0 to each
  stage and one W_ji (k -> k) for every ordered pair j != i, s^2 filters when c_0 = k, all
  parameters ``W_{j}_{i}`` of this module.  Pass I: X_i = g(concat(X_0, X_1..X_{i-1})) with
  W_0i, W_1i, .., W_(i-1)i.  Each update pass: X_i = g(concat(X_j, j != i, j >= 1)) with
  the same W_ji.  g = BN -> ReLU -> conv on the concatenation, computed as ONE convolution
  whose kernel is the concatenation of the W_ji along the input axis (equal to the sum of
  one convolution per input).  Every pass, including each update iteration, has its own
  BatchNorms (as CliqueNet's code, which builds new BN layers in every loop).
  Bottleneck (``bottleneck_width`` w not None): the W are 1x1 (-> w), followed by
  BN -> ReLU -> a per-stage 3x3 conv w -> k shared by all passes (its BNs are not).
  Plain: the W are 3x3 (-> k).

  ``share_weights=False`` (the authors' later RKCNN code): pass I is s dense layers (each on
  concat(X_0, earlier stages)); the update pass has its own per-stage dense layers on
  concat(X_0, the other s-1 stages), reused (BNs included, as in that code) by every update
  iteration.  Dense layers are bottleneck layers of width w, or plain 3x3 if w is None.

  Update order (:data:`rknet_jax.checks.UPDATE_ORDERS`): "gauss_seidel" reads the newest
  value of every stage (the paper's, CliqueNet's); "jacobi" reads the values of the
  previous pass.  ``num_updates`` passes iterate the same
  shared weights (fixed-point iterations of the implicit stage equations); 0 is CliqueNet's
  stage-I-only block.

  Initialisation: each W_ji is He-normal with its own fan-in (as an independent k -> k
  convolution, as in CliqueNet's code).

  Returns ``(stage_one, final)``: lists of the s stage values after pass I and after the
  last update.  With ``num_updates >= 1`` it sows the last update's max-abs change of the
  stages as ``"implicit_residual"`` (:func:`rknet_jax.rk.implicit_residuals`).
  """

  def _check(self):
    checks.check_choice("CliqueBlock", "update_order", self.update_order, checks.UPDATE_ORDERS)
    checks.check_int("CliqueBlock", "num_updates", self.num_updates, 0, checks.MAX_UPDATES)
    checks.check_int("CliqueBlock", "num_stages", self.num_stages)
    if self.share_weights and self.num_updates > 0:
      checks.check_shared_weight_stages("CliqueBlock", (self.num_stages,))

  @nn.compact
  def __call__(self, x0, train: bool):
    self._check()
    if self.share_weights:
      stage_one, final, last_input = self._shared(x0, train)
    else:
      stage_one, final, last_input = self._unshared(x0, train)
    if self.num_updates > 0 and self.is_mutable_collection("intermediates"):
      # rk.implicit_residuals reads it from an apply's state (only computed when asked for)
      self.sow("intermediates", rk_lib.IMPLICIT_RESIDUAL, rk_lib.max_abs_change(last_input, final))
    return stage_one, final

  def _shared(self, x0, train):
    s, k, w = self.num_stages, self.growth_rate, self.bottleneck_width
    cfg = self.config
    bottleneck = w is not None
    ksize = (1, 1) if bottleneck else (3, 3)
    wout = w if bottleneck else k
    c0 = x0.shape[-1]
    W = {}
    for i in range(1, s + 1):
      for j in range(0, s + 1):
        if j != i:
          W[j, i] = self.param(
            f"W_{j}_{i}", conv_lib.he_normal, ksize + (c0 if j == 0 else k, wout), jnp.float32
          )
    post = (
      {i: cfg.conv(k, (3, 3), name=f"stage{i}_conv3x3") for i in range(1, s + 1)}
      if bottleneck
      else {}
    )
    seg_cls = cfg.maybe_remat(layers.BNReLUKernelConv, train_argnum=3)

    def g(pass_name, i, inputs, sources):
      kernel = jnp.concatenate([W[j, i] for j in sources], axis=2)
      h = seg_cls(cfg, name=f"{pass_name}_stage{i}")(inputs, kernel, train)
      if bottleneck:
        h = cfg.batch_norm(train, name=f"{pass_name}_stage{i}_bn3x3")(h)
        h = cfg.dropout(post[i](nn.relu(h)), train)
      return h

    X = {}
    for i in range(1, s + 1):
      X[i] = g("pass1", i, [x0] + [X[j] for j in range(1, i)], list(range(0, i)))
    stage_one = [X[i] for i in range(1, s + 1)]
    for u in range(1, self.num_updates + 1):
      prev = dict(X)
      src = X if self.update_order == "gauss_seidel" else prev
      for i in range(1, s + 1):
        others = [j for j in range(1, s + 1) if j != i]
        X[i] = g(f"update{u}", i, [src[j] for j in others], others)
    last_input = [prev[i] for i in range(1, s + 1)] if self.num_updates else stage_one
    return stage_one, [X[i] for i in range(1, s + 1)], last_input

  def _unshared(self, x0, train):
    s, k = self.num_stages, self.growth_rate

    def mk(name):
      return DenseLayer(k, self.bottleneck_width, self.config, name=name)

    X = []
    for i in range(s):
      X.append(mk(f"pass1_stage{i + 1}")([x0] + X[:i], train))
    stage_one = list(X)
    update = [mk(f"update_stage{i + 1}") for i in range(s)]
    prev = stage_one
    for _ in range(self.num_updates):
      prev = list(X)
      for i in range(s):
        src = X if self.update_order == "gauss_seidel" else prev
        X[i] = update[i]([x0] + [src[j] for j in range(s) if j != i], train)
    return stage_one, X, prev


class IRKStep(_CliqueOptions):
  """One IRK time-step: clique block + explicit summation (paper section 3.3.2, Figure 3).

  ``y`` must have k channels (Rules 1 and 4: m = 1).  y_{n+1} = y_n + sum_i X_i with the
  stage values X_i after the last alternate update (see :class:`CliqueBlock`).
  """

  @nn.compact
  def __call__(self, y, train: bool):
    k = self.growth_rate
    if y.shape[-1] != k:
      raise ValueError(
        f"IRKStep: Rules 1 and 4 (m = 1) need y with k = {k} channels, got {y.shape[-1]}"
      )
    _, final = CliqueBlock(
      self.num_stages,
      k,
      self.bottleneck_width,
      num_updates=self.num_updates,
      update_order=self.update_order,
      share_weights=self.share_weights,
      config=self.config,
      name="clique_block",
    )(y, train)
    return _sum([y.astype(final[0].dtype)] + final)
