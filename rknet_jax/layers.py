"""Pre-activation layers, stems, transitions and the classifier head of RKNets.

Everything here follows ``docs/architecture.md`` ("Around the periods") and
section 3.2 / 4.2 of the paper:

* :class:`LayerConfig` -- the options every layer of a model shares (compute dtype, dropout,
  BatchNorm momentum/epsilon, rematerialisation, convolution formulation), handed down the
  module tree as one value that also builds the BatchNorm, convolution and dropout layers
  (as flax's ResNet example hands down ``norm`` and ``conv``).
* :class:`BNReLUConv` -- the pre-activation unit BN -> ReLU -> conv [-> dropout] applied to
  the channel concatenation of its inputs (the building brick of dense and clique blocks).
* :class:`BNReLUKernelConv` -- the same with a kernel handed in by the caller, so that a
  clique block can share (slices of) one set of filters between its two passes.
* :class:`BatchNormParts` -- BatchNorm of a channel concatenation computed part by part.
* :class:`Dropout` -- ``flax.linen.Dropout``'s rng and values, its mask computed once
  (:mod:`rknet_jax.dropout`).
* :class:`CifarStem`, :class:`ImageNetStem` -- the preprocessors.
* :class:`ChannelAttention`, :class:`Transition` -- the (attentional) transition layers.
* :class:`Postprocessor` -- per-period BN -> ReLU -> global average pool, with or without
  the multiscale feature strategy, then one fully connected layer with bias.

Every convolution goes through :mod:`rknet_jax.conv` (He-normal fan-in, not truncated,
bias-free), in the formulation ``LayerConfig.conv_impl`` names.  BatchNorm parameters are
float32 whatever the compute ``dtype``.

BatchNorm defaults (the paper does not give them; each family follows its authors' code):

=============  ======================  ==========================================================
family         momentum / epsilon      source
=============  ======================  ==========================================================
RKNets         0.99 / 1e-3             ZhuMai/RKCNN ``pytorch_models/utils.py``:
                                       ``nn.BatchNorm2d(dim, eps=0.001, momentum=0.01)``
DenseNet       0.9 / 1e-5              liuzhuang13/DenseNet ``models/densenet.lua``
                                       (``cudnn.SpatialBatchNormalization(nChannels)``) and
                                       torchvision ``densenet.py``
                                       (``nn.BatchNorm2d(num_input_features)``): the Torch
                                       defaults eps 1e-5, momentum 0.1
CliqueNet      0.999 / 1e-3            iboing/CliqueNet ``models/utils.py`` (CIFAR, TensorFlow):
                                       ``tf.contrib.layers.batch_norm(x, scale=True, ...)`` with
                                       TF's defaults ``decay=0.999, epsilon=0.001``
=============  ======================  ==========================================================

Flax's ``momentum`` is the decay of the running average: PyTorch's ``momentum=m`` is flax's
``1 - m``; TensorFlow's ``decay`` is flax's ``momentum``.  One difference no setting removes:
PyTorch updates ``running_var`` with the *unbiased* batch variance (divided by n - 1, n = N H W
values per channel), flax (and :class:`BatchNormParts`) with the biased one (divided by n);
normalisation itself uses the biased variance in both.  So a converter of the authors'
PyTorch checkpoints copies ``running_var`` as is to reproduce their evaluation outputs, and
rescales it by (n - 1) / n (n of the batches it was trained on) to express it in flax's
convention; running statistics trained here and there differ by that factor.

Rematerialisation: :meth:`LayerConfig.maybe_remat` wraps a layer class in :func:`flax.linen.remat`
(``jax.checkpoint``) with ``train`` static.  The wrapped layer has exactly the same variables
(callers give explicit names), computes the same values and gradients, and updates the
BatchNorm running statistics once: the recomputation in the backward pass only rebuilds
activations, the new statistics are outputs of the forward pass.

Concatenations read by a 1x1 convolution (bottleneck dense layers, bottleneck clique
stages) are never built: BatchNorm statistics are per channel, so the statistics of a
concatenation are those of its parts (:class:`BatchNormParts`), and a 1x1 filter on a
concatenation is the sum of one filter per part (:func:`rknet_jax.conv.conv1x1_concat`).
Same variables, values and FLOPs as the concat -> BN -> ReLU -> conv formulation; on CPU it
avoids XLA's fused BatchNorm backward over the concatenation's gradient slices and the
quadratic (over a dense block) concatenations (benchmarks/README.md, finding 4).
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rknet_jax import batch_norm as bn_math
from rknet_jax import checks
from rknet_jax import conv as conv_lib
from rknet_jax import dropout as dropout_lib

__all__ = [
  "LayerConfig",
  "Dropout",
  "BNVariables",
  "BatchNormParts",
  "ConvKernel",
  "concat",
  "BNReLUConv",
  "BNReLUKernelConv",
  "CifarStem",
  "ImageNetStem",
  "make_stem",
  "ChannelAttention",
  "Transition",
  "Postprocessor",
  "glorot_uniform",
  "check_images",
  "RKNET_BN_MOMENTUM",
  "RKNET_BN_EPSILON",
  "DENSENET_BN_MOMENTUM",
  "DENSENET_BN_EPSILON",
  "CLIQUENET_BN_MOMENTUM",
  "CLIQUENET_BN_EPSILON",
]

RKNET_BN_MOMENTUM = 0.99
"""BatchNorm running-average decay of RKNets: the authors' RKCNN code (ZhuMai/RKCNN,
``nn.BatchNorm2d(dim, eps=0.001, momentum=0.01)``; PyTorch's momentum 0.01 is flax's 0.99)."""
RKNET_BN_EPSILON = 1e-3
"""BatchNorm epsilon of RKNets: the authors' RKCNN code (``eps=0.001``)."""
DENSENET_BN_MOMENTUM = 0.9
"""BatchNorm decay of DenseNet: the original LuaTorch code and torchvision use the Torch
default momentum 0.1, i.e. flax's 0.9."""
DENSENET_BN_EPSILON = 1e-5
"""BatchNorm epsilon of DenseNet: the Torch/PyTorch default 1e-5 of its published code."""
CLIQUENET_BN_MOMENTUM = 0.999
"""BatchNorm decay of CliqueNet: its authors' TensorFlow code (iboing/CliqueNet) calls
``tf.contrib.layers.batch_norm`` with the default ``decay=0.999``."""
CLIQUENET_BN_EPSILON = 1e-3
"""BatchNorm epsilon of CliqueNet: TF's ``tf.contrib.layers.batch_norm`` default 0.001."""

