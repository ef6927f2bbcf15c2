"""Every conv formulation of rknet_jax.conv computes lax.conv_general_dilated exactly.

Same outputs, input gradients and kernel gradients (float32 tight, bfloat16 within its
rounding), for strides 1/2, SAME/VALID/explicit padding, 1x1/3x3/7x7 kernels, under jit
and vmap; forward FLOPs seen by the jaxpr walker are the same for every formulation.
"""

import chex
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from rknet_jax import conv as conv_lib
from rknet_jax.conv import Conv, conv2d

IMPLS = ("xla", "dot1x1", "dot")
CASES = [  # (kernel size, stride, padding)
  (1, 1, "SAME"),
  (1, 2, "SAME"),
  (1, 1, ((1, 0), (0, 2))),
  (3, 1, "SAME"),
  (3, 1, "VALID"),
  (3, 1, ((2, 0), (1, 3))),
  (3, 2, "SAME"),
  (3, 2, "VALID"),
  (7, 1, "SAME"),
  (7, 2, ((3, 3), (3, 3))),
]
# The 7x7 (ImageNet stem) cases compile the longest: the full suite only.
SLOW_7X7 = [pytest.param(*case, marks=pytest.mark.slow) if case[0] == 7 else case for case in CASES]


def _ref(x, k, stride, padding):
  return lax.conv_general_dilated(
    x, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _inputs(ks, dtype, n=2, h=11, w=9, c=5, d=4):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(ks), 3)
  x = jax.random.normal(kx, (n, h, w, c), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (ks, ks, c, d), jnp.float32).astype(dtype)
  return x, k, kg


def _out_and_grads(fn, x, k, key):
  y, vjp = jax.vjp(fn, x, k)
  g = jax.random.normal(key, y.shape, jnp.float32).astype(y.dtype)
  dx, dk = vjp(g)
  return y, dx, dk


@pytest.mark.parametrize("ks,stride,padding", SLOW_7X7)
def test_float32_matches_lax_conv(ks, stride, padding):
  x, k, kg = _inputs(ks, jnp.float32)

  @jax.jit
  def all_impls(x, k):
    ref = _out_and_grads(lambda a, b: _ref(a, b, stride, padding), x, k, kg)
    return ref, {
      impl: _out_and_grads(
        lambda a, b, impl=impl: conv2d(a, b, (stride, stride), padding, impl=impl), x, k, kg
      )
      for impl in IMPLS
    }

  ref, got = all_impls(x, k)
  for impl in IMPLS:
    for name, r, v in zip(("y", "dx", "dk"), ref, got[impl]):
      assert v.shape == r.shape and v.dtype == r.dtype, (impl, name)
      scale = float(jnp.max(jnp.abs(r)))
      err = float(jnp.max(jnp.abs(v - r)))
      assert err <= 1e-5 * scale + 1e-6, (impl, name, err, scale)


@pytest.mark.parametrize(
  "ks,stride,padding",
  [
    (1, 2, "SAME"),
    (3, 1, "SAME"),
    (3, 1, ((2, 0), (1, 3))),
    pytest.param(7, 1, "VALID", marks=pytest.mark.slow),
  ],
)
def test_bfloat16_matches_lax_conv_within_rounding(ks, stride, padding):
  x, k, kg = _inputs(ks, jnp.bfloat16)

  def up(t):
    return t.astype(jnp.float32)

  # float32 reference on the same (bf16-representable) inputs and cotangent.
  ref_fn = jax.jit(
    lambda a, b: _out_and_grads(lambda a_, b_: _ref(a_, b_, stride, padding), a, b, kg)
  )
  ref = ref_fn(up(x), up(k))
  lax_bf16 = ref_fn(x, k)
  for impl in IMPLS:
    got = jax.jit(
      lambda a, b, impl=impl: _out_and_grads(
        lambda a_, b_: conv2d(a_, b_, (stride, stride), padding, impl=impl), a, b, kg
      )
    )(x, k)
    for name, r, lb, v in zip(("y", "dx", "dk"), ref, lax_bf16, got):
      assert v.dtype == jnp.bfloat16 and v.shape == r.shape, (impl, name)
      scale = float(jnp.max(jnp.abs(r)))
      err = float(jnp.max(jnp.abs(up(v) - r)))
      lax_err = float(jnp.max(jnp.abs(up(lb) - r)))
      # bf16 keeps 8 bits of mantissa: ~0.4% per rounding of the result.
      assert err <= 1.5e-2 * scale, (impl, name, err, scale)
      assert err <= 2 * lax_err + 4e-3 * scale, (impl, name, err, lax_err)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_over_inputs_and_kernels(impl):
  x, k, kg = _inputs(3, jnp.float32, n=2, h=7, w=6)
  xs = jnp.stack([x, 2 * x + 1])  # vmapped input batch
  ks = jnp.stack([k, -k * 0.5])  # vmapped kernels
  w = jax.random.normal(kg, (2, 2, 7, 6, 4))

  def loss(conv, xs, ks):
    ys = jax.vmap(lambda a, b: conv(a, b))(xs, ks)
    return jnp.sum(ys * w)

  ref = jax.jit(
    jax.value_and_grad(lambda a, b: loss(lambda u, v: _ref(u, v, 1, "SAME"), a, b), argnums=(0, 1))
  )
  got = jax.jit(
    jax.value_and_grad(
      lambda a, b: loss(lambda u, v: conv2d(u, v, impl=impl), a, b), argnums=(0, 1)
    )
  )
  (lr, (gxr, gkr)), (lg, (gxg, gkg)) = ref(xs, ks), got(xs, ks)
  np.testing.assert_allclose(lg, lr, rtol=1e-5)
  np.testing.assert_allclose(gxg, gxr, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gkg, gkr, rtol=1e-5, atol=1e-4)
  # vmap over the input only (kernel shared): batched custom VJP, kernel grads summed.
  gk_shared = jax.grad(lambda b: loss(lambda u, v: conv2d(u, b, impl=impl), xs, ks))(k)
  gk_shared_ref = jax.grad(lambda b: loss(lambda u, v: _ref(u, b, 1, "SAME"), xs, ks))(k)
  np.testing.assert_allclose(gk_shared, gk_shared_ref, rtol=1e-5, atol=1e-4)


