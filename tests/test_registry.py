"""Names, options, list_models and the DenseNet/CliqueNet converters (no array is built)."""

import jax.numpy as jnp
import pytest

from rknet_jax import models, registry


def _fields(model):
  return {f: getattr(model, f) for f in model.__dataclass_fields__ if f not in ("parent", "name")}


def test_times_sign_and_x_read_the_same():
  a = registry.create_model("ERKNet-7×1 6×1 6×1", growth_rate=12)
  b = registry.create_model("ERKNet-7x1 6x1 6x1", growth_rate=12)
  assert _fields(a) == _fields(b)
  assert a.stages == (7, 6, 6) and a.steps == (1, 1, 1) and a.method == "explicit"
  assert a.growth_rate == (12, 12, 12) and a.growth_multipliers == (1, 1, 1)


def test_generic_rknet_name_reads_s_by_r_per_period():
  m = registry.create_model("RKNet-3×2 4×1 2×5 1×1", growth_rate=8)
  assert m.stages == (3, 4, 2, 1) and m.steps == (2, 1, 5, 1)
  assert m.method == "explicit"
  imp = registry.create_model("RKNet-3×2 4×1", growth_rate=8, method="implicit")
  assert imp.method == "implicit"
  assert registry.parse_name("IRKNet-5x1 5x1 5x1-BA-k150").name == ("IRKNet-5×1 5×1 5×1-AB-k150")


def test_suffix_letters_and_options():
  m = registry.create_model("IRKNet-5x1 5x1 5x1-AB", growth_rate=(10, 12, 14))
  assert m.attention and m.bottleneck_widths == (10, 12, 14) and m.method == "implicit"
  e = registry.create_model("ERKNet-2x1 2x1-B", growth_rate=8)
  assert e.bottleneck_widths == (32, 32) and not e.attention  # 4k default for ERK
  e = registry.create_model("ERKNet-2x1 2x1-B", growth_rate=8, bottleneck_width=(5, 6))
  assert e.bottleneck_widths == (5, 6)
  plain = registry.create_model("ERKNet-2x1 2x1", growth_rate=8, attention=True)
  assert plain.attention and plain.bottleneck_widths is None
  m = registry.create_model(
    "IRKNet-3x1 3x1",
    growth_rate=8,
    num_updates=3,
    update_order="jacobi",
    share_weights=False,
    dropout_rate=0.1,
    dtype=jnp.bfloat16,
    remat=True,
    bn_epsilon=1e-3,
    bn_momentum=0.99,
  )
  assert (m.num_updates, m.update_order, m.share_weights, m.dropout_rate, m.remat) == (
    3,
    "jacobi",
    False,
    0.1,
    True,
  )
  assert m.dtype == jnp.bfloat16 and m.bn_epsilon == 1e-3 and m.bn_momentum == 0.99


def test_ready_made_names():
  names = registry.list_models()
  assert len(names) == len(set(names)) == 13 + 6
  for n in (
    "IRKNet-5×1 5×1 5×1-AB-k150",
    "IRKNet-5×1 5×1 5×1-AB-k180",
    "DenseNet-121",
    "DenseNet-BC-250-k24",
    "CliqueNet-T18-k80",
    "CliqueNet-ABC-T30-k150",
  ):
    assert n in names
  t3 = registry.create_model("ERKNet-3×1 3×1 6×1 2×1-B")
  assert (t3.growth_rate, t3.growth_multipliers, t3.bottleneck_widths) == (
    (32,) * 4,
    (2, 4, 8, 28),
    (128,) * 4,
  )
  assert (t3.stem, t3.num_classes, t3.multiscale) == ("imagenet", 1000, False)
  t2 = registry.create_model("IRKNet-5x1 5x1 5x1-AB-k180")
  assert t2.growth_rate == (180,) * 3 and t2.bottleneck_widths == (180,) * 3
  assert t2.attention and t2.multiscale and t2.stem == "cifar"
  # Keyword arguments override ready-made values; the x spelling finds the preset too.
  t1 = registry.create_model("ERKNet-6x1 6x1 6x1", growth_rate=12, num_classes=100)
  assert t1.growth_rate == (12,) * 3 and t1.num_classes == 100
  assert registry.create_model("IRKNet-3x1 3x1 3x1").growth_rate == (36,) * 3


