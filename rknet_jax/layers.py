"""Pre-activation layers, stems, transitions and the classifier head of RKNets.

Everything here follows ``shared/paper/ARCHITECTURE.md`` ("Around the periods") and
section 3.2 / 4.2 of the paper:

* :class:`BNReLUConv` -- the pre-activation unit BN -> ReLU -> conv [-> dropout] applied to
  the channel concatenation of its inputs (the building brick of dense and clique blocks).
* :class:`BNReLUKernelConv` -- the same with a kernel handed in by the caller, so that a
  clique block can share (slices of) one set of filters between its two passes.
* :class:`BatchNormParts` -- BatchNorm of a channel concatenation computed part by part.
* :class:`CifarStem`, :class:`ImageNetStem` -- the preprocessors.
* :class:`ChannelAttention`, :class:`Transition` -- the (attentional) transition layers.
* :class:`Postprocessor` -- per-period BN -> ReLU -> global average pool, with or without
  the multiscale feature strategy, then one fully connected layer with bias.

Every convolution goes through :mod:`rknet_jax.conv` (He-normal fan-in, not truncated,
bias-free).  BatchNorm parameters are float32 whatever the compute ``dtype``.

Rematerialisation: :func:`maybe_remat` wraps a layer class in :func:`flax.linen.remat`
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

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from rknet_jax import conv as conv_lib

__all__ = [
    "BatchNorm", "BatchNormParts", "concat", "BNReLUConv", "BNReLUKernelConv", "maybe_remat", "CifarStem",
    "ImageNetStem", "ChannelAttention", "Transition", "Postprocessor", "glorot_uniform",
    "DEFAULT_BN_MOMENTUM", "DEFAULT_BN_EPSILON",
]

DEFAULT_BN_MOMENTUM = 0.9
"""Running-average decay of BatchNorm (flax convention; PyTorch's momentum 0.1)."""
DEFAULT_BN_EPSILON = 1e-5
"""BatchNorm epsilon (the PyTorch / authors' code default)."""

glorot_uniform = nn.initializers.xavier_uniform()
"""FC initialiser of the paper (section 4.1: Xavier, Glorot & Bengio 2010)."""


def concat(inputs):
  """Channel concatenation (NHWC) of an array or a sequence of arrays."""
  if isinstance(inputs, (list, tuple)):
    return inputs[0] if len(inputs) == 1 else jnp.concatenate(inputs, axis=-1)
  return inputs


def BatchNorm(train: bool, momentum: float, epsilon: float, dtype: Any,
              name: Optional[str] = None) -> nn.BatchNorm:
  """BatchNorm with float32 scale/bias (both trainable) and running statistics."""
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


class BatchNormParts(nn.Module):
  """BatchNorm of the channel concatenation of ``inputs``, computed part by part.

  The same variables as :func:`BatchNorm` applied to ``concat(inputs)`` (params ``scale``,
  ``bias``; batch_stats ``mean``, ``var``; one entry per channel of the concatenation, in
  order) and flax's arithmetic (float32 statistics, fast variance E[x^2] - E[x]^2 clipped
  at 0, running averages updated in training but not at initialisation).  Statistics are
  per channel, so each part's statistics are exactly the concatenation's for its channels,
  and each part is normalised with its slice of the same scale/bias/mean/var; only the
  per-channel vectors are concatenated (for the running averages).

  Returns the list of normalised parts (in ``dtype``), one per input.
  """
  momentum: float = DEFAULT_BN_MOMENTUM
  epsilon: float = DEFAULT_BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[Any], train: bool):
    xs = list(inputs)
    if not xs:
      raise ValueError("BatchNormParts needs at least one input")
    channels = [x.shape[-1] for x in xs]
    c = sum(channels)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if train:
      stat_dtype = jnp.promote_types(self.dtype, jnp.float32)
      means, variances = [], []
      for x in xs:
        x = x.astype(stat_dtype)
        axes = tuple(range(x.ndim - 1))
        mu, mu2 = jnp.mean(x, axes), jnp.mean(lax.square(x), axes)
        means.append(mu)
        variances.append(jnp.maximum(0.0, mu2 - lax.square(mu)))
      if not self.is_initializing():
        ra_mean.value = (self.momentum * ra_mean.value
                         + (1 - self.momentum) * jnp.concatenate(means))
        ra_var.value = (self.momentum * ra_var.value
                        + (1 - self.momentum) * jnp.concatenate(variances))
    else:
      means = _split(ra_mean.value, channels)
      variances = _split(ra_var.value, channels)
    scales = _split(self.param("scale", nn.initializers.ones, (c,), jnp.float32), channels)
    biases = _split(self.param("bias", nn.initializers.zeros, (c,), jnp.float32), channels)
    out = []
    for x, mu, var, scale, bias in zip(xs, means, variances, scales, biases):
      mul = lax.rsqrt(var + self.epsilon) * scale
      out.append(((x - mu) * mul + bias).astype(self.dtype))
    return out