glorot_uniform = nn.initializers.xavier_uniform()
"""FC initialiser of the paper (section 4.1: Xavier, Glorot & Bengio 2010)."""


class Dropout(nn.Module):
  """``flax.linen.Dropout`` (same automatic name ``Dropout_<n>``, so the same 'dropout' rng
  at the same path, and the same values) through :func:`rknet_jax.dropout.dropout`, whose
  mask XLA computes once instead of inside every consumer (see there)."""

  rate: float
  deterministic: bool

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    return dropout_lib.dropout(x, self.rate, self.make_rng("dropout"))


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """The options every layer of a model shares, held once and handed down the module tree.

  The models (:mod:`rknet_jax.models`) take these options as constructor fields, build one
  ``LayerConfig`` and pass it to every submodule as ``config``; the submodules build their
  BatchNorm, convolution and dropout layers through it, so each option is read in one place.
  Frozen and hashable (a valid Linen attribute and jit-static value).

  Attributes:
    bn_momentum: BatchNorm running-average decay (flax convention; PyTorch's ``1 - momentum``);
      default: the RKNets' (the authors' RKCNN code).
    bn_epsilon: BatchNorm epsilon; default: the RKNets'.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    dropout_rate: dropout after the convolutions that have one (0: none, no rng needed).
    remat: rematerialise the segments the blocks mark (jax.checkpoint): same values,
      gradients and BatchNorm updates, less memory.
    conv_impl: convolution formulation (:mod:`rknet_jax.conv`: ``"auto"``, ``"xla"``,
      ``"dot1x1"`` or ``"dot"``); ``"auto"`` is resolved from the backend when traced.
    dense_formulation: how :class:`rknet_jax.blocks.DenseBlock` computes a block
      (``"auto"``, ``"buffer"`` or ``"loop"``, :data:`rknet_jax.checks.DENSE_FORMULATIONS`);
      the same variables and values either way.
    param_dtype: dtype of the parameters and BatchNorm statistics (float32; the models do
      not change it, float64 serves exact comparisons of a standalone layer in tests).
  """

  bn_momentum: float = RKNET_BN_MOMENTUM
  bn_epsilon: float = RKNET_BN_EPSILON
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  remat: bool = False
  conv_impl: str = "auto"
  dense_formulation: str = "auto"
  param_dtype: Any = jnp.float32

  def batch_norm(self, train: bool, name: str | None = None) -> nn.BatchNorm:
    """Flax BatchNorm with these settings, ``param_dtype`` scale/bias and statistics."""
    return nn.BatchNorm(
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )

  def conv(
    self,
    features: int,
    kernel_size: Sequence[int] = (3, 3),
    strides: Sequence[int] = (1, 1),
    padding: conv_lib.Padding = "SAME",
    name: str | None = None,
  ) -> conv_lib.Conv:
    """Bias-free He-normal :class:`rknet_jax.conv.Conv` in ``dtype`` and ``conv_impl``."""
    return conv_lib.Conv(
      features,
      tuple(kernel_size),
      strides=tuple(strides),
      padding=padding,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      impl=self.conv_impl,
      name=name,
    )

  def dropout(self, x, train: bool):
    """Dropout at ``dropout_rate`` in training; built only when the rate is > 0, so models
    without dropout need no 'dropout' rng."""
    if self.dropout_rate > 0.0:
      x = Dropout(rate=self.dropout_rate, deterministic=not train)(x)
    return x

  def maybe_remat(self, layer_cls, train_argnum: int):
    """``layer_cls`` itself, or wrapped in :func:`flax.linen.remat` when ``remat``.

    ``train_argnum`` is the position of ``train`` in ``__call__`` counting ``self`` as 0
    (flax's convention for ``static_argnums``).  The wrapped layer has the same variables
    (callers give explicit names), values and gradients, and updates the BatchNorm
    running statistics once: the recomputation in the backward pass only rebuilds
    activations, the new statistics are outputs of the forward pass.
    """
    if not self.remat:
      return layer_cls
    return nn.remat(layer_cls, static_argnums=(train_argnum,))