def test_baselines_by_name():
  d = registry.create_model("DenseNet-121")
  assert isinstance(d, models.DenseNet) and d.block_layers == (6, 12, 24, 16)
  assert (d.growth_rate, d.init_features, d.bottleneck_width, d.compression) == (32, 64, 128, 0.5)
  bc = registry.create_model("DenseNet-BC-250-k24")
  assert bc.block_layers == (41,) * 3 and bc.init_features == 48 and bc.stem == "cifar"
  plain = registry.create_model("DenseNet-40-k12", num_classes=100)
  assert plain.block_layers == (12,) * 3 and plain.bottleneck_width is None
  assert plain.compression == 1.0 and plain.num_classes == 100
  c = registry.create_model("CliqueNet-ABC-T30-k150")
  assert isinstance(c, models.CliqueNet) and c.block_layers == (5, 5, 5)
  assert c.attention and c.bottleneck and c.compression
  c = registry.create_model("CliqueNet-T18-k80", update_order="jacobi")
  assert c.block_layers == (6, 6, 6) and not c.bottleneck and c.update_order == "jacobi"


BAD = [
  ("ERKNet-0x1", {}, "'0x1'"),
  ("ERKNet-3×", {}, "'3×'"),
  ("ERKNet-3x1 3", {}, "'3'"),
  ("ERKNet-3x1-C", {}, "'C'"),
  ("ERKNet-3x1-AA", {}, "'AA'"),
  ("ERKNet-3x1-k", {}, "'k'"),
  ("ERKNet", {}, "expected"),
  ("ERKNet-", {}, "expected"),
  ("ResNet-3x1", {}, "'ResNet'"),
  ("FooNet-3x1", {}, "'FooNet'"),
  ("ERKNet-3x1  3x1", {}, "single spaces"),
  ("IRKNet-3x1 3x1", dict(growth_multipliers=(2, 1)), "Rule 4"),
  ("RKNet-3x1", dict(method="implicit", growth_multipliers=2), "Rule 4"),
  ("ERKNet-3x1 3x1", dict(growth_rate=-4), "growth_rate"),
  ("ERKNet-3x1 3x1", dict(growth_rate=0), "growth_rate"),
  ("ERKNet-3x1 3x1", dict(growth_rate=(4, 4, 4)), "one per period"),
  ("ERKNet-3x1 3x1", dict(growth_multipliers=(1, 2, 3)), "growth_multipliers"),
  ("ERKNet-3x1 3x1", dict(growth_rate=None), "growth_rate is required"),
  ("ERKNet-3x1", dict(bottleneck_width=8), "'B'"),
  ("ERKNet-3x1-A", dict(attention=False), "'A'"),
  ("ERKNet-3x1-k12", dict(growth_rate=10), "-k12"),
  ("ERKNet-3x1", dict(stem="svhn"), "stem"),
  ("ERKNet-3x1", dict(dtype=jnp.int32), "dtype"),
  ("ERKNet-3x1", dict(dropout_rate=1.5), "dropout_rate"),
  ("ERKNet-3x1", dict(num_classes=0), "num_classes"),
  ("ERKNet-3x1", dict(widen=2), "widen"),
  ("ERKNet-3x1", dict(method="implicit"), "contradicts"),
  ("IRKNet-3x1", dict(update_order="newest"), "update_order"),
  ("ERKNet-3x1", dict(num_updates=2), "num_updates"),
  ("ERKNet-3x1", dict(share_weights=False), "share_weights"),
  ("IRKNet-5x1 5x1 5x1-AB", dict(growth_rate=None), "-k150"),
  ("IRKNet-3x1", dict(num_updates=0), "num_updates"),
  ("IRKNet-1x1", {}, "s >= 2"),
  ("RK4Net-2x1", {}, "1 or 4"),
  ("RK4Net-1x1-B", {}, "'B'"),
  ("RK4Net-1x1", dict(bottleneck_width=4), "bottleneck_width"),
  ("RK4Net-1x1", dict(learn_everything=True), "learn_everything"),
  ("DenseNet-122", {}, "122"),
  ("DenseNet-BC-251-k24", {}, "L=251"),
  ("DenseNet-121", dict(growth_rate=12), "contradicts"),
  ("DenseNet-121", dict(attention=True), "attention"),
  ("CliqueNet-ABD-T30-k150", {}, "'ABD'"),
  ("CliqueNet-B-T21-k80", {}, "T=21"),
  ("AlexNet", {}, "AlexNet"),
]