def test_second_order_input_gradient_through_custom_vjp():
  # Hessian-vector products w.r.t. the input go through the custom VJP's bwd.
  x, k, _ = _inputs(3, jnp.float32, n=1, h=5, w=5, c=2, d=3)

  def f(conv):
    return lambda a: jnp.sum(jnp.tanh(conv(a, k)) ** 2)

  ref = jax.grad(f(lambda a, b: _ref(a, b, 1, "SAME")))(x)
  got = jax.grad(f(lambda a, b: conv2d(a, b, impl="dot")))(x)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_kernel_gradient_formulation_directly():
  # The shifted-dots kernel gradient against XLA's, for a non-square kernel and
  # asymmetric, partly negative padding.
  x, _, kg = _inputs(5, jnp.float32, n=3, h=9, w=12, c=4, d=6)
  k = jax.random.normal(kg, (3, 5, 4, 6))
  pads = ((2, -1), (0, 3))
  y = _ref(x, k, 1, pads)
  g = jax.random.normal(jax.random.PRNGKey(9), y.shape)
  ref = jax.vjp(lambda b: _ref(x, b, 1, pads), k)[1](g)[0]
  got = conv_lib._kernel_grad_shifted_dots(x, g, (3, 5), pads)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(conv2d(x, k, padding=pads, impl="dot"), y, rtol=1e-5, atol=1e-5)


def test_forward_flops_identical_for_every_impl():
  from rknet_jax.counting import jaxpr_flops

  x = jnp.zeros((2, 8, 8, 6))
  for ks, stride, padding in CASES:
    k = jnp.zeros((ks, ks, 6, 4))
    counts = {
      impl: jaxpr_flops(
        jax.make_jaxpr(
          lambda a, b, impl=impl, s=stride, p=padding: conv2d(a, b, (s, s), p, impl=impl)
        )(x, k)
      )
      for impl in IMPLS
    }
    ho, wo = _ref(x, k, stride, padding).shape[1:3]
    expected = 2 * 2 * ho * wo * ks * ks * 6 * 4  # padding included
    assert counts == {impl: expected for impl in IMPLS}, (ks, stride, padding, counts)


def test_auto_resolves_by_backend_at_trace_time():
  assert jax.default_backend() == "cpu"
  assert conv_lib.resolve_impl("auto") == "dot1x1" == conv_lib.resolve_impl()
  assert conv_lib.resolve_impl("xla") == "xla"
  # A target platform given by the caller (a mesh's devices) overrides the default backend.
  assert [conv_lib.resolve_impl("auto", p) for p in ("cpu", "gpu", "tpu")] == [
    "dot1x1",
    "xla",
    "xla",
  ]
  assert conv_lib.resolve_impl("dot", "tpu") == "dot"
  x, k, _ = _inputs(3, jnp.float32, n=1, h=4, w=4)
  assert "custom_vjp" not in str(jax.make_jaxpr(lambda a, b: conv2d(a, b, impl="xla"))(x, k))
  assert "custom_vjp" in str(jax.make_jaxpr(lambda a, b: conv2d(a, b, impl="dot"))(x, k))
  # 1x1 under "auto" on the CPU: a dot_general, no convolution at all; "xla": a convolution.
  k1 = jnp.ones((1, 1, 5, 4))
  assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda a: conv2d(a, k1))(x))
  assert "conv_general_dilated" in str(jax.make_jaxpr(lambda a: conv2d(a, k1, impl="xla"))(x))


