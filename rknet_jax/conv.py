"""2-D convolution used by every RKNet layer.

All convolutions of the models go through :class:`Conv` / :func:`conv2d`, so the kernel
formulation is chosen in one place.  Every formulation computes the same function and
the same gradients (input and kernel) as ``lax.conv_general_dilated`` with NHWC
activations and HWIO kernels; they differ only in how XLA is asked to compute them:

``"xla"``
  XLA's native convolution for the forward pass and both gradients.  The right choice
  on GPU/TPU, where XLA calls cuDNN-class kernels.
``"dot1x1"``
  1x1 convolutions as one ``dot_general`` over channels (after the stride's
  subsampling); everything else as ``"xla"``.
``"dot"``
  ``"dot1x1"`` plus, for stride-1 kxk convolutions (k > 1), XLA's native convolution
  for the forward pass and the input gradient, and a custom VJP for the *kernel*
  gradient (:func:`_kernel_grad_shifted_dots`): one matrix product of row-shifted
  inputs with column-shifted output gradients instead of XLA's convolution with a
  32x32 "kernel" and 3x3 "output".  Measured on a 2-core CPU (benchmarks/README.md) it
  is *slower* than XLA's own kernel gradient once page faults are out of the picture
  (the shifted copies cost more than the layout copies XLA makes), so it is an
  opt-in experiment, not the CPU default.
``"auto"`` (the default)
  ``"dot1x1"`` on the CPU (the fastest formulation measured there for the paper's CIFAR
  models), ``"xla"`` on GPU/TPU; decided by :func:`resolve_impl`, from JAX's default backend
  when the function is traced, or from the target devices' platform where the caller
  resolves it first (the runner does for its mesh: ``experiments/steps.py``).

There is no module-level default to change: the formulation is an argument (``impl``)
of every function here, and in the models the option ``conv_impl`` (held by
:class:`rknet_jax.layers.LayerConfig`), so a jitted function's formulation is part of
the model it closes over and a cache keyed by the model sees it.  Forward passes always
contain a
``conv_general_dilated`` or ``dot_general`` over the (zero-padded) input, so FLOP
counting by walking the forward jaxpr (``rknet_jax.counting``) sees every
multiply-add, padding included, whatever the formulation.

Initialisation follows the paper (section 4.1): He-normal, fan-in, ReLU gain, *not*
truncated (He et al., 2015).
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from rknet_jax.checks import IMPLS

he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

Padding = str | Sequence[tuple[int, int]]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def resolve_impl(impl: str = "auto", platform: str | None = None) -> str:
  """The concrete formulation (``"xla"``, ``"dot1x1"`` or ``"dot"``) ``impl`` stands for.

  ``"auto"`` means ``"dot1x1"`` on the CPU and ``"xla"`` on GPU/TPU.  ``platform`` is the
  platform the computation is compiled for (a device's ``platform``: ``"cpu"``, ``"gpu"``,
  ``"tpu"``); None means ``jax.default_backend()`` when called, i.e. at trace time.  A
  program compiled for other devices than the host's default backend (a TPU mesh of
  compile-only devices on a CPU host) passes its devices' platform.
  """
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    platform = jax.default_backend() if platform is None else platform
    return "dot1x1" if platform == "cpu" else "xla"
  return impl


def _explicit_padding(padding, in_hw, kernel_hw, strides):
  """``padding`` ("SAME", "VALID" or pairs) as two (low, high) pairs."""
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID' or two (low, high) pairs, got {padding!r}")
    return tuple(lax.padtype_to_pads(in_hw, kernel_hw, strides, padding.upper()))
  pads = tuple(tuple(p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    raise ValueError(f"padding must be 'SAME', 'VALID' or two (low, high) pairs, got {padding!r}")
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def _xla_conv(x, kernel, strides, pads):
  return lax.conv_general_dilated(
    x, kernel, window_strides=strides, padding=pads, dimension_numbers=_DIMENSION_NUMBERS
  )


def _pad_hw(x, pads):
  """Zero-pads (or, for negative pads, crops) the two spatial axes of NHWC ``x``."""
  zero = jnp.zeros((), x.dtype)
  return lax.pad(
    x, zero, ((0, 0, 0), (pads[0][0], pads[0][1], 0), (pads[1][0], pads[1][1], 0), (0, 0, 0))
  )


def _conv1x1_dot(x, kernel, strides, pads):
  """1x1 convolution as a contraction over channels.

  The input is zero-padded first and then subsampled by the stride, so the
  ``dot_general`` runs over exactly the output positions the convolution has (padding
  included, as the paper counts FLOPs).
  """
  if any(p != 0 for pair in pads for p in pair):
    x = _pad_hw(x, pads)
  if strides != (1, 1):
    x = lax.slice(x, (0, 0, 0, 0), x.shape, (1,) + strides + (1,))
  return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))


def _kernel_grad_shifted_dots(x, g, kernel_hw, pads):
  """Kernel gradient of a stride-1 NHWC/HWIO convolution, as one matrix product.

  With ``xp`` the padded input and ``g`` the output gradient,
  ``dW[i, j] = sum_{n,h,w} xp[n, h+i, w+j, :]^T g[n, h, w, :]``.  Both are laid out on the
  padded (Hp, Wp) grid and flattened to L = N*Hp*Wp rows (``g`` zero outside its
  (Ho, Wo) corner).  A shift by (i, j) of ``xp`` is then a shift by i*Wp + j rows, and
  ``dW[i, j] = X_i^T G_j`` with ``X_i`` = rows shifted by i*Wp of ``xp`` and ``G_j`` =
  ``g`` shifted by j rows the other way.  Concatenating the kh row shifts of ``xp`` and
  the kw shifts of ``g`` along channels gives one (kh*C, kw*D) product whose (i, j)
  blocks are the kernel gradient: kh + kw shifted copies instead of kh*kw im2col
  columns, and a single large matmul instead of kh*kw skinny ones.  Accumulates in
  float32.
  """
  kh, kw = kernel_hw
  n, _, _, c = x.shape
  _, ho, wo, d = g.shape
  xp = _pad_hw(x, pads)
  hp, wp = xp.shape[1], xp.shape[2]
  length = n * hp * wp
  # The barriers keep XLA from fusing the pads/reshapes into the concatenations (it
  # would then recompute them per output element, several times slower on CPU).
  xf = lax.optimization_barrier(jnp.pad(xp.reshape(length, c), ((0, (kh - 1) * wp), (0, 0))))
  gf = jnp.pad(g, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(length, d)
  gf = lax.optimization_barrier(jnp.pad(gf, ((kw - 1, 0), (0, 0))))
  xs = lax.concatenate(
    [lax.slice_in_dim(xf, i * wp, i * wp + length, axis=0) for i in range(kh)], 1
  )
  gs = lax.concatenate(
    [lax.slice_in_dim(gf, kw - 1 - j, kw - 1 - j + length, axis=0) for j in range(kw)], 1
  )
  xs, gs = lax.optimization_barrier((xs, gs))
  prod = lax.dot_general(xs, gs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return prod.reshape(kh, c, kw, d).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_custom_kernel_grad(x, kernel, pads):
  return _xla_conv(x, kernel, (1, 1), pads)


def _conv_custom_fwd(x, kernel, pads):
  return _xla_conv(x, kernel, (1, 1), pads), (x, kernel)


def _conv_custom_bwd(pads, residuals, g):
  x, kernel = residuals
  # Input gradient of a stride-1 convolution: the forward convolution of ``g`` with the
  # spatially flipped kernel, input and output features swapped, and the complementary
  # padding.  Written as a plain forward convolution (standard NHWC/HWIO layout), which
  # XLA:CPU runs with its fast convolution also inside loop bodies, where its transposed
  # convolution (the autodiff one) falls back to a generic, far slower emitter.
  kh, kw = kernel.shape[:2]
  back_pads = (
    (kh - 1 - pads[0][0], kh - 1 - pads[0][1]),
    (kw - 1 - pads[1][0], kw - 1 - pads[1][1]),
  )
  dx = _xla_conv(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), (1, 1), back_pads)
  dkernel = _kernel_grad_shifted_dots(x, g, kernel.shape[:2], pads)
  return dx, dkernel.astype(kernel.dtype)


_conv_custom_kernel_grad.defvjp(_conv_custom_fwd, _conv_custom_bwd)


def conv2d(
  x, kernel, strides: Sequence[int] = (1, 1), padding: Padding = "SAME", impl: str = "auto"
):
  """NHWC x HWIO -> NHWC convolution without bias (cross-correlation, as ``lax.conv``).

  Args:
    x: ``(N, H, W, C)`` input.
    kernel: ``(kh, kw, C, D)`` kernel, same dtype as ``x``.
    strides: ``(sh, sw)``.
    padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``.
    impl: formulation (see the module docstring): ``"auto"``, ``"xla"``, ``"dot1x1"``
      or ``"dot"``.

  Returns:
    ``(N, Ho, Wo, D)``, equal (to rounding) to ``lax.conv_general_dilated`` whatever
    ``impl`` is, and with the same gradients.
  """
  resolved = resolve_impl(impl)
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(
      f"conv2d expects NHWC x and HWIO kernel, got shapes {x.shape} and {kernel.shape}"
    )
  if x.shape[3] != kernel.shape[2]:
    raise ValueError(
      f"input channels {x.shape[3]} != kernel input channels "
      f"{kernel.shape[2]} (kernel shape {kernel.shape})"
    )
  strides = tuple(int(s) for s in strides)
  if len(strides) != 2 or min(strides) < 1:
    raise ValueError(f"strides must be two positive ints, got {strides}")
  kernel_hw = tuple(kernel.shape[:2])
  pads = _explicit_padding(padding, x.shape[1:3], kernel_hw, strides)
  if resolved == "xla":
    return _xla_conv(x, kernel, strides, pads)
  if kernel_hw == (1, 1):
    return _conv1x1_dot(x, kernel, strides, pads)
  if resolved == "dot" and strides == (1, 1):
    return _conv_custom_kernel_grad(x, kernel, pads)
  return _xla_conv(x, kernel, strides, pads)


def conv1x1_concat(xs: Sequence[Any], kernel, impl: str = "auto"):
  """Stride-1 1x1 convolution of the channel concatenation of ``xs``, not materialised.

  A filter on a concatenation is the sum of one filter per part (the identity behind
  the paper's reading of dense and clique blocks, section 3.3): with the ``"dot1x1"``
  and ``"dot"`` formulations this computes ``sum_j xs[j] @ kernel[0, 0, rows_j]`` as one
  ``dot_general`` per part, so neither the concatenation nor its gradient (slices
  summed into each part's gradient) is built; ``"xla"`` concatenates and calls
  :func:`conv2d`.  Same result, gradients and FLOP count as
  ``conv2d(concatenate(xs, -1), kernel)``.

  Args:
    xs: NHWC arrays with equal N, H, W (one or more).
    kernel: ``(1, 1, sum of their channels, D)``.
    impl: as :func:`conv2d`.
  """
  xs = list(xs)
  resolved = resolve_impl(impl)
  if not xs:
    raise ValueError("conv1x1_concat needs at least one input")
  if any(x.ndim != 4 or x.shape[:3] != xs[0].shape[:3] for x in xs):
    raise ValueError(
      f"conv1x1_concat inputs must be NHWC with equal N, H, W, got {[x.shape for x in xs]}"
    )
  channels = [x.shape[3] for x in xs]
  if kernel.ndim != 4 or kernel.shape[:2] != (1, 1) or kernel.shape[2] != sum(channels):
    raise ValueError(
      f"conv1x1_concat: kernel must be (1, 1, {sum(channels)}, D) for "
      f"inputs with channels {channels}, got {kernel.shape}"
    )
  if resolved == "xla" or len(xs) == 1:
    x = xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1)
    return conv2d(x, kernel, impl=resolved)
  y, offset = None, 0
  for x, c in zip(xs, channels):
    part = lax.dot_general(x, kernel[0, 0, offset : offset + c], (((3,), (0,)), ((), ())))
    y = part if y is None else y + part
    offset += c
  return y


class Conv(nn.Module):
  """Bias-free (by default) 2-D convolution, He-normal initialised (paper section 4.1).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: "SAME", "VALID" or explicit pairs.
    use_bias: add a zero-initialised bias.
    dtype: computation dtype (inputs and kernel are cast to it).
    param_dtype: parameter storage dtype.
    kernel_init: initialiser of the HWIO ``kernel`` parameter.
    impl: kernel formulation, see :func:`conv2d`.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Padding = "SAME"
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = he_normal
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param(
      "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype
    )
    y = conv2d(
      x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding, impl=self.impl
    )
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y
