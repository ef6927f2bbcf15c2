"""A dense block on one preallocated channel buffer, with memory linear in its depth.

Pure JAX (no Flax): the numerics of :class:`rknet_jax.blocks.DenseBlock`, which declares the
variables and calls :func:`dense_block`.

A dense block (Huang et al. 2017; the ERK time-step of paper section 3.3.1) of L layers at
growth rate k on an input of c_0 channels: layer l (0-based) reads the concatenation of the
input and the l earlier growths, c_l = c_0 + l k channels, and writes k new ones.  The
concatenations are prefixes of one buffer of c_0 + L k channels: layer l reads channels
``[0, c_l)`` and writes ``[c_l, c_l + k)``, so the forward pass is one slice and one in-place
``dynamic_update_slice`` per layer (linear program size, no quadratic concatenations).

A layer is BN -> ReLU -> conv [-> dropout] on its prefix ("plain": 3x3 conv to k), or, with a
bottleneck of width w, BN -> ReLU -> 1x1 conv to w [-> dropout] -> BN -> ReLU -> 3x3 conv to
k [-> dropout].  Later layers never overwrite a channel, so every layer's input is a prefix of
the *final* buffer.  The backward pass (a :func:`jax.custom_vjp`) uses exactly that: it keeps
the final buffer, the bottleneck outputs (w channels per layer) and the BatchNorm batch
statistics, and rebuilds each layer's BN -> ReLU of its prefix from the final buffer when it
reaches that layer, walking the layers in reverse and accumulating the buffer's gradient in
place.  No layer's concatenation or BN -> ReLU output is stored (the memory-efficient DenseNet
of Pleiss et al. 2017: "shared storage", recomputed in the backward pass); convolutions are
not recomputed (XLA drops the unused forward results of the re-linearised layers).  Memory
is linear in L; the extra work is one elementwise BN -> ReLU per layer.  The backward pass
runs as reverse scans over *buckets* of consecutive layers of similar input width
(:meth:`DenseBlockPlan.buckets`; each layer's first kernel zero-padded to its bucket's
widest prefix): in straight-line code XLA:CPU hoists every rebuild to the start of the
backward pass (quadratic memory again; optimisation barriers do not survive its pipeline),
inside a loop body it cannot.  The training forward pass scans the same buckets (one
compiled body per bucket); the eval-mode forward pass runs each layer on its exact width.

Same values as the concatenation formulation: BatchNorm arithmetic is flax's
(:mod:`rknet_jax.batch_norm`), dropout is :func:`rknet_jax.dropout.dropout` with the caller's keys
(``flax.linen.Dropout``'s values).  The batch statistics returned for the running averages are not
differentiated (their cotangents are ignored): BatchNorm running averages are never part of
a loss.
"""

from collections.abc import Sequence
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from rknet_jax import batch_norm as bn_math
from rknet_jax import conv as conv_lib
from rknet_jax import dropout as dropout_lib

__all__ = ["DenseBlockPlan", "BNVars", "ConvUnitVars", "LayerVars", "dense_block"]


BUCKET_WIDTH_RATIO = 1.25
"""Largest ratio of input widths within one backward scan (see ``DenseBlockPlan.buckets``)."""


