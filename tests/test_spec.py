"""Model specs: one validated value per model, names both ways, JSON, and clear errors for the
usual mistakes (misspelt keywords, strings for ints, look-alike letters, absurd sizes)."""

import dataclasses
import json
import time

import jax.numpy as jnp
import pytest

from rknet_jax import checkpoint, paper, registry
from rknet_jax import spec as spec_lib

SPECS = [
  registry.parse_name("ERKNet-3x1 3x1 6x1 2x1-B"),
  registry.parse_name(
    "IRKNet-2x1 3x2-AB",
    growth_rate=(4, 6),
    num_updates=2,
    update_order="jacobi",
    share_weights=False,
    dropout_rate=0.2,
    dtype=jnp.bfloat16,
    bn_epsilon=1e-3,
  ),
  registry.parse_name("RK4Net-1x2 4x1-A", growth_rate=8, learn_step_size=True),
  registry.parse_name("DenseNet-BC-100-k12", num_classes=100),
  registry.parse_name("CliqueNet-AB-T30-k150", num_updates=0),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_json_round_trip_and_name_round_trip(spec):
  assert spec_lib.from_json(spec.to_json()) == spec
  resolved = registry.resolve(spec)
  assert spec_lib.from_json(resolved.to_json()) == resolved
  assert None not in [
    getattr(resolved, f)
    for f in spec_lib.LAYER_OPTIONS
    if f in {g.name for g in dataclasses.fields(type(registry.build(spec)))}
  ]
  # the name reads back into the same spec once the fields it cannot say are given again
  said = {
    "stages",
    "steps",
    "attention",
    "bottleneck",
    "method",
    "tableau",
    "block_layers",
    "init_features",
    "compression",
    "step_options",
  }
  if not isinstance(spec, spec_lib.RKNetSpec | spec_lib.TableauRKNetSpec):
    said |= {"bottleneck_width", "growth_rate"}
  rest = {k: v for k, v in spec.fields().items() if k not in said}
  if isinstance(spec, spec_lib.TableauRKNetSpec):
    rest.update(dict(spec.step_options))
  assert registry.parse_name(spec.name, **rest) == spec


@pytest.mark.parametrize("name", registry.list_models())
def test_ready_made_spec_name_reads_back_to_the_same_spec(name):
  spec = registry.parse_name(name)
  assert registry.parse_name(spec.name) == spec


def test_specs_are_frozen_and_create_model_merges_overrides():
  spec = registry.parse_name("ERKNet-2x1 2x1", growth_rate=4)
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.growth_rate = (8, 8)  # pytype: disable=not-writable
  model = registry.create_model(spec, dropout_rate=0.2, growth_rate=6)
  assert model.dropout_rate == 0.2 and model.growth_rate == (6, 6)
  assert spec.growth_rate == (4, 4)
  with pytest.raises(ValueError, match="growth_multipliers=.*Rule 4"):  # validated again
    registry.create_model(spec.replace(method="implicit", growth_multipliers=2))
  with pytest.raises(ValueError, match=r"'num_update' \(did you mean 'num_updates'\?\)"):
    spec.replace(num_update=2)


def test_validation_happens_when_a_spec_is_made():
  with pytest.raises(ValueError, match="s >= 2"):
    spec_lib.RKNetSpec(stages=(1,), steps=(1,), growth_rate=4, method="implicit")
  with pytest.raises(ValueError, match="stem='svhn'"):
    spec_lib.DenseNetSpec(block_layers=(2,), growth_rate=4, init_features=8, stem="svhn")
  with pytest.raises(ValueError, match="needs at least one block"):
    spec_lib.DenseNetSpec(block_layers=(), growth_rate=4, init_features=8)
  with pytest.raises(
    ValueError,
    match=r"dtype='float64': expected one of \('float32', "
    r"'bfloat16', 'float16'\)",
  ):
    spec_lib.CliqueNetSpec(block_layers=(2,), growth_rate=4, dtype="float64")
  with pytest.raises(ValueError, match=r"conv_impl='fast'.*\('auto'"):
    spec_lib.CliqueNetSpec(block_layers=(2,), growth_rate=4, conv_impl="fast")
  with pytest.raises(ValueError, match="family='ResNet'"):
    spec_lib.from_json(json.dumps({"family": "ResNet"}))
  assert registry.parse_name("ERKNet-1x1", growth_rate=2, dtype="float16").dtype == "float16"


def test_misspelt_keyword_is_named_with_the_close_match():
  with pytest.raises(ValueError, match=r"'grwoth_rate' \(did you mean 'growth_rate'\?\)"):
    registry.create_model("ERKNet-3x1 3x1", grwoth_rate=36)
  with pytest.raises(ValueError, match=r"'num_classs' \(did you mean 'num_classes'\?\)"):
    registry.create_model("DenseNet-121", num_classs=10)
  with pytest.raises(ValueError, match=r"'learn_step_sise' \(did you mean 'learn_step_size'"):
    registry.create_model("RK4Net-1x1", growth_rate=4, learn_step_sise=True)


def test_growth_rate_as_a_string_is_refused_not_split_into_characters():
  with pytest.raises(ValueError, match=r"growth_rate='36' is a string: expected an int"):
    registry.create_model("ERKNet-3x1 3x1", growth_rate="36")
  with pytest.raises(ValueError, match="is a string"):
    registry.create_model("ERKNet-3x1 3x1", growth_rate=36, growth_multipliers="12")


@pytest.mark.parametrize(
  "name,char,meant",
  [
    ("IRКNet-3x1 3x1", "U+041A CYRILLIC CAPITAL LETTER KA", "'K'"),
    ("ERKNet-3х1", "U+0445 CYRILLIC SMALL LETTER HA", "'x'"),
    ("ERKNet-3✕1", "U+2715 MULTIPLICATION X", "'×'"),
    ("ERKNet-3x1−A", "U+2212 MINUS SIGN", "'-'"),
    ("ERKNet-３x1", "U+FF13 FULLWIDTH DIGIT THREE", "'3'"),
    ("DenseNet‐121", "U+2010 HYPHEN", "'-'"),
  ],
)
def test_look_alike_non_ascii_letters_get_a_hint(name, char, meant):
  with pytest.raises(ValueError) as info:
    registry.create_model(name, growth_rate=4)
  assert char in str(info.value) and f"did you mean {meant}?" in str(info.value)


@pytest.mark.parametrize(
  "name,match",
  [
    ("ERKNet-99999999999999999999x1", "s 99999999999999999999 is too large"),
    ("ERKNet-1001x1", "stages=.*from 1 to 1000"),
    ("ERKNet-500x1 500x1 1x1", "1001 layers is more than the 1000"),
    ("ERKNet-10x1-k999999", "k 999999 is too large|growth_rate"),
    ("DenseNet-BC-99999999-k24", "depth 99999999 is too large"),
    ("DenseNet-BC-6010-k24", "1001 layers|block_layers"),
  ],
)
def test_absurd_sizes_fail_at_once_naming_the_bound(name, match):
  start = time.perf_counter()
  with pytest.raises(ValueError, match=match):
    registry.create_model(name, **({} if name.startswith("DenseNet") else {"growth_rate": 4}))
  assert time.perf_counter() - start < 1.0
  with pytest.raises(ValueError, match="num_updates=101"):
    registry.create_model("IRKNet-2x1", growth_rate=4, num_updates=101)


def test_paper_rows_are_the_ready_made_models():
  assert [r.name for r in paper.ROWS] == registry.list_models()[:16]
  for row in paper.ROWS:
    assert registry.parse_name(row.name) == row.spec
  t3 = registry.parse_name("ERKNet-3x1 3x1 3x1 1x1-B-k32")  # a -k tag on a ready-made name
  assert t3 == paper.ROWS[13].spec
  assert registry.parse_name("ERKNet-3x1 3x1 3x1 1x1-B-k16").growth_multipliers == (2, 4, 8, 16)
  with pytest.raises(ValueError, match="did you mean 'table1_erknet_6x1_6x1_6x1'"):
    paper.row("table1_erknet_6x1_6x1_6")


def test_model_json_old_format_still_loads_with_its_batch_norm(tmp_path):
  old = {
    "name": "ERKNet-2x1 2x1",
    "input_shape": [8, 8, 1],
    "kwargs": {
      "growth_rate": 4,
      "num_classes": 10,
      "stem": "cifar",
      "dtype": "float32",
      "remat": False,
      "num_updates": 1,
      "update_order": "gauss_seidel",
      "share_weights": True,
      "dropout_rate": 0.0,
    },
  }
  (tmp_path / checkpoint.MODEL_FILE).write_text(json.dumps(old))
  spec = checkpoint.saved_spec(checkpoint.read_model_spec(str(tmp_path)))
  assert (spec.bn_epsilon, spec.bn_momentum) == (1e-5, 0.9)  # the defaults it was made with
  assert spec.growth_rate == (4, 4) and spec.stages == (2, 2)
  for name in ("RK4Net-1x1", "DenseNet-40-k4", "CliqueNet-T18-k4"):
    legacy = dict(old, name=name)
    assert checkpoint.model_from_spec(legacy).bn_epsilon == 1e-5
  # the new format is the resolved spec plus the input shape, and reads back equal
  new = registry.parse_name("IRKNet-2x1 2x1-AB", growth_rate=4)
  checkpoint.write_model_spec(str(tmp_path), new, (8, 8, 1))
  data = checkpoint.read_model_spec(str(tmp_path))
  assert data["input_shape"] == [8, 8, 1] and data["family"] == "RKNetSpec"
  assert checkpoint.saved_spec(data) == registry.resolve(new)