def _split(v, sizes):
  """``v`` cut into consecutive slices of the given sizes (static slices)."""
  out, offset = [], 0
  for n in sizes:
    out.append(v[offset:offset + n])
    offset += n
  return out


class _ConvKernel(nn.Module):
  """Declares the ``kernel`` parameter :class:`rknet_jax.conv.Conv` would (same name,
  shape, initialiser and rng), for convolutions computed by the caller."""
  shape: Sequence[int]

  @nn.compact
  def __call__(self):
    return self.param("kernel", conv_lib.he_normal, tuple(self.shape), jnp.float32)


def _as_list(inputs):
  return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]


def _dropout(x, rate: float, train: bool):
  # Built only when rate > 0, so models without dropout need no 'dropout' rng.
  if rate > 0.0:
    x = nn.Dropout(rate=rate, deterministic=not train)(x)
  return x


def _per_part(xs, kernel_size, strides) -> bool:
  """Whether BN -> ReLU -> conv of the concatenation of ``xs`` runs part by part.

  Only for a 1x1 stride-1 conv of several inputs, and only where the convolution
  formulation is not XLA's native one (``rknet_jax.conv.resolve_impl() != "xla"``, i.e. the
  CPU under ``impl="auto"``): there it saves memory and time (benchmarks/README.md), while
  on GPU/TPU the single concatenation compiles several times faster for deep blocks
  (ERKNet-3x1 3x1 3x1 1x1-B train step: 41 s vs 109 s on CPU, benchmarks/bench_compile.py).
  Both paths have the same variables, values and gradients.
  """
  return (len(xs) > 1 and tuple(kernel_size) == (1, 1) and tuple(strides) == (1, 1)
          and conv_lib.resolve_impl() != "xla")


def _bn_relu_conv(xs, kernel, strides, train, dropout_rate, bn_momentum, bn_epsilon, dtype):
  """concat(xs) -> BN -> ReLU -> conv with HWIO ``kernel`` [-> dropout], inside the calling
  module (its submodule ``bn``): part by part where :func:`_per_part` says so, else on the
  concatenation (built here, so that under remat it is recomputed rather than stored)."""
  if _per_part(xs, kernel.shape[:2], strides):
    hs = BatchNormParts(bn_momentum, bn_epsilon, dtype, name="bn")(xs, train)
    x = conv_lib.conv1x1_concat([nn.relu(h) for h in hs], kernel.astype(dtype))
  else:
    x = BatchNorm(train, bn_momentum, bn_epsilon, dtype, name="bn")(concat(xs))
    x = conv_lib.conv2d(nn.relu(x).astype(dtype), kernel.astype(dtype), strides)
  return _dropout(x, dropout_rate, train)