def concat(inputs):
  """Channel concatenation (NHWC) of an array or a sequence of arrays."""
  if isinstance(inputs, (list, tuple)):
    return inputs[0] if len(inputs) == 1 else jnp.concatenate(inputs, axis=-1)
  return inputs


@dataclasses.dataclass(frozen=True)
class BNVariables:
  """A BatchNorm's variables declared as :meth:`LayerConfig.batch_norm` declares them
  (params ``scale``/``bias``, batch_stats ``mean``/``var``, float32, one per channel), for
  layers that compute the normalisation themselves (:class:`BatchNormParts`, the dense
  block's channel buffer)."""

  scale: Any
  bias: Any
  mean: Any  # the flax variables of the running averages (``.value``)
  var: Any

  @classmethod
  def declare(cls, module: nn.Module, features: int) -> "BNVariables":
    """Declares the variables on ``module`` (inside its compact ``__call__``)."""
    c = features
    mean = module.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    var = module.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = module.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = module.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return cls(scale, bias, mean, var)

  def update(self, batch_mean, batch_var, momentum: float) -> None:
    """Folds batch statistics into the running averages (flax's rule)."""
    self.mean.value = bn_math.running_average(self.mean.value, batch_mean, momentum)
    self.var.value = bn_math.running_average(self.var.value, batch_var, momentum)