@pytest.mark.parametrize("name,kwargs,quoted", BAD, ids=[f"{n}|{sorted(k)}" for n, k, _ in BAD])
def test_bad_names_and_options_raise_quoting_the_bad_part(name, kwargs, quoted):
  kwargs = dict(kwargs)
  if "growth_rate" not in kwargs and not name.startswith(("DenseNet", "CliqueNet")):
    kwargs["growth_rate"] = 4
  elif kwargs.get("growth_rate", 0) is None:
    del kwargs["growth_rate"]
  with pytest.raises(ValueError) as info:
    registry.create_model(name, **kwargs)
  assert quoted in str(info.value)


def test_erknet_from_densenet_121_is_table_3_row_1():
  cfg = registry.erknet_from_densenet("DenseNet-121")
  assert cfg == dict(
    name="ERKNet-3×1 3×1 3×1 1×1-B",
    growth_rate=32,
    growth_multipliers=(2, 4, 8, 16),
    num_classes=1000,
    stem="imagenet",
    multiscale=False,
    bottleneck_width=128,
  )
  assert _fields(registry.create_model(**cfg)) == _fields(
    registry.create_model("ERKNet-3×1 3×1 3×1 1×1-B")
  )
  # The module itself and a dict of its fields work too.
  assert registry.erknet_from_densenet(registry.create_model("DenseNet-121")) == cfg


def test_erknet_from_densenet_names_the_broken_rule():
  with pytest.raises(ValueError, match=r"Rule 3.*block 4 has 32 layers.*m = 640/32 = 20"):
    registry.erknet_from_densenet("DenseNet-169")
  with pytest.raises(ValueError, match=r"Rule 3.*block 1 has 41 layers"):
    registry.erknet_from_densenet("DenseNet-BC-250-k24")
  with pytest.raises(ValueError, match=r"Rule 1.*block 1 starts with 30 channels"):
    registry.erknet_from_densenet(dict(block_layers=(4, 4), growth_rate=12, init_features=30))
  with pytest.raises(ValueError, match="growth_rate"):
    registry.erknet_from_densenet(dict(block_layers=(4, 4), init_features=30))
  # Plain DenseNet-40 starts with 16 channels, not a multiple of k = 12: Rule 1.
  with pytest.raises(ValueError, match="Rule 1"):
    registry.erknet_from_densenet("DenseNet-40-k12")
  # A conforming plain DenseNet: init 2k, 4 layers = 2 stages of m = 2; no compression, so
  # block 2 starts with 16 + 4*8 = 48 = 6k channels and its 6 layers are 1 stage of m = 6.
  cfg = registry.erknet_from_densenet(dict(block_layers=(4, 6), growth_rate=8, init_features=16))
  assert cfg["name"] == "ERKNet-2×1 1×1" and cfg["growth_multipliers"] == (2, 6)


def test_irknet_from_cliquenet_is_the_table_2_irknet():
  cfg = registry.irknet_from_cliquenet("CliqueNet-ABC-T30-k150")
  assert cfg["name"] == "IRKNet-5×1 5×1 5×1-AB" and cfg["growth_rate"] == 150
  assert _fields(registry.create_model(**cfg)) == _fields(
    registry.create_model("IRKNet-5×1 5×1 5×1-AB-k150")
  )
  cfg = registry.irknet_from_cliquenet("CliqueNet-T18-k80")
  assert cfg["name"] == "IRKNet-6×1 6×1 6×1" and cfg["growth_rate"] == 80
  with pytest.raises(ValueError, match=r"Rules 1 and 4.*64 channels"):
    registry.irknet_from_cliquenet("CliqueNet-T18-k80", strict=True)
  with pytest.raises(ValueError, match="equation 6"):
    registry.irknet_from_cliquenet(dict(block_layers=(3, 3), growth_rate=(8, 8), num_updates=0))
  with pytest.raises(ValueError, match="expected a model name"):
    registry.irknet_from_cliquenet(42)