class BNReLUConv(nn.Module):
  """Pre-activation unit on a concatenation: concat -> BN -> ReLU -> conv [-> dropout].

  The dense layer of DenseNet (Huang et al. 2017) and of the ERK time-step (paper section
  3.3.1, Figure 2).  ``inputs`` may be one array or a sequence of NHWC arrays that are
  concatenated on channels first (inside this module, so that under remat the concatenation
  is recomputed rather than stored).  For a 1x1 stride-1 conv on several inputs the
  concatenation is not built (on CPU, see ``_per_part``): BN and ReLU run part by part (:class:`BatchNormParts`) and
  the conv is a sum of per-part 1x1 filters (:func:`rknet_jax.conv.conv1x1_concat`); same
  variables (``bn/{scale,bias,mean,var}``, ``conv/kernel``), values and gradients.

  Attributes:
    features: output channels.
    kernel_size: conv window.
    strides: conv strides.
    dropout_rate: dropout after the conv (0 = none).
    bn_momentum, bn_epsilon: BatchNorm settings.
    dtype: compute dtype.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  dropout_rate: float = 0.0
  bn_momentum: float = DEFAULT_BN_MOMENTUM
  bn_epsilon: float = DEFAULT_BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, train: bool):
    xs = _as_list(inputs)
    kh, kw = self.kernel_size
    kernel = _ConvKernel((kh, kw, sum(x.shape[-1] for x in xs), self.features), name="conv")()
    return _bn_relu_conv(xs, kernel, tuple(self.strides), train, self.dropout_rate,
                         self.bn_momentum, self.bn_epsilon, self.dtype)


class BNReLUKernelConv(nn.Module):
  """concat -> BN -> ReLU -> conv with a caller-supplied HWIO ``kernel`` [-> dropout].

  Used by the clique block (paper section 3.3.2): the kernel is the concatenation, along
  its input-feature axis, of the shared filters W_ji of the stages that feed stage i (a
  filter on a concatenation equals the sum of one filter per input), so the same W_ji
  serve both passes while each pass has its own BatchNorm (this module's ``bn``).  With a
  1x1 kernel and several inputs, BN -> ReLU -> conv runs part by part as in
  :class:`BNReLUConv` (same variables and values).
  """
  dropout_rate: float = 0.0
  bn_momentum: float = DEFAULT_BN_MOMENTUM
  bn_epsilon: float = DEFAULT_BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, kernel, train: bool):
    xs = _as_list(inputs)
    c = sum(x.shape[-1] for x in xs)
    if c != kernel.shape[2]:
      raise ValueError(f"BNReLUKernelConv: input has {c} channels but the kernel "
                       f"expects {kernel.shape[2]}")
    return _bn_relu_conv(xs, kernel, (1, 1), train, self.dropout_rate, self.bn_momentum,
                         self.bn_epsilon, self.dtype)


def maybe_remat(layer_cls, remat: bool, train_argnum: int):
  """``layer_cls`` itself, or wrapped in :func:`flax.linen.remat` (jax.checkpoint).

  ``train_argnum`` is the position of ``train`` in ``__call__`` counting ``self`` as 0
  (flax's convention for ``static_argnums``).
  """
  if not remat:
    return layer_cls
  return nn.remat(layer_cls, static_argnums=(train_argnum,))


class CifarStem(nn.Module):
  """CIFAR/SVHN preprocessor: one 3x3 conv, 3 -> ``features``, no BN, no bias."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return conv_lib.Conv(self.features, (3, 3), dtype=self.dtype, name="conv")(x)


class ImageNetStem(nn.Module):
  """ImageNet preprocessor: 7x7/2 conv -> BN -> ReLU -> 3x3/2 max-pool (224 -> 56)."""
  features: int
  bn_momentum: float = DEFAULT_BN_MOMENTUM
  bn_epsilon: float = DEFAULT_BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv_lib.Conv(self.features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                      dtype=self.dtype, name="conv")(x)
    x = BatchNorm(train, self.bn_momentum, self.bn_epsilon, self.dtype, name="bn")(x)
    x = nn.relu(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def make_stem(kind: str, features: int, bn_momentum: float, bn_epsilon: float, dtype,
              name: str = "stem") -> nn.Module:
  """The preprocessor ``kind`` ("cifar" or "imagenet") with ``features`` output channels."""
  if kind == "cifar":
    return CifarStem(features, dtype=dtype, name=name)
  if kind == "imagenet":
    return ImageNetStem(features, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                        dtype=dtype, name=name)
  raise ValueError(f"stem={kind!r}: expected 'cifar' or 'imagenet'")


class ChannelAttention(nn.Module):
  """Channel attention of the attentional transition (paper section 4.2; CliqueNet).

  GAP -> FC(C -> C//2) + ReLU -> FC(C//2 -> C) + sigmoid -> channel-wise product.
  Both FCs have biases (Glorot-uniform weights, zero biases).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c < 2:
      raise ValueError(f"ChannelAttention needs at least 2 channels, got {c}")
    z = jnp.mean(x, axis=(1, 2))
    z = nn.Dense(c // 2, kernel_init=glorot_uniform, dtype=self.dtype,
                 param_dtype=jnp.float32, name="fc1")(z)
    z = nn.relu(z)
    z = nn.Dense(c, kernel_init=glorot_uniform, dtype=self.dtype,
                 param_dtype=jnp.float32, name="fc2")(z)
    z = nn.sigmoid(z)
    return x * z[:, None, None, :].astype(x.dtype)


class Transition(nn.Module):
  """Transition between periods: BN -> ReLU -> 1x1 conv -> [attention] -> 2x2 avg pool.

  Attributes:
    features: output channels (m_{n+1} k_{n+1} in an RKNet).
    attention: add :class:`ChannelAttention` after the conv (suffix "A").
    dropout_rate: dropout after the conv.
  """
  features: int
  attention: bool = False
  dropout_rate: float = 0.0
  bn_momentum: float = DEFAULT_BN_MOMENTUM
  bn_epsilon: float = DEFAULT_BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = BNReLUConv(self.features, (1, 1), dropout_rate=self.dropout_rate,
                   bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                   dtype=self.dtype, name="bn_relu_conv")(x, train)
    if self.attention:
      x = ChannelAttention(dtype=self.dtype, name="attention")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Postprocessor(nn.Module):
  """Postprocessor and classifier (paper section 3.2 and 4.2).

  For each feature map in ``features`` (one per used period): BN -> ReLU -> global average
  pool; the pooled vectors are concatenated (the multiscale feature strategy when there are
  several), then one fully connected layer with bias gives the logits.  Pooling and the FC
  run in float32, so the logits are float32 whatever the compute dtype.
  """
  num_classes: int
  bn_momentum: float = DEFAULT_BN_MOMENTUM
  bn_epsilon: float = DEFAULT_BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Any], train: bool):
    pooled = []
    for i, x in enumerate(features):
      x = BatchNorm(train, self.bn_momentum, self.bn_epsilon, self.dtype, name=f"bn_{i}")(x)
      x = nn.relu(x)
      pooled.append(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
    z = jnp.concatenate(pooled, axis=-1) if len(pooled) > 1 else pooled[0]
    return nn.Dense(self.num_classes, kernel_init=glorot_uniform,
                    bias_init=nn.initializers.zeros, dtype=jnp.float32,
                    param_dtype=jnp.float32, name="fc")(z)