class BatchNormParts(nn.Module):
  """BatchNorm of the channel concatenation of ``inputs``, computed part by part.

  The same variables as :meth:`LayerConfig.batch_norm` applied to ``concat(inputs)`` (params
  ``scale``, ``bias``; batch_stats ``mean``, ``var``; one entry per channel of the
  concatenation, in order) and flax's arithmetic (float32 statistics, fast variance E[x^2] -
  E[x]^2 clipped at 0, the biased variance also in the running average, running averages
  updated in training but not at initialisation).  Statistics are per channel, so each part's
  statistics are exactly the concatenation's for its channels, and each part is normalised
  with its slice of the same scale/bias/mean/var; only the per-channel vectors are
  concatenated (for the running averages).

  Returns the list of normalised parts (in ``config.dtype``), one per input.
  """

  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, inputs: Sequence[Any], train: bool):
    cfg = self.config
    xs = list(inputs)
    if not xs:
      raise ValueError("BatchNormParts needs at least one input")
    channels = [x.shape[-1] for x in xs]
    bn = BNVariables.declare(self, sum(channels))
    if train:
      means, variances = zip(*[bn_math.moments(x) for x in xs])
      if not self.is_initializing():
        bn.update(jnp.concatenate(means), jnp.concatenate(variances), cfg.bn_momentum)
    else:
      means = _split(bn.mean.value, channels)
      variances = _split(bn.var.value, channels)
    scales, biases = _split(bn.scale, channels), _split(bn.bias, channels)
    return [
      bn_math.normalize(x, mu, var, scale, bias, cfg.bn_epsilon, cfg.dtype)
      for x, mu, var, scale, bias in zip(xs, means, variances, scales, biases)
    ]


def _split(v, sizes):
  """``v`` cut into consecutive slices of the given sizes (static slices)."""
  out, offset = [], 0
  for n in sizes:
    out.append(v[offset : offset + n])
    offset += n
  return out


class ConvKernel(nn.Module):
  """Declares the ``kernel`` parameter :class:`rknet_jax.conv.Conv` would (same name,
  shape, initialiser and rng), for convolutions computed by the caller."""

  shape: Sequence[int]

  @nn.compact
  def __call__(self):
    return self.param("kernel", conv_lib.he_normal, tuple(self.shape), jnp.float32)


def _as_list(inputs):
  return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]


def _per_part(xs, kernel_size, strides, config: LayerConfig) -> bool:
  """Whether BN -> ReLU -> conv of the concatenation of ``xs`` runs part by part.

  Only for a 1x1 stride-1 conv of several inputs, and only where the convolution
  formulation is not XLA's native one (``config.conv_impl`` resolves to another, i.e. the
  CPU under ``"auto"``): there it saves memory and time, while with XLA's native
  convolutions the single concatenation compiles faster for deep blocks (measurements:
  benchmarks/README.md, benchmarks/bench_compile.py).  Both paths have the same variables,
  values and gradients.
  """
  return (
    len(xs) > 1
    and tuple(kernel_size) == (1, 1)
    and tuple(strides) == (1, 1)
    and conv_lib.resolve_impl(config.conv_impl) != "xla"
  )


