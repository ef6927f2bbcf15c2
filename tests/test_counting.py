"""Counting agrees with hand-computed counts for small models.

Each expected number is written out by hand from the layer shapes (paper convention:
FLOPs = 2 x multiply-adds of convolutions and dense layers, padding included, per image;
params = the ``params`` collection, BN running statistics excluded).
"""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from rknet_jax import counting
from rknet_jax.counting import count_flops, count_params


def _conv(x, k, strides=(1, 1), padding="SAME", groups=1, rhs_dilation=(1, 1)):
  return lax.conv_general_dilated(
    x,
    k,
    strides,
    padding,
    rhs_dilation=rhs_dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )


class SmallNet(nn.Module):
  """stem conv (bias) -> BN -> ReLU -> strided conv -> BN -> global pool -> dense."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn0")(x))
    x = nn.Conv(16, (3, 3), strides=(2, 2), use_bias=False, name="down")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


def test_small_conv_net_params_and_flops():
  model = SmallNet()
  # stem 3*3*3*8 + 8 bias; bn0 8 scale + 8 bias; down 3*3*8*16; bn1 16 + 16; head 16*10 + 10
  params = (3 * 3 * 3 * 8 + 8) + (8 + 8) + (3 * 3 * 8 * 16) + (16 + 16) + (16 * 10 + 10)
  assert count_params(model, (8, 8, 3)) == params
  # stem: 8x8 outputs (SAME, padding counted) x 8 channels x 27 taps;
  # down: stride 2 -> 4x4 outputs x 16 x 72; head 16 x 10.
  flops = 2 * (8 * 8 * 8 * 27 + 4 * 4 * 16 * 72 + 16 * 10)
  assert count_flops(model, (8, 8, 3)) == flops
  # per image: the batch size does not change the count
  assert count_flops(model, (5, 8, 8, 3)) == flops


def test_batch_stats_are_not_params():
  model = SmallNet()
  variables = jax.eval_shape(
    lambda x: model.init({"params": jax.random.key(0)}, x, train=False),
    jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32),
  )
  n_stats = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["batch_stats"]))
  assert n_stats == 2 * (8 + 16)
  n_all = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))
  assert count_params(model, (8, 8, 3)) == n_all - n_stats


class DenseOnly(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(5, name="fc")(x)


def test_dense_layer():
  # 4*4*3 = 48 inputs -> 5 outputs: 48*5 multiply-adds, 48*5 + 5 params
  assert count_flops(DenseOnly(), (3, 4, 4, 3)) == 2 * 48 * 5
  assert count_params(DenseOnly(), (4, 4, 3)) == 48 * 5 + 5


class LaxConv(nn.Module):
  """One convolution written directly with lax (kernel given as HWIO shape)."""

  kernel_shape: tuple
  strides: tuple = (1, 1)
  padding: object = "SAME"
  groups: int = 1
  rhs_dilation: tuple = (1, 1)

  @nn.compact
  def __call__(self, x, train=False):
    k = self.param("kernel", nn.initializers.lecun_normal(), self.kernel_shape)
    return _conv(x, k, self.strides, self.padding, self.groups, self.rhs_dilation)


@pytest.mark.parametrize(
  "kernel_shape,strides,padding,groups,dilation,image,expected",
  [
    # SAME, stride 1: every one of the 9x9 outputs does all 3*3*4 taps (padding counts)
    ((3, 3, 4, 6), (1, 1), "SAME", 1, (1, 1), 9, 2 * 9 * 9 * 6 * (3 * 3 * 4)),
    # SAME, stride 2 on 9x9 -> ceil(9/2) = 5 per side
    ((3, 3, 4, 6), (2, 2), "SAME", 1, (1, 1), 9, 2 * 5 * 5 * 6 * (3 * 3 * 4)),
    # VALID, stride 2 on 9x9 -> (9-3)//2+1 = 4 per side
    ((3, 3, 4, 6), (2, 2), "VALID", 1, (1, 1), 9, 2 * 4 * 4 * 6 * (3 * 3 * 4)),
    # 7x7/2 with explicit padding 3 on 16x16 -> 8x8 (the ImageNet preprocessor shape)
    ((7, 7, 4, 6), (2, 2), ((3, 3), (3, 3)), 1, (1, 1), 16, 2 * 8 * 8 * 6 * 49 * 4),
    # grouped: 8 -> 12 in 4 groups, each output sees 8/4 = 2 input channels
    ((3, 3, 2, 12), (1, 1), "SAME", 4, (1, 1), 6, 2 * 6 * 6 * 12 * (3 * 3 * 2)),
    # depthwise: 4 groups of 1
    ((3, 3, 1, 4), (1, 1), "SAME", 4, (1, 1), 6, 2 * 6 * 6 * 4 * 9),
    # dilated 3x3 (rate 2), VALID on 9x9 -> effective 5x5 window, 5x5 outputs, 9 taps
    ((3, 3, 4, 6), (1, 1), "VALID", 1, (2, 2), 9, 2 * 5 * 5 * 6 * (3 * 3 * 4)),
    # 1x1 conv
    ((1, 1, 4, 6), (1, 1), "SAME", 1, (1, 1), 5, 2 * 5 * 5 * 6 * 4),
  ],
)
def test_convolution_rules(kernel_shape, strides, padding, groups, dilation, image, expected):
  cin = kernel_shape[2] * groups
  model = LaxConv(kernel_shape, strides, padding, groups, dilation)
  assert count_flops(model, (2, image, image, cin)) == expected
  assert count_params(model, (image, image, cin)) == int(np.prod(kernel_shape))


def test_dimension_numbers_do_not_matter():

  class NCHWConv(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      k = self.param("kernel", nn.initializers.lecun_normal(), (6, 4, 3, 3))  # OIHW
      y = lax.conv_general_dilated(
        jnp.transpose(x, (0, 3, 1, 2)),
        k,
        (2, 2),
        "SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
      )
      return y

  assert count_flops(NCHWConv(), (8, 8, 4)) == 2 * 4 * 4 * 6 * (3 * 3 * 4)


class ScanNet(nn.Module):
  """The same-shape 3x3 conv applied `length` times, by lax.scan and by nn.scan."""

  length: int = 3
  use_nn_scan: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    if self.use_nn_scan:

      class Step(nn.Module):
        @nn.compact
        def __call__(self, c, _):
          return nn.Conv(4, (3, 3), use_bias=False)(c), None

      scanned = nn.scan(
        Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.length
      )
      x, _ = scanned(name="steps")(x, None)
      return x
    k = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 4, 4))
    x, _ = lax.scan(lambda c, _: (_conv(c, k), None), x, None, length=self.length)
    return x


@pytest.mark.parametrize("use_nn_scan", [False, True])
def test_scan_counts_length_times(use_nn_scan):
  one = 2 * 6 * 6 * 4 * (3 * 3 * 4)
  model = ScanNet(length=3, use_nn_scan=use_nn_scan)
  assert count_flops(model, (2, 6, 6, 4)) == 3 * one
  # nn.scan stacks one kernel per step; the lax.scan version shares one kernel
  assert count_params(model, (6, 6, 4)) == (3 if use_nn_scan else 1) * 3 * 3 * 4 * 4


@jax.custom_vjp
def _im2col_conv3x3(x, k):
  """3x3 SAME conv written as 9 shifted slices and one dot_general (no lax.conv)."""
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate(
    [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1
  )
  return jnp.einsum("nhwk,ko->nhwo", cols, k.reshape(9 * c, -1))


def _im2col_fwd(x, k):
  return _im2col_conv3x3(x, k), (x, k)


def _im2col_bwd(res, g):
  x, k = res
  _, vjp = jax.vjp(lambda x, k: _conv(x, k), x, k)
  return vjp(g)


_im2col_conv3x3.defvjp(_im2col_fwd, _im2col_bwd)


class CustomKernels(nn.Module):
  """3x3 conv via a custom_vjp (dots inside), then a 1x1 conv as an einsum."""

  remat: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    k3 = self.param("k3", nn.initializers.lecun_normal(), (3, 3, 4, 8))
    k1 = self.param("k1", nn.initializers.lecun_normal(), (1, 1, 8, 6))
    conv3 = jax.checkpoint(_im2col_conv3x3) if self.remat else _im2col_conv3x3
    y = jax.jit(conv3)(x, k3)
    return jnp.einsum("nhwc,co->nhwo", y, k1[0, 0])


@pytest.mark.parametrize("remat", [False, True])
def test_custom_vjp_and_einsum_convs_count_like_lax_conv(remat):
  model = CustomKernels(remat=remat)
  x = jnp.ones((2, 5, 5, 4))
  variables = model.init({"params": jax.random.key(0)}, x)
  # the formulation computes the same function as lax.conv ...
  p = variables["params"]
  ref = _conv(_conv(x, p["k3"]), p["k1"])
  np.testing.assert_allclose(model.apply(variables, x), ref, rtol=1e-5, atol=1e-5)
  # ... and counts the same: 3x3 4->8 on 5x5 (padding included), then 1x1 8->6
  expected = 2 * (5 * 5 * 8 * (3 * 3 * 4) + 5 * 5 * 6 * 8)
  assert count_flops(model, (2, 5, 5, 4)) == expected
  # the forward jaxpr does hold the dot inside a custom_vjp_call
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)
  assert "custom_vjp_call" in str(jaxpr)
  assert "conv_general_dilated" not in str(jaxpr)


class CondNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    k = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 4, 4))
    return lax.cond(x.sum() > 0, lambda x: _conv(_conv(x, k), k), lambda x: x, x)


def test_cond_counts_most_expensive_branch():
  assert count_flops(CondNet(), (6, 6, 4)) == 2 * 2 * 6 * 6 * 4 * 36


class LoopNet(nn.Module):
  static: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    k = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 4, 4))
    if self.static:  # Python-int bounds: lowered to scan, countable
      return lax.fori_loop(0, 2, lambda i, c: _conv(c, k), x)
    return lax.while_loop(lambda c: c.sum() < 1e3, lambda c: _conv(c, k), x)


def test_loops():
  assert count_flops(LoopNet(static=True), (6, 6, 4)) == 2 * 2 * 6 * 6 * 4 * 36
  with pytest.raises(ValueError, match="while_loop"):
    count_flops(LoopNet(static=False), (6, 6, 4))


def test_elementwise_work_is_not_counted():

  class Elementwise(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      s = self.param("scale", nn.initializers.ones, (x.shape[-1],))
      y = nn.relu(x * s + 1.0)
      y = nn.avg_pool(y, (2, 2), (2, 2))
      return y * jax.nn.sigmoid(y.mean(axis=(1, 2), keepdims=True))

  assert count_flops(Elementwise(), (8, 8, 4)) == 0
  assert count_params(Elementwise(), (8, 8, 4)) == 4


class Tree(nn.Module):
  """Named top-level submodules, one using a non-__call__ method and remat."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), use_bias=False, name="stem")(x)
    x = Period(name="period_0")(x)
    x = nn.remat(Period)(name="period_1")(x)
    x = nn.BatchNorm(use_running_average=True, name="post")(x)
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