@dataclasses.dataclass(frozen=True)
class DenseBlockPlan:
  """The static shape of a dense block (hashable: a non-differentiated argument).

  Attributes:
    in_channels: c_0.
    num_layers: L.
    growth_rate: k.
    bottleneck_width: w, or None for plain layers.
    train: BatchNorm on batch statistics (and dropout) or on running averages.
    epsilon: BatchNorm epsilon.
    dtype: compute dtype (numpy dtype name) of the activations.
    conv_impl: convolution formulation (:func:`rknet_jax.conv.resolve_impl`, resolved).
    dropout_rate: dropout after every convolution in training (0: none).
  """

  in_channels: int
  num_layers: int
  growth_rate: int
  bottleneck_width: int | None
  train: bool
  epsilon: float
  dtype: str
  conv_impl: str
  dropout_rate: float = 0.0

  def in_width(self, layer: int) -> int:
    """c_l: the input channels of layer ``layer`` (0-based)."""
    return self.in_channels + layer * self.growth_rate

  def buckets(self):
    """Consecutive layer ranges ``[(a, b), ...]`` whose input widths are within
    :data:`BUCKET_WIDTH_RATIO` of the range's first: the backward pass runs each range as
    one scan, reading the range's widest prefix (padding the narrower layers' kernels with
    zero rows: at most that ratio of extra work on their first convolution)."""
    out, a = [], 0
    for l in range(1, self.num_layers + 1):
      if l == self.num_layers or self.in_width(l) > BUCKET_WIDTH_RATIO * self.in_width(a):
        out.append((a, l))
        a = l
    return tuple(out)

  @property
  def out_channels(self) -> int:
    """c_0 + L k: the buffer's channels."""
    return self.in_width(self.num_layers)

  @property
  def dropout(self) -> bool:
    return self.train and self.dropout_rate > 0.0


class BNVars(NamedTuple):
  """One BatchNorm's values: params ``scale``, ``bias``; running ``mean``, ``var``."""

  scale: Any
  bias: Any
  mean: Any
  var: Any


class ConvUnitVars(NamedTuple):
  """BN -> ReLU -> conv: the BatchNorm, the HWIO kernel, and the dropout key (or None)."""

  bn: BNVars
  kernel: Any
  dropout_key: Any = None


class LayerVars(NamedTuple):
  """A dense layer: ``first`` reads the prefix (1x1 to w, or 3x3 to k when plain);
  ``second`` is the bottleneck's 3x3 unit (None for plain layers)."""

  first: ConvUnitVars
  second: ConvUnitVars | None = None


def _unit(plan: DenseBlockPlan, x, scale, bias, kernel, stats, key):
  """BN -> ReLU -> conv [-> dropout] of ``x``; returns (output, (batch mean, batch var)).

  ``stats`` is the (mean, var) pair to normalise with in eval mode (ignored in training,
  where the batch's own statistics are used and returned)."""
  dtype = jnp.dtype(plan.dtype)
  mean, var = bn_math.moments(x) if plan.train else stats
  a = jax.nn.relu(bn_math.normalize(x, mean, var, scale, bias, plan.epsilon, dtype))
  y = conv_lib.conv2d(a, kernel.astype(dtype), impl=plan.conv_impl)
  if plan.dropout:
    y = dropout_lib.dropout(y, plan.dropout_rate, key)
  return y, (mean, var)


def _unit_args(u: ConvUnitVars):
  return u.bn.scale, u.bn.bias, u.kernel, (u.bn.mean, u.bn.var), u.dropout_key


def _layer_forward(plan, buf, width, c, lv: LayerVars):
  """One layer reading ``buf[..., :width]`` (``width`` >= c, the layer's own input width,
  its kernel padded to it) and writing channels ``[c, c + k)``; returns (buf, stats, h)."""
  out, s1 = _unit(plan, buf[..., :width], *_unit_args(lv.first))
  stats, h = (s1,), None
  if lv.second is not None:
    h = out
    out, s2 = _unit(plan, h, *_unit_args(lv.second))
    stats = (s1, s2)
  buf = lax.dynamic_update_slice_in_dim(buf, out.astype(buf.dtype), c, axis=3)
  return buf, stats, h


def _scan_forward(plan, width, buf, xs):
  """Scan body of a bucket's forward pass: ``xs`` = (input width c, LayerVars)."""
  c, lv = xs
  buf, layer_stats, hl = _layer_forward(plan, buf, width, c, lv)
  return buf, (layer_stats, hl)


def _stack_padded(arrays, width: int, axis: int, value: float = 0.0):
  """``arrays`` (equal shapes but for ``axis``) padded to ``width`` along ``axis`` with
  ``value`` and stacked on a new leading axis, as ONE concatenation (per-layer pads would
  each be a kernel of their own, and compile time grows with the number of kernels)."""
  shape = arrays[0].shape
  lead, trail = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
  parts = []
  for v in arrays:
    parts.append(v.reshape(lead, v.shape[axis] * trail))
    if v.shape[axis] < width:
      parts.append(jnp.full((lead, (width - v.shape[axis]) * trail), value, v.dtype))
  out = jnp.concatenate(parts, axis=1).reshape((lead, len(arrays), width * trail))
  out = jnp.moveaxis(out, 1, 0)
  return out.reshape((len(arrays),) + shape[:axis] + (width,) + shape[axis + 1 :])


