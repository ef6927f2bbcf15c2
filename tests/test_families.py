"""The family registry: a new family is one module plus one registration."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from rknet_jax import families, layers, models, registry
from rknet_jax import spec as spec_lib
from rknet_jax.checks import check_int, per_period


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyNetSpec(spec_lib.ModelSpec):
  """A toy family: ``ToyNet-<depth>`` = a stem and ``depth`` convolutions of ``width``."""

  depth: int
  width: tuple[int, ...] = 4

  def __post_init__(self):
    super().__post_init__()
    self._set("depth", check_int("ToyNetSpec", "depth", self.depth, 1, 8))
    self._set("width", per_period("ToyNetSpec", "width", self.width, self.depth))

  @property
  def name(self):
    return f"ToyNet-{self.depth}"

  @property
  def num_layers(self):
    return self.depth


class ToyNet(models._Network):  # noqa: SLF001 -- the base every family module extends
  """The toy family's module: its fields carry the spec's names."""

  depth: int = 1
  width: tuple[int, ...] = (4,)
  num_classes: int = 10
  stem: str = "cifar"

  def _stem_features(self):
    return self.width[0]

  @nn.compact
  def __call__(self, x, train: bool = False):
    x, cfg, _ = self._begin(x, train)
    for i, w in enumerate(self.width):
      x = layers.BNReLUConv(w, config=cfg, name=f"conv{i + 1}")(x, train)
    return layers.Postprocessor(self.num_classes, cfg, name="postprocessor")([x], train)


def _toy_from_name(name, hint, fields):
  del hint
  m = re.fullmatch(r"ToyNet-(\d+)", name)
  if not m:
    raise ValueError(f"model name {name!r}: expected 'ToyNet-<depth>'")
  return ToyNetSpec(depth=int(m.group(1)), **fields)


@pytest.fixture
def toy_family():
  family = families.register(
    families.Family(
      spec=ToyNetSpec,
      module=ToyNet,
      matches=lambda name: name.startswith("ToyNet"),
      from_name=_toy_from_name,
      study_labels=("ToyNet",),
    )
  )
  yield family
  families.unregister(family.name)


def test_a_toy_family_is_one_registration(toy_family):
  spec = registry.parse_name("ToyNet-2", width=(4, 6), num_classes=3)
  assert isinstance(spec, ToyNetSpec) and spec.width == (4, 6) and spec.name == "ToyNet-2"
  assert spec_lib.from_json(spec.to_json()) == spec
  model = registry.create_model("ToyNet-2", width=(4, 6), num_classes=3, dtype="float32")
  assert isinstance(model, ToyNet) and model.width == (4, 6)
  assert registry.build(spec).width == (4, 6)
  x = jnp.ones((2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert set(variables["params"]) == {"stem", "conv1", "conv2", "postprocessor"}
  assert model.apply(variables, x, train=False).shape == (2, 3)
  assert "ToyNet" in families.study_labels()
  assert registry.resolve(spec).bn_momentum == layers.RKNET_BN_MOMENTUM
  with pytest.raises(ValueError, match="width=.*has 1 entries, expected 2"):
    registry.create_model("ToyNet-2", width=(4,))
  with pytest.raises(ValueError, match="depth=9"):
    registry.create_model("ToyNet-9")
  with pytest.raises(ValueError, match="no RKNet conversion"):
    toy_family.convert(spec)


def test_builtin_families_and_unknown_names():
  assert families.study_labels() == ("ERKNet", "IRKNet", "DenseNet", "CliqueNet")
  assert [f.name for f in families.families()][:4] == [
    "RKNetSpec",
    "TableauRKNetSpec",
    "DenseNetSpec",
    "CliqueNetSpec",
  ]
  assert families.by_spec_name("DenseNetSpec").convert("DenseNet-121")["name"] == (
    "ERKNet-3×1 3×1 3×1 1×1-B"
  )
  assert families.of_module(models.CliqueNet).spec is spec_lib.CliqueNetSpec
  with pytest.raises(ValueError, match="unknown family 'ToyNet'"):
    registry.parse_name("ToyNet-2")
  old = spec_lib.from_json(
    {"family": "CliqueNetSpec", "block_layers": [2, 2], "growth_rates": [4, 4]}
  )  # a module-style key of older files
  assert old == spec_lib.CliqueNetSpec(block_layers=(2, 2), growth_rate=4)
  with pytest.raises(ValueError, match="registered already"):
    families.register(families.by_spec_name("RKNetSpec"))


def test_a_module_checks_its_options_with_its_spec():
  model = models.RKNet(
    stages=(2,), steps=(1,), growth_rate=(4,), growth_multipliers=(2,), method="implicit"
  )
  with pytest.raises(ValueError, match="Rule 4"):
    model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)), train=False)
  # A module's spec is the spec it was built from, defaults resolved.
  spec = spec_lib.DenseNetSpec(block_layers=(2,), growth_rate=4, init_features=8)
  resolved = registry.resolve(spec)
  assert resolved.bn_momentum == layers.DENSENET_BN_MOMENTUM and resolved.dtype == "float32"
  assert registry.build(spec).spec() == resolved


def test_the_spec_layer_imports_no_flax(run_python):
  code = (
    "import sys; import rknet_jax.spec, rknet_jax.names, rknet_jax.paper; "
    "spec = rknet_jax.names.spec_from_name('ERKNet-2x1', growth_rate=4); "
    "loaded = sorted(m for m in sys.modules if m == 'flax' or m.startswith('flax.')); "
    "print(spec.name, loaded)"
  )
  out = run_python("-c", code, check=True).stdout.strip()
  assert out == "ERKNet-2×1-k4 []", out