class Period(nn.Module):
  @nn.compact
  def __call__(self, x):
    return self.steps(x)

  def steps(self, x):
    for i in range(2):
      x = x + nn.Conv(4, (3, 3), use_bias=False, name=f"step_{i}")(x)
    return x


def test_breakdown_by_top_level_module():
  c = counting.model_counts(Tree(), (2, 6, 6, 3))
  step = 2 * 6 * 6 * 4 * 36
  assert c.modules == ("stem", "period_0", "period_1", "post", "head")
  assert c.flops_by_module == {
    "stem": 2 * 6 * 6 * 4 * 27,
    "period_0": 2 * step,
    "period_1": 2 * step,
    "head": 2 * 4 * 3,
  }
  assert c.params_by_module == {
    "stem": 108,
    "period_0": 288,
    "period_1": 288,
    "post": 8,
    "head": 15,
  }
  assert c.flops == sum(c.flops_by_module.values()) == count_flops(Tree(), (6, 6, 3))
  assert c.params == sum(c.params_by_module.values()) == count_params(Tree(), (6, 6, 3))
  deep = counting.flops_by_module(Tree(), (6, 6, 3), depth=2)
  assert deep["period_0/step_0"] == deep["period_1/step_1"] == step


@pytest.mark.parametrize("bad", [(32, 32), (0, 32, 32, 3), (1, 2, 32, 32, 3), "abc", 5])
def test_bad_input_shape(bad):
  with pytest.raises(ValueError, match="input_shape"):
    count_params(SmallNet(), bad)
  with pytest.raises(ValueError, match="input_shape"):
    count_flops(SmallNet(), bad)


