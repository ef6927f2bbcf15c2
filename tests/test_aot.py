"""The runner's train step compiled ahead of time for a TPU pod slice (benchmarks/bench_aot.py).

libtpu (pinned in requirements.txt) compiles for compile-only devices of a TPU topology on a
machine without TPUs: the real TPU compiler, so the memory, sharding and collectives checked
here are those a TPU VM would run.
"""

import collections
import re

import pytest

from benchmarks import bench_aot
from experiments import steps as steps_lib
from experiments.configs import default

_TOPOLOGY, _SLICES, _BATCH = "v5e:2x2", 2, 40  # 5 examples per chip: no parameter dim


@pytest.fixture(scope="module")
def devices():
  return bench_aot.topology_devices(_TOPOLOGY, _SLICES)


@pytest.fixture(scope="module")
def compiled_train(devices):
  config = default.get_config()
  config.model = "ERKNet-1x1 1x1"
  config.growth_rate = 8
  config.batch_size = _BATCH
  config.model_kwargs.conv_impl = "xla"  # what "auto" resolves to on TPU
  config.model_kwargs.dropout_rate = 0.2
  mesh = steps_lib.make_mesh(devices)
  return bench_aot.compile_steps(config, (32, 32, 3), mesh, "buffer", ["train"])["train"]


def test_multi_slice_mesh_keeps_each_slice_contiguous(devices):
  assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
  # Interleave the slices: make_mesh must regroup them, each slice's ICI devices together.
  interleaved = [d for pair in zip(devices[:4], devices[4:]) for d in pair]
  mesh = steps_lib.make_mesh(interleaved)
  order = [d.slice_index for d in mesh.devices.flat]
  assert order == sorted(order) and mesh.axis_names == ("data",)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_train_step_fits_and_only_reduces_gradients(compiled_train):
  compiled = compiled_train["compiled"]
  mem = compiled.memory_analysis()
  used = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
  assert 0 < used < bench_aot.chip_specs(_TOPOLOGY)[2] * 2**30
  ops = bench_aot.collectives(compiled.as_text())
  kinds = collections.Counter(op.kind for op in ops)
  # Data parallelism: BatchNorm statistics and gradients are all-reduced.  Across slices
  # the TPU compiler exchanges each gradient over the data-centre network in pieces and
  # re-gathers the pieces within the slice (all-gathers of parameter-shaped data); no
  # activation (a batch-sized dimension, global or per chip) is ever gathered.
  assert kinds["all-reduce"] > 0
  assert set(kinds) <= {"all-reduce", "all-gather"}, kinds
  for op in ops:
    assert not {_BATCH, _BATCH // 8} & set(op.dims), op
  # Random bits are drawn shard-locally: at most the threefry counters of the batch index
  # (a few u32 per example) cross chips, never bits of an activation's size.
  assert all(op.bytes <= 4 * 4 * _BATCH for op in ops if "u32" in op.dtypes)


def test_state_replicated_and_batch_sharded(compiled_train):
  compiled = compiled_train["compiled"]
  state_in, batch_in = compiled.input_shardings[0]
  state_out, _ = compiled.output_shardings
  for sharding in jax_leaves(state_in) + jax_leaves(state_out):
    assert sharding.is_fully_replicated
  for name in ("image", "label"):
    spec = batch_in[name].spec
    assert spec[0] == "data" and not batch_in[name].is_fully_replicated


def test_collectives_parser_finds_loop_bodies():
  hlo = """HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %x = f32[4]{0} get-tuple-element(%p), index=1
  %ar = f32[4]{0} all-reduce(%x), replica_groups={}, to_apply=%add
  ROOT %t = (s32[], f32[4]) tuple(%i, %ar)
}

ENTRY %main (a: f32[8]) -> f32[16] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[4]) while(%init), condition=%cond, body=%body
  ROOT %g = u32[16]{0} all-gather(%a), dimensions={0}
}
"""
  ops = bench_aot.collectives(hlo)
  assert [(o.kind, o.bytes, o.in_loop, o.dtypes, o.dims) for o in ops] == [
    ("all-reduce", 16, True, ("f32",), (4,)),
    ("all-gather", 64, False, ("u32",), (16,)),
  ]


def jax_leaves(tree):
  import jax

  return jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "is_fully_replicated"))


def _fusions_with(hlo: str, pattern: str) -> set[str]:
  """Names of the fusion instructions whose fused computations (any depth) match ``pattern``."""
  comps, current = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
    if m:
      current = comps.setdefault(m.group(1), [])
    elif current is not None:
      current.append(line)

  def holds(name, seen=()):
    lines = comps.get(name, [])
    return any(re.search(pattern, l) for l in lines) or any(
      holds(c, seen + (name,))
      for l in lines
      for c in re.findall(r"calls=%?([\w.\-]+)", l)
      if c not in seen
    )

  return {
    m.group(1)
    for lines in comps.values()
    for l in lines
    if (m := re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = .* fusion\(.*calls=%?([\w.\-]+)", l))
    and holds(m.group(2))
  }


def test_dropout_masks_are_computed_once_not_inside_consumers(compiled_train):
  # rknet_jax.dropout: the mask's threefry behind an optimisation barrier, so XLA computes
  # each mask in a fusion of its own instead of recomputing the random bits inside every
  # fusion that reads the dropped-out activations (convolutions, BatchNorm, the dense
  # buffer's updates: the slowest fusions to compile, benchmarks/README.md).  Without the
  # barrier, 5 of this step's 8 fusions with random bits also multiply (they apply the mask).
  hlo = compiled_train["compiled"].as_text()
  random_bits = _fusions_with(hlo, r"\bxor\(")
  consumers = _fusions_with(hlo, r"\b(convolution|multiply|reduce|dynamic-update-slice)\(")
  assert random_bits and consumers  # both still there, apart
  assert not random_bits & consumers, sorted(random_bits & consumers)