def _bn_relu_conv(xs, kernel, strides, train, config: LayerConfig):
  """concat(xs) -> BN -> ReLU -> conv with HWIO ``kernel`` [-> dropout], inside the calling
  module (its submodule ``bn``): part by part where :func:`_per_part` says so, else on the
  concatenation (built here, so that under remat it is recomputed rather than stored)."""
  dtype, impl = config.dtype, config.conv_impl
  if _per_part(xs, kernel.shape[:2], strides, config):
    hs = BatchNormParts(config, name="bn")(xs, train)
    x = conv_lib.conv1x1_concat([nn.relu(h) for h in hs], kernel.astype(dtype), impl=impl)
  else:
    x = config.batch_norm(train, name="bn")(concat(xs))
    x = conv_lib.conv2d(nn.relu(x).astype(dtype), kernel.astype(dtype), strides, impl=impl)
  return config.dropout(x, train)


class BNReLUConv(nn.Module):
  """Pre-activation unit on a concatenation: concat -> BN -> ReLU -> conv [-> dropout].

  The dense layer of DenseNet (Huang et al. 2017) and of the ERK time-step (paper section
  3.3.1, Figure 2).  ``inputs`` may be one array or a sequence of NHWC arrays that are
  concatenated on channels first (inside this module, so that under remat the concatenation
  is recomputed rather than stored).  For a 1x1 stride-1 conv on several inputs the
  concatenation is not built (on CPU, see ``_per_part``): BN and ReLU run part by part
  (:class:`BatchNormParts`) and the conv is a sum of per-part 1x1 filters
  (:func:`rknet_jax.conv.conv1x1_concat`); same variables (``bn/{scale,bias,mean,var}``,
  ``conv/kernel``), values and gradients.

  Attributes:
    features: output channels.
    kernel_size: conv window.
    strides: conv strides.
    config: shared layer options (dropout after the conv, BatchNorm, dtype, conv formulation).
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, inputs, train: bool):
    xs = _as_list(inputs)
    kh, kw = self.kernel_size
    kernel = ConvKernel((kh, kw, sum(x.shape[-1] for x in xs), self.features), name="conv")()
    return _bn_relu_conv(xs, kernel, tuple(self.strides), train, self.config)


class BNReLUKernelConv(nn.Module):
  """concat -> BN -> ReLU -> conv with a caller-supplied HWIO ``kernel`` [-> dropout].

  Used by the clique block (paper section 3.3.2): the kernel is the concatenation, along
  its input-feature axis, of the shared filters W_ji of the stages that feed stage i (a
  filter on a concatenation equals the sum of one filter per input), so the same W_ji
  serve both passes while each pass has its own BatchNorm (this module's ``bn``).  With a
  1x1 kernel and several inputs, BN -> ReLU -> conv runs part by part as in
  :class:`BNReLUConv` (same variables and values).
  """

  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, inputs, kernel, train: bool):
    xs = _as_list(inputs)
    c = sum(x.shape[-1] for x in xs)
    if c != kernel.shape[2]:
      raise ValueError(
        f"BNReLUKernelConv: input has {c} channels but the kernel expects {kernel.shape[2]}"
      )
    return _bn_relu_conv(xs, kernel, (1, 1), train, self.config)


def check_images(stem: nn.Module, x) -> None:
  """ValueError unless ``x`` is a batch of NHWC images the ``stem`` module can take.

  At ``apply`` the stem's convolution kernel (``params/conv/kernel``) fixes the channel
  count: an input with another last axis is refused, naming its shape and the expected
  layout.  At ``init`` there is no kernel yet; an input whose axis 1 looks like image
  channels (<= 4) while axes 2 and 3 do not is refused as NCHW.
  """
  shape = tuple(x.shape)
  if len(shape) != 4:
    raise ValueError(f"input of shape {shape}: expected a batch of NHWC images (N, H, W, C)")
  kernel = stem.variables.get("params", {}).get("conv", {}).get("kernel")
  expected = None if kernel is None else kernel.shape[2]
  _, h, w, c = shape
  if expected is None:
    bad = looks_nchw = h <= 4 < min(w, c)
  else:
    bad, looks_nchw = c != expected, h == expected
  if bad:
    channels = f" with {expected} channels" if expected is not None else ""
    hint = (
      (" -- it looks like NCHW (channels first): transpose it with jnp.transpose(x, (0, 2, 3, 1))")
      if looks_nchw
      else ""
    )
    raise ValueError(
      f"input of shape {shape}: the model takes NHWC images (N, H, W, C){channels}{hint}"
    )


class CifarStem(nn.Module):
  """CIFAR/SVHN preprocessor: one 3x3 conv, 3 -> ``features``, no BN, no bias."""

  features: int
  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    check_images(self, x)
    return self.config.conv(self.features, (3, 3), name="conv")(x)


class ImageNetStem(nn.Module):
  """ImageNet preprocessor: 7x7/2 conv -> BN -> ReLU -> 3x3/2 max-pool (224 -> 56)."""

  features: int
  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, x, train: bool):
    check_images(self, x)
    x = self.config.conv(
      self.features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name="conv"
    )(x)
    x = self.config.batch_norm(train, name="bn")(x)
    x = nn.relu(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


_STEM_CLASSES = {"cifar": CifarStem, "imagenet": ImageNetStem}
assert tuple(_STEM_CLASSES) == checks.STEMS


def make_stem(kind: str, features: int, config: LayerConfig, name: str = "stem") -> nn.Module:
  """The preprocessor ``kind`` (one of :data:`rknet_jax.checks.STEMS`: "cifar" or
  "imagenet") with ``features`` output channels."""
  checks.check_choice("make_stem", "stem", kind, checks.STEMS)
  return _STEM_CLASSES[kind](features, config, name=name)


class ChannelAttention(nn.Module):
  """Channel attention of the attentional transition (paper section 4.2; CliqueNet).

  GAP -> FC(C -> C//2) + ReLU -> FC(C//2 -> C) + sigmoid -> channel-wise product.
  Both FCs have biases (Glorot-uniform weights, zero biases), computed in ``config.dtype``.
  """

  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c < 2:
      raise ValueError(f"ChannelAttention needs at least 2 channels, got {c}")

    def dense(n, name):
      return nn.Dense(
        n, kernel_init=glorot_uniform, dtype=self.config.dtype, param_dtype=jnp.float32, name=name
      )

    z = jnp.mean(x, axis=(1, 2))
    z = nn.relu(dense(c // 2, "fc1")(z))
    z = nn.sigmoid(dense(c, "fc2")(z))
    return x * z[:, None, None, :].astype(x.dtype)


class Transition(nn.Module):
  """Transition between periods: BN -> ReLU -> 1x1 conv -> [attention] -> 2x2 avg pool.

  The conv is followed by dropout at ``config.dropout_rate``.

  Attributes:
    features: output channels (m_{n+1} k_{n+1} in an RKNet).
    attention: add :class:`ChannelAttention` after the conv (suffix "A").
    config: shared layer options.
  """

  features: int
  attention: bool = False
  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, x, train: bool):
    x = BNReLUConv(self.features, (1, 1), config=self.config, name="bn_relu_conv")(x, train)
    if self.attention:
      x = ChannelAttention(self.config, name="attention")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Postprocessor(nn.Module):
  """Postprocessor and classifier (paper section 3.2 and 4.2).

  For each feature map in ``features`` (one per used period): BN -> ReLU -> global average
  pool; the pooled vectors are concatenated (the multiscale feature strategy when there are
  several), then one fully connected layer with bias gives the logits.  Pooling and the FC
  run in float32, so the logits are float32 whatever the compute dtype.
  """

  num_classes: int
  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, features: Sequence[Any], train: bool):
    pooled = []
    for i, x in enumerate(features):
      x = self.config.batch_norm(train, name=f"bn_{i}")(x)
      x = nn.relu(x)
      pooled.append(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
    z = jnp.concatenate(pooled, axis=-1) if len(pooled) > 1 else pooled[0]
    return nn.Dense(
      self.num_classes,
      kernel_init=glorot_uniform,
      bias_init=nn.initializers.zeros,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      name="fc",
    )(z)
