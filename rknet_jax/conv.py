"""2-D convolution used by every RKNet layer.

All convolutions of the models go through :class:`Conv` / :func:`conv2d`, so the kernel
formulation (XLA's native convolution, 1x1 as a matmul, custom weight-gradient VJPs) is
chosen in one place.  Every formulation computes the same function and gradients as
``lax.conv_general_dilated`` (NHWC activations, HWIO kernels).

Initialisation follows the paper (section 4.1): He-normal, fan-in, ReLU gain, *not*
truncated (He et al., 2015).
"""

from typing import Any, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

Padding = Union[str, Sequence[tuple[int, int]]]


def conv2d(x, kernel, strides=(1, 1), padding: Padding = "SAME"):
  """NHWC x HWIO -> NHWC convolution (no bias)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
  """Bias-free (by default) 2-D convolution, He-normal initialised.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: "SAME", "VALID" or explicit pairs.
    use_bias: add a zero-initialised bias.
    dtype: computation dtype (inputs and kernel are cast to it).
    param_dtype: parameter storage dtype.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Padding = "SAME"
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = he_normal

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init,
                        (kh, kw, x.shape[-1], self.features), self.param_dtype)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
               self.padding)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y