def test_not_a_module():
  with pytest.raises(ValueError, match="flax.linen Module"):
    count_params(functools.partial(SmallNet), (8, 8, 3))


# --------------------------------------------------------------------------------------
# Small models of the registry, counted by hand from the rules in docs/architecture.md.


def test_registry_erknet_hand_count():
  from rknet_jax import registry

  # ERKNet-2x1 1x1, k = 4, m = 1, CIFAR stem, multiscale, 10 classes, 8x8x3 input.
  model = registry.create_model("ERKNet-2×1 1×1", growth_rate=4)
  stem = 3 * 3 * 3 * 4  # 3x3 conv 3 -> 4, no BN/bias
  period1 = (2 * 4 + 9 * 4 * 4) + (2 * 8 + 9 * 8 * 4)  # layers see 4, then 8 channels
  transition = 2 * 4 + 4 * 4  # BN + 1x1 conv 4 -> 4
  period2 = 2 * 4 + 9 * 4 * 4
  post = 2 * (2 * 4) + (8 * 10 + 10)  # BN per period; FC 8 -> 10
  assert count_params(model, (8, 8, 3)) == stem + period1 + transition + period2 + post
  flops = 2 * (
    8 * 8 * 4 * 27  # stem at 8x8
    + 8 * 8 * 4 * (9 * 4 + 9 * 8)  # period 1 at 8x8
    + 8 * 8 * 4 * 4  # transition conv before pooling
    + 4 * 4 * 4 * (9 * 4)  # period 2 at 4x4
    + 8 * 10
  )  # classifier
  assert count_flops(model, (2, 8, 8, 3)) == flops