def _stack(trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _bucket_vars(plan: DenseBlockPlan, layers, a: int, b: int, with_stats: bool):
  """Layers a..b-1 stacked (leading axis), their first units read from the bucket's widest
  prefix: zero kernel rows and zero scale/bias for the channels a layer does not read (no
  effect on its output, zero gradient), running statistics (eval mode only) mean 0, var 1."""
  width = plan.in_width(b - 1)
  firsts = [layers[l].first for l in range(a, b)]

  def vec(field, value=0.0):
    return _stack_padded([getattr(u.bn, field) for u in firsts], width, 0, value)

  bn = BNVars(
    vec("scale"),
    vec("bias"),
    vec("mean") if with_stats else None,
    vec("var", 1.0) if with_stats else None,
  )
  keys = None if firsts[0].dropout_key is None else jnp.stack([u.dropout_key for u in firsts])
  first = ConvUnitVars(bn, _stack_padded([u.kernel for u in firsts], width, 2), keys)
  second = None
  if layers[a].second is not None:
    second = _stack([layers[l].second for l in range(a, b)])
    if not with_stats:
      second = second._replace(bn=second.bn._replace(mean=None, var=None))
  return LayerVars(first, second)


def _offsets(plan, a, b):
  return jnp.asarray([plan.in_width(l) for l in range(a, b)], jnp.int32)


def _forward(plan: DenseBlockPlan, x, layers: Sequence[LayerVars], for_backward: bool):
  """(buffer, per-layer batch statistics, per bucket: bottleneck outputs and stacked vars).

  In training each bucket of several layers is one scan (compile time grows with the
  number of buckets, not of layers); in eval mode every layer runs on its exact width
  (no padding: the paper's FLOPs, and no backward pass to save memory for).  The stacked
  bucket variables are built only where a scan or the backward pass needs them."""
  n, h, w, _ = x.shape
  dtype = jnp.result_type(x.dtype, jnp.dtype(plan.dtype))
  buf = jnp.zeros((n, h, w, plan.out_channels), dtype)
  buf = lax.dynamic_update_slice_in_dim(buf, x.astype(dtype), 0, axis=3)
  stats, hidden, bucket_vars = [], [], []
  for a, b in plan.buckets():
    scanned = b - a > 1
    bv = None
    if scanned and (plan.train or for_backward):
      bv = _bucket_vars(plan, layers, a, b, with_stats=not plan.train)
    bucket_vars.append(bv)
    if not plan.train or not scanned:
      hs = []
      for l in range(a, b):
        buf, layer_stats, hl = _layer_forward(
          plan, buf, plan.in_width(l), plan.in_width(l), layers[l]
        )
        stats.append(layer_stats)
        hs.append(hl)
      hidden.append(jnp.stack(hs) if for_backward and hs[0] is not None else None)
      continue

    body = functools.partial(_scan_forward, plan, plan.in_width(b - 1))
    buf, (bucket_stats, hl) = lax.scan(body, buf, (_offsets(plan, a, b), bv))
    hidden.append(hl)
    for j, l in enumerate(range(a, b)):
      c = plan.in_width(l)
      layer_stats = jax.tree.map(lambda v, j=j: v[j], bucket_stats)
      stats.append(((layer_stats[0][0][:c], layer_stats[0][1][:c]),) + layer_stats[1:])
  return buf, tuple(stats), (tuple(hidden), tuple(bucket_vars))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense_block(plan, x, layers):
  buf, stats, _ = _forward(plan, x, layers, for_backward=False)
  return buf, stats


def _dense_block_fwd(plan, x, layers):
  buf, stats, (hidden, bucket_vars) = _forward(plan, x, layers, for_backward=True)
  single = tuple(
    None if bv is not None else layers[a] for (a, _), bv in zip(plan.buckets(), bucket_vars)
  )
  return (buf, stats), (buf, hidden, bucket_vars, single, jnp.zeros((), x.dtype))


def _unit_vjp(plan, x, u: ConvUnitVars, ct):
  """Cotangents of (x, scale, bias, kernel) of one BN -> ReLU -> conv unit, rebuilding
  its BN -> ReLU from ``x`` (the forward convolution is dead code XLA removes)."""
  stats, key = (u.bn.mean, u.bn.var), u.dropout_key

  def f(x, scale, bias, kernel):
    return _unit(plan, x, scale, bias, kernel, stats, key)[0]

  _, vjp = jax.vjp(f, x, u.bn.scale, u.bn.bias, u.kernel)
  dx, dscale, dbias, dkernel = vjp(ct.astype(jnp.dtype(plan.dtype)))
  return dx, ConvUnitVars(BNVars(dscale, dbias, None, None), dkernel, None)


def _unpad_unit(d: ConvUnitVars, width: int) -> ConvUnitVars:
  return ConvUnitVars(
    BNVars(d.bn.scale[:width], d.bn.bias[:width], None, None), d.kernel[:, :, :width], None
  )


def _in_loop(plan: DenseBlockPlan) -> DenseBlockPlan:
  """The plan for backward scan bodies.  XLA:CPU runs the 3x3 kernel-gradient convolution
  inside a loop body with its generic emitter (about 10 times slower than the same
  convolution outside a loop, measured on ERKNet-6x1 6x1 6x1-B), so on CPU ("dot1x1") the
  bodies use the shifted-dot formulation ``"dot"`` of :mod:`rknet_jax.conv` (same values,
  its kernel gradient is matrix products); XLA's native convolution elsewhere."""
  if plan.conv_impl == "dot1x1":
    return dataclasses.replace(plan, conv_impl="dot")
  return plan


def _layer_bwd(plan, buf, width, dbuf, xs):
  """One layer's backward step: (dbuf, (first, second) cotangents).  ``xs`` = (the layer's
  input width c, its LayerVars read from ``width`` channels, its bottleneck output)."""
  c, lv, h = xs
  ct = lax.dynamic_slice_in_dim(dbuf, c, plan.growth_rate, axis=3)
  dsecond = None
  if lv.second is not None:
    ct, dsecond = _unit_vjp(plan, h, lv.second, ct)
  # The layer's input, rebuilt from the final buffer (channels it does not read meet zero
  # kernel rows: no effect on its output, zero gradient).
  dprefix, dfirst = _unit_vjp(plan, buf[..., :width], lv.first, ct)
  dbuf = lax.dynamic_update_slice_in_dim(
    dbuf, dbuf[..., :width] + dprefix.astype(dbuf.dtype), 0, axis=3
  )
  return dbuf, (dfirst, dsecond)


def _zero_accumulators(layer_bwd, dbuf, xs, num_layers: int):
  """Zeros shaped as ``num_layers`` stacked parameter cotangents of ``layer_bwd``."""
  one = jax.tree.map(lambda v: v[0], xs)
  grads = jax.eval_shape(layer_bwd, dbuf, one)[1]
  return jax.tree.map(lambda g: jnp.zeros((num_layers,) + g.shape, g.dtype), grads)


def _accumulating(layer_bwd, carry, xs):
  """``layer_bwd`` (:func:`_layer_bwd` with its first arguments bound) as a scan body that
  adds the layer's parameter cotangents into row ``j`` (its index in the bucket) of
  zero-initialised stacked accumulators carried through the loop, instead of emitting them
  as per-iteration outputs.  Same values (0 + g = g).  On a data-sharded batch a
  loop-carried sum is the pattern XLA's while-loop all-reduce code motion recognises: the
  batch reduction of the bucket's kernel gradients leaves the loop and runs once per
  bucket instead of once per layer (``benchmarks/README.md``, "TPU pods ahead of time")."""
  dbuf, acc = carry
  j, *layer_xs = xs
  dbuf, grads = layer_bwd(dbuf, tuple(layer_xs))
  acc = jax.tree.map(
    lambda a, g: lax.dynamic_update_index_in_dim(
      a, lax.dynamic_index_in_dim(a, j, keepdims=False) + g, j, 0
    ),
    acc,
    grads,
  )
  return (dbuf, acc), None


def _dense_block_bwd(plan, res, cts):
  """Reverse pass, bucket by bucket from the last: a reverse scan over the bucket's layers
  (one compiled body per bucket, its layers' first units padded to the bucket's width)."""
  buf, stacked_hidden, bucket_vars, single, x_like = res
  dbuf = cts[0]  # the statistics' cotangents are ignored (never part of a loss)
  dlayers = [None] * plan.num_layers

  for (a, b), hid, bv, lv in reversed(
    list(zip(plan.buckets(), stacked_hidden, bucket_vars, single))
  ):
    if bv is None:  # a bucket of one layer, on its exact width
      dbuf, (dfirst, dsecond) = _layer_bwd(
        plan, buf, plan.in_width(a), dbuf, (plan.in_width(a), lv, None if hid is None else hid[0])
      )
      dlayers[a] = LayerVars(dfirst, dsecond)
      continue
    xs = (_offsets(plan, a, b), bv, hid)
    body = functools.partial(_layer_bwd, _in_loop(plan), buf, plan.in_width(b - 1))
    zeros = _zero_accumulators(body, dbuf, xs, b - a)
    (dbuf, (dfirst, dsecond)), _ = lax.scan(
      functools.partial(_accumulating, body), (dbuf, zeros), (jnp.arange(b - a),) + xs, reverse=True
    )
    for j, l in enumerate(range(a, b)):
      first = jax.tree.map(lambda v, j=j: v[j], dfirst)
      second = None if dsecond is None else jax.tree.map(lambda v, j=j: v[j], dsecond)
      dlayers[l] = LayerVars(_unpad_unit(first, plan.in_width(l)), second)
  dx = dbuf[..., : plan.in_channels].astype(x_like.dtype)
  return dx, tuple(dlayers)


_dense_block.defvjp(_dense_block_fwd, _dense_block_bwd)


def dense_block(plan: DenseBlockPlan, x, layers: Sequence[LayerVars]):
  """Applies a dense block; returns ``(buffer, batch_stats)``.

  Args:
    plan: the block's static shape and options.
    x: ``(N, H, W, c_0)`` block input.
    layers: one :class:`LayerVars` per layer: layer l's first kernel has c_l input channels
      (``(1, 1, c_l, w)`` with a bottleneck, else ``(3, 3, c_l, k)``), its BatchNorm c_l
      entries; dropout keys are needed only with ``plan.dropout``.

  Returns:
    ``buffer``: ``(N, H, W, c_0 + L k)``, the concatenation ``[x, g_1, .., g_L]`` of the input
    and the growths, in the wider of ``x.dtype`` and ``plan.dtype``.  ``batch_stats``: per
    layer, a tuple of (mean, var) pairs (one per BatchNorm, float32): the batch statistics in
    training (not differentiated), the running ones passed in otherwise.
  """
  layers = tuple(layers)
  if len(layers) != plan.num_layers:
    raise ValueError(f"dense_block: {len(layers)} layers given, the plan has {plan.num_layers}")
  if x.shape[-1] != plan.in_channels:
    raise ValueError(f"dense_block: input has {x.shape[-1]} channels, the plan {plan.in_channels}")
  for l, lv in enumerate(layers):
    if lv.first.kernel.shape[2] != plan.in_width(l):
      raise ValueError(
        f"dense_block: layer {l + 1}'s kernel reads {lv.first.kernel.shape[2]} "
        f"channels, its input has {plan.in_width(l)}"
      )
    if (lv.second is None) != (plan.bottleneck_width is None):
      raise ValueError(
        f"dense_block: layer {l + 1} does not match the plan's bottleneck "
        f"width {plan.bottleneck_width}"
      )
  return _dense_block(plan, x, layers)