def test_formulation_is_a_model_option_not_module_state():
  """No module-level default to change: ``conv_impl`` is a field of the model, so two models
  differing only in it are different (hash) keys of a jit cache and trace differently."""
  from rknet_jax import registry

  assert not hasattr(conv_lib, "set_default_impl") and not hasattr(conv_lib, "default_impl")
  auto = registry.create_model("ERKNet-2×1-B", growth_rate=4)
  xla = auto.clone(conv_impl="xla")
  assert auto.conv_impl == "auto" and auto.layer_config().conv_impl == "auto"
  assert auto != xla and hash(auto) != hash(xla)
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  texts = {}
  for model in (auto, xla):
    variables = jax.eval_shape(lambda x, m=model: m.init(jax.random.key(0), x), x)
    texts[model.conv_impl] = str(jax.make_jaxpr(lambda v, x, m=model: m.apply(v, x))(variables, x))
  # The bottleneck's 1x1 convolutions are dots under "auto" on the CPU, convolutions under xla.
  assert texts["auto"].count("conv_general_dilated") < texts["xla"].count("conv_general_dilated")
  with pytest.raises(ValueError, match="'cudnn'"):
    auto.clone(conv_impl="cudnn").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize("impl", IMPLS)
def test_conv1x1_concat_equals_conv_of_concatenation(impl):
  from rknet_jax.counting import jaxpr_flops

  keys = jax.random.split(jax.random.PRNGKey(4), 4)
  xs = [jax.random.normal(kk, (2, 5, 6, c)) for kk, c in zip(keys[:3], (3, 4, 2))]
  k = jax.random.normal(keys[3], (1, 1, 9, 5))

  def ref(xs, k):
    return _ref(jnp.concatenate(xs, -1), k, 1, "SAME")

  def got(xs, k):
    return conv_lib.conv1x1_concat(xs, k, impl=impl)

  y, vjp = jax.vjp(got, xs, k)
  yr, vjpr = jax.vjp(ref, xs, k)
  np.testing.assert_allclose(y, yr, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(keys[0], y.shape)
  chex.assert_trees_all_close(vjp(g), vjpr(g), rtol=1e-5, atol=1e-5)
  assert jaxpr_flops(jax.make_jaxpr(got)(xs, k)) == 2 * 2 * 5 * 6 * 9 * 5
  if impl != "xla":
    assert "concatenate" not in str(jax.make_jaxpr(got)(xs, k))
  with pytest.raises(ValueError, match=r"\(1, 1, 9, D\)"):
    conv_lib.conv1x1_concat(xs, jnp.zeros((1, 1, 8, 5)), impl=impl)
  with pytest.raises(ValueError, match="equal N, H, W"):
    conv_lib.conv1x1_concat([xs[0], xs[1][:, :4]], k, impl=impl)


def test_bad_arguments_raise_clear_errors():
  x, k, _ = _inputs(3, jnp.float32, n=1, h=4, w=4)
  with pytest.raises(ValueError, match="'cudnn'"):
    conv2d(x, k, impl="cudnn")
  with pytest.raises(ValueError, match="'fast'"):
    conv_lib.resolve_impl("fast")
  with pytest.raises(ValueError, match="'FULL'"):
    conv2d(x, k, padding="FULL")
  with pytest.raises(ValueError, match="input channels 5 != kernel input channels 3"):
    conv2d(x, jnp.zeros((3, 3, 3, 4)))
  with pytest.raises(ValueError, match="strides"):
    conv2d(x, k, strides=(0, 1))
  with pytest.raises(ValueError, match="NHWC"):
    conv2d(x[0], k)


@pytest.mark.parametrize("impl", ["auto", "xla", "dot"])
def test_conv_module_layout_init_and_impl(impl):
  x, _, _ = _inputs(3, jnp.float32, n=2, h=6, w=6, c=8)
  m = Conv(16, (3, 3), use_bias=True, impl=impl)
  variables = m.init(jax.random.PRNGKey(0), x)
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  assert kernel.shape == (3, 3, 8, 16) and bias.shape == (16,)
  assert not np.any(np.asarray(bias))
  # He-normal, fan-in: std sqrt(2 / (3*3*8)), not truncated.
  np.testing.assert_allclose(np.std(np.asarray(kernel)), np.sqrt(2 / 72), rtol=0.1)
  y = m.apply(variables, x)
  np.testing.assert_allclose(y, _ref(x, kernel, 1, "SAME") + bias, rtol=1e-5, atol=1e-5)
  m_bf16 = Conv(16, (3, 3), dtype=jnp.bfloat16, impl=impl)
  v16 = m_bf16.init(jax.random.PRNGKey(0), x)
  assert v16["params"]["kernel"].dtype == jnp.float32
  assert m_bf16.apply(v16, x).dtype == jnp.bfloat16