def test_registry_irknet_hand_count():
  from rknet_jax import registry

  # IRKNet-2x1 2x1, k = 4: per time-step s^2 = 4 shared 3x3 filters k -> k; pass I BNs
  # see X0 (4) and [X0, X1] (8); pass II BNs see X2 (4) and X1 (4).
  model = registry.create_model("IRKNet-2×1 2×1", growth_rate=4)
  step_params = 4 * (9 * 4 * 4) + 2 * (4 + 8 + 4 + 4)
  params = 3 * 3 * 3 * 4 + step_params + (2 * 4 + 4 * 4) + step_params + (2 * (2 * 4) + 8 * 10 + 10)
  assert count_params(model, (8, 8, 3)) == params
  # pass I: 4 -> 4 and 8 -> 4 convs; pass II: two 4 -> 4 convs (filters reused)
  step_macs_per_pixel = 4 * 9 * (4 + 8 + 4 + 4)
  flops = 2 * (
    8 * 8 * 4 * 27
    + 8 * 8 * step_macs_per_pixel
    + 8 * 8 * 4 * 4
    + 4 * 4 * step_macs_per_pixel
    + 8 * 10
  )
  assert count_flops(model, (8, 8, 3)) == flops


def test_count_params_equals_real_init_of_registry_model():
  from rknet_jax import registry

  model = registry.create_model("IRKNet-2×1 2×1-AB", growth_rate=4, num_classes=3)
  x = jnp.zeros((2, 8, 8, 3))
  variables = model.init({"params": jax.random.key(0)}, x, train=False)
  real = sum(int(v.size) for v in jax.tree.leaves(variables["params"]))
  assert real > 0
  assert count_params(model, x.shape) == real
  assert (
    count_flops(model, x.shape)
    == counting.jaxpr_flops(
      jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    )
    // 2
  )


def test_summary_cli(capsys):
  from rknet_jax import registry, summary

  assert summary.main(["ERKNet-2x2 1x1", "--growth_rate", "4", "--image_size", "8"]) == 0
  out = capsys.readouterr().out
  model = registry.create_model("ERKNet-2x2 1x1", growth_rate=4)
  c = counting.model_counts(model, (8, 8, 3))
  lines = {l.split()[0]: l for l in out.splitlines() if l.strip()}
  assert f"{c.params:,}" in lines["total"]
  # the two time-steps of period 1 are one row, with their params summed
  p1 = c.params_by_module["period1_step1"] + c.params_by_module["period1_step2"]
  assert "period1 (r=2)" in out and f"{p1:,}" in lines["period1"]
  assert "transition1" in lines and "stem" in lines
  assert summary.main(["ERKNet-2x0", "--growth_rate", "4"]) == 2
  assert "2x0" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ERKNet-2×1 1×1-B", "IRKNet-2×1 2×1-AB"])
def test_counts_do_not_depend_on_conv_formulation(name):
  from rknet_jax import registry

  base = registry.create_model(name, growth_rate=4, bottleneck_width=8)
  counts = {}
  for impl in ("xla", "dot1x1", "dot"):
    model = base.clone(conv_impl=impl)
    counts[impl] = (count_params(model, (8, 8, 3)), count_flops(model, (8, 8, 3)))
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(
      lambda x, m=model: m.init({"params": jax.random.key(0)}, x, train=False), x
    )
    text = str(jax.make_jaxpr(lambda v, x, m=model: m.apply(v, x, train=False))(variables, x))
    if impl == "xla":  # 1x1 convs are convolutions here, dots in the other formulations
      n_conv_xla = text.count("conv_general_dilated")
    else:
      assert text.count("conv_general_dilated") < n_conv_xla
  assert counts["xla"] == counts["dot1x1"] == counts["dot"], counts
