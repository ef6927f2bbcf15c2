"""Every ready-made model builds and follows the model contract; parameter counts of the
paper's Tables 1-3; train/eval, dropout and dtype behaviour of whole networks.

Big models are only traced (``jax.eval_shape``: no array is allocated); small ones run.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rknet_jax import paper as paper_rows
from rknet_jax import registry

# Trainable parameters (BN scale+bias, no running statistics) printed by the paper, in
# millions, as printed (Tables 1-3; Table 2 counted for 10 classes; the baselines as their
# own papers report them): the rows of rknet_jax.paper.
PAPER_PARAMS_M = {row.name: row.params_m for row in paper_rows.ROWS}
# Exact counts known independently: torchvision's DenseNet-121; the authors' RKCNN-E k=36
# (ERKNet-6×1 6×1 6×1-B with bottleneck width k), given in the issue.
EXACT_PARAMS = {"DenseNet-121": 7_978_856}


def _input_shape(model, batch=1):
  return (batch, 224, 224, 3) if model.stem == "imagenet" else (batch, 32, 32, 3)


@functools.cache
def _traced(name):
  """(variables shapes, train logits shape, eval logits shape) of a ready-made model."""
  model = registry.create_model(name)
  x = jax.ShapeDtypeStruct(_input_shape(model, 2), jnp.float32)

  def run(x):
    variables = model.init({"params": jax.random.PRNGKey(0)}, x, train=False)
    train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return variables, train_logits, model.apply(variables, x, train=False), updates

  return model, jax.eval_shape(run, x)


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name", registry.list_models())
def test_every_ready_made_model_builds_and_follows_the_contract(name):
  model, (variables, train_logits, eval_logits, updates) = _traced(name)
  assert set(variables) == {"params", "batch_stats"}
  assert set(updates) == {"batch_stats"}
  assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(
    variables["batch_stats"]
  )
  for logits in (train_logits, eval_logits):
    assert logits.shape == (2, model.num_classes)
    assert logits.dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))
  assert model.dtype == jnp.float32
  assert model.clone(num_classes=7).num_classes == 7


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_param_count_matches_the_paper(name):
  _, (variables, *_) = _traced(name)
  got = _count(variables["params"])
  printed = PAPER_PARAMS_M[name]
  decimals = len(printed.split(".")[1])
  assert round(got / 1e6, decimals) == pytest.approx(float(printed)), (name, got)


def test_exact_param_counts():
  _, (variables, *_) = _traced("DenseNet-121")
  assert _count(variables["params"]) == EXACT_PARAMS["DenseNet-121"]
  model = registry.create_model("ERKNet-6×1 6×1 6×1-B", growth_rate=36, bottleneck_width=36)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  assert _count(v["params"]) == 302_446


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _init(model, x):
  # An rbg key: flax initialisers then draw with XLA's RNG bit generator, which compiles
  # much faster on CPU than threefry (test time only; the values do not matter here).
  return model.init({"params": jax.random.key(0, impl="unsafe_rbg")}, x)


def _run(model, x, train, variables=None, rngs=None):
  """(variables, outputs) of an eager (op-by-op) apply: no whole-network compilation."""
  if variables is None:
    variables = _init(model, x)
  if train:
    return variables, model.apply(
      variables, x, train=True, mutable=["batch_stats"], rngs=rngs or {}
    )
  return variables, model.apply(variables, x, train=False)


# Small ready-made models (Table 1) run for real at a small input (8x8: three periods).
@pytest.mark.parametrize(
  "name", [n for n in registry.list_models() if n in list(PAPER_PARAMS_M)[:8]]
)
def test_small_ready_made_models_run(name):
  model = registry.create_model(name)
  x = _images((2, 8, 8, 3))
  variables, logits = _run(model, x, train=False)
  _, (train_logits, updates) = _run(model, x, train=True, variables=variables)
  for out in (logits, train_logits):
    assert out.shape == (2, 10) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.max(jnp.abs(logits - train_logits))) > 0  # BN: batch vs running stats
  assert _count(variables["params"]) == _count(_traced(name)[1][0]["params"])


# Models that exercise every feature, small enough to run: (name, create_model kwargs, shape)
FEATURE_MODELS = [
  (
    "ERKNet-2×1 1×2-AB",
    dict(growth_rate=(4, 6), growth_multipliers=(2, 1), bottleneck_width=5),
    (2, 8, 8, 3),
  ),
  ("IRKNet-3×1 2×2-AB", dict(growth_rate=4, num_updates=2), (2, 8, 8, 3)),
  (
    "IRKNet-2×1 3×1-B",
    dict(growth_rate=4, share_weights=False, update_order="jacobi", multiscale=False),
    (2, 8, 8, 3),
  ),
  ("RKNet-1×1 2×1", dict(growth_rate=4, method="implicit", share_weights=False), (2, 8, 8, 3)),
  (
    "ERKNet-2×1 1×1-B",
    dict(
      growth_rate=4, growth_multipliers=(2, 2), stem="imagenet", num_classes=5, multiscale=False
    ),
    (2, 32, 32, 3),
  ),
  ("RK4Net-4×1 4×1", dict(growth_rate=4), (2, 8, 8, 3)),
  ("DenseNet-BC-16-k4", {}, (2, 8, 8, 3)),
  ("CliqueNet-ABC-T12-k4", {}, (2, 8, 8, 3)),
]


@pytest.mark.parametrize("name,kwargs,shape", FEATURE_MODELS, ids=[n for n, _, _ in FEATURE_MODELS])
def test_train_and_eval_differ_only_through_batch_norm(name, kwargs, shape):
  # With momentum 0 the running statistics become the batch statistics of the training
  # pass; eval mode on the same batch must then reproduce the training logits exactly.
  model = registry.create_model(name, bn_momentum=0.0, **kwargs)
  x = _images(shape)
  variables, eval_before = _run(model, x, train=False)
  _, (train_logits, updates) = _run(model, x, train=True, variables=variables)
  assert bool(jnp.all(jnp.isfinite(train_logits)))
  assert float(jnp.max(jnp.abs(eval_before - train_logits))) > 1e-4
  _, eval_after = _run(model, x, train=False, variables={"params": variables["params"], **updates})
  np.testing.assert_allclose(eval_after, train_logits, rtol=2e-4, atol=2e-4)


def test_dropout_only_in_training_and_needs_an_rng():
  kwargs = dict(growth_rate=4, bottleneck_width=4)
  model = registry.create_model("IRKNet-2×1 2×1-AB", dropout_rate=0.3, **kwargs)
  plain = registry.create_model("IRKNet-2×1 2×1-AB", **kwargs)
  x = _images((2, 8, 8, 3))
  variables, logits = _run(model, x, train=False)
  _, plain_logits = _run(plain, x, train=False, variables=variables)
  np.testing.assert_allclose(logits, plain_logits, rtol=1e-6, atol=1e-6)
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True, mutable=["batch_stats"])
  _, (a, _) = _run(model, x, True, variables, {"dropout": jax.random.PRNGKey(1)})
  _, (b, _) = _run(model, x, True, variables, {"dropout": jax.random.PRNGKey(2)})
  _, (c, _) = _run(plain, x, True, variables)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4 and float(jnp.max(jnp.abs(a - c))) > 1e-4
  # Without dropout no rng is needed in training.
  plain.apply(variables, x, train=True, mutable=["batch_stats"])


@pytest.mark.parametrize("name", ["ERKNet-2×1 2×1-B", "IRKNet-2×1 2×1-AB"])
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
  x = _images((2, 8, 8, 3))
  m32 = registry.create_model(name, growth_rate=8)
  m16 = registry.create_model(name, growth_rate=8, dtype=jnp.bfloat16)
  variables, l32 = _run(m32, x, train=False)
  v16 = jax.eval_shape(lambda: _init(m16, x))
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v16))
  assert jax.tree_util.tree_structure(v16) == jax.tree_util.tree_structure(variables)
  _, l16 = _run(m16, x, train=False, variables=variables)
  _, (t16, upd) = _run(m16, x, train=True, variables=variables)
  assert l16.dtype == jnp.float32 and t16.dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(upd))
  assert bool(jnp.all(jnp.isfinite(t16)))
  np.testing.assert_allclose(l16, l32, atol=0.1 * float(jnp.max(jnp.abs(l32))) + 0.05)


def test_whole_model_remat_equivalence():
  x = _images((2, 8, 8, 3))
  kwargs = dict(growth_rate=4, dropout_rate=0.2)  # dropout masks must be recomputed alike
  plain = registry.create_model("IRKNet-2×1 2×1-AB", **kwargs)
  rem = registry.create_model("IRKNet-2×1 2×1-AB", remat=True, **kwargs)
  variables = _init(plain, x)
  labels = jnp.array([1, 3])

  def step(model):
    def loss(params):
      logits, upd = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.PRNGKey(3)},
      )
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels]), upd

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  (l0, u0), g0 = step(plain)
  (l1, u1), g1 = step(rem)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  # Equal up to float32 rounding (recomputation lets XLA fuse and reassociate differently).
  for a, b in zip(jax.tree_util.tree_leaves((g0, u0)), jax.tree_util.tree_leaves((g1, u1))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))


# --------------------------------------------------------------------------------------
# Layer options: defaults, one LayerConfig handed down, checkpoint layout


def test_batch_norm_defaults_follow_each_familys_published_code():
  from rknet_jax import layers, models

  # RKNets: the authors' RKCNN code, BatchNorm2d(eps=0.001, momentum=0.01).
  rk = registry.create_model("ERKNet-2×1 1×1", growth_rate=4)
  tab = registry.create_model("RK4Net-1×1 1×1", growth_rate=4)
  direct = models.RKNet((2,), (1,), (4,), (1,))
  for model in (rk, tab, direct):
    assert (model.bn_momentum, model.bn_epsilon) == (0.99, 1e-3), model
    assert model.layer_config() == layers.LayerConfig(bn_momentum=0.99, bn_epsilon=1e-3)
  assert (layers.LayerConfig().bn_momentum, layers.LayerConfig().bn_epsilon) == (0.99, 1e-3)
  # DenseNet: LuaTorch / torchvision defaults (eps 1e-5, momentum 0.1); CliqueNet: the
  # authors' TensorFlow code (tf.contrib.layers.batch_norm: decay 0.999, epsilon 0.001).
  dense = models.DenseNet((2,), 4, 8)
  clique = models.CliqueNet((2,), (4,))
  assert (dense.bn_momentum, dense.bn_epsilon) == (0.9, 1e-5)
  assert (clique.bn_momentum, clique.bn_epsilon) == (0.999, 1e-3)
  # The layer options stay plain keywords of every model.
  custom = models.DenseNet(
    (2,),
    4,
    8,
    dropout_rate=0.1,
    bn_momentum=0.5,
    bn_epsilon=1e-4,
    dtype=jnp.bfloat16,
    remat=True,
    conv_impl="xla",
  )
  assert custom.layer_config() == layers.LayerConfig(0.5, 1e-4, jnp.bfloat16, 0.1, True, "xla")


def test_default_batch_norm_settings_reach_every_layer():
  """A model built with defaults equals one given the RKCNN settings explicitly (outputs and
  updated statistics), and differs from one with the earlier 0.9 / 1e-5."""
  x = _images((2, 8, 8, 3))
  name, kwargs = "IRKNet-2×1 2×1-AB", dict(growth_rate=4)
  default = registry.create_model(name, **kwargs)
  explicit = registry.create_model(name, bn_momentum=0.99, bn_epsilon=1e-3, **kwargs)
  other = registry.create_model(name, bn_momentum=0.9, bn_epsilon=1e-5, **kwargs)
  variables = _init(default, x)
  outs = [_run(m, x, True, variables)[1] for m in (default, explicit, other)]
  chex.assert_trees_all_equal(outs[0], outs[1])
  assert float(jnp.max(jnp.abs(outs[0][0] - outs[2][0]))) > 1e-4

  # The first BatchNorm reads the stem's output (no BatchNorm before it): from a zero
  # running mean, one update gives (1 - momentum) * batch mean.
  def first(out):
    return out[1]["batch_stats"]["period1_step1"]["clique_block"]["pass1_stage1"]["bn"]

  np.testing.assert_allclose(
    first(outs[0])["mean"], first(outs[2])["mean"] * 0.01 / 0.1, rtol=1e-5, atol=1e-8
  )


# The checkpoint layout: parameter paths and shapes of a small model exercising the
# ImageNet stem, bottleneck dense layers, attention and the multiscale head.  Checkpoints
# written before the layer options moved into LayerConfig have exactly these.
LAYOUT_PARAMS = {
  "stem/conv/kernel": (7, 7, 3, 4),
  "stem/bn/scale": (4,),
  "stem/bn/bias": (4,),
  "transition1/bn_relu_conv/bn/scale": (4,),
  "transition1/bn_relu_conv/bn/bias": (4,),
  "transition1/bn_relu_conv/conv/kernel": (1, 1, 4, 4),
  "transition1/attention/fc1/kernel": (4, 2),
  "transition1/attention/fc1/bias": (2,),
  "transition1/attention/fc2/kernel": (2, 4),
  "transition1/attention/fc2/bias": (4,),
  "postprocessor/bn_0/scale": (4,),
  "postprocessor/bn_0/bias": (4,),
  "postprocessor/bn_1/scale": (4,),
  "postprocessor/bn_1/bias": (4,),
  "postprocessor/fc/kernel": (8, 10),
  "postprocessor/fc/bias": (10,),
}
for _step, _layer, _c in (
  ("period1_step1", "layer1", 4),
  ("period2_step1", "layer1", 4),
  ("period2_step1", "layer2", 8),
):
  _prefix = f"{_step}/dense_block/{_layer}/"
  LAYOUT_PARAMS.update(
    {
      _prefix + "bn_relu_conv1x1/bn/scale": (_c,),
      _prefix + "bn_relu_conv1x1/bn/bias": (_c,),
      _prefix + "bn_relu_conv1x1/conv/kernel": (1, 1, _c, 8),
      _prefix + "bn_relu_conv3x3/bn/scale": (8,),
      _prefix + "bn_relu_conv3x3/bn/bias": (8,),
      _prefix + "bn_relu_conv3x3/conv/kernel": (3, 3, 8, 4),
    }
  )


def test_checkpoint_layout_is_unchanged():
  model = registry.create_model(
    "ERKNet-1×1 2×1-AB", growth_rate=4, bottleneck_width=8, stem="imagenet"
  )
  v = jax.eval_shape(lambda: _init(model, jnp.zeros((1, 32, 32, 3))))

  def flat(tree):
    return {
      "/".join(k.key for k in path): leaf.shape
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }

  assert flat(v["params"]) == LAYOUT_PARAMS
  # Running statistics: mean and var for every BatchNorm scale.
  bns = {p.rsplit("/", 1)[0] for p in LAYOUT_PARAMS if p.endswith("/scale")}
  assert flat(v["batch_stats"]) == {
    f"{bn}/{stat}": LAYOUT_PARAMS[f"{bn}/scale"] for bn in bns for stat in ("mean", "var")
  }


# --------------------------------------------------------------------------------------
# Input that does not fit the model is refused while tracing


@pytest.mark.parametrize(
  "name,kwargs,unit",
  [
    ("ERKNet-1×1 1×1 1×1", dict(growth_rate=4), "period 2"),
    ("DenseNet-BC-16-k4", {}, "dense block 2"),
    ("CliqueNet-T12-k4", {}, "clique block 2"),
  ],
)
def test_too_deep_for_the_input_names_the_period_and_size(name, kwargs, unit):
  model = registry.create_model(name, **kwargs)
  # Three periods: 4x4 -> 2x2 -> 1x1 works (finite logits) ...
  _, logits = _run(model, _images((2, 4, 4, 3)), train=False)
  assert bool(jnp.all(jnp.isfinite(logits)))
  # ... 2x2 would pool period 2's 1x1 output to 0x0 (NaN logits): an error, before compiling.
  small = jax.ShapeDtypeStruct((2, 2, 2, 3), jnp.float32)
  with pytest.raises(ValueError, match=rf"\(2, 2, 2, 3\).*{unit} is 1x1.*0x0"):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), small)


def test_nchw_or_wrong_channels_are_refused_naming_shape_and_layout():
  model = registry.create_model("ERKNet-1×1 1×1", growth_rate=4)
  nhwc = _images((2, 8, 8, 3))
  nchw = jnp.transpose(nhwc, (0, 3, 1, 2))
  with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\).*NHWC.*NCHW"):  # at init
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), nchw)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), nhwc)
  with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\).*NHWC.*with 3 channels.*NCHW"):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, nchw)
  with pytest.raises(
    ValueError, match=r"\(2, 8, 8, 1\).*NHWC.*with 3 channels(?! -- it looks like NCHW)"
  ):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, _images((2, 8, 8, 1)))
  with pytest.raises(ValueError, match=r"\(8, 8, 3\).*\(N, H, W, C\)"):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, nhwc[0])
  imagenet = registry.create_model("ERKNet-1×1", growth_rate=4, stem="imagenet")
  v = jax.eval_shape(lambda x: imagenet.init(jax.random.key(0), x), _images((1, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"\(1, 3, 32, 32\).*NCHW"):
    jax.eval_shape(lambda v, x: imagenet.apply(v, x), v, jnp.zeros((1, 3, 32, 32)))
