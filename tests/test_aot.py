"""The runner's train step compiled ahead of time for a TPU pod slice (benchmarks/bench_aot.py).

libtpu (pinned in requirements.txt) compiles for compile-only devices of a TPU topology on a
machine without TPUs: the real TPU compiler, so the memory, sharding and collectives checked
here are those a TPU VM would run.
"""

import collections
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import pytest

from benchmarks import bench_aot
from experiments import steps as steps_lib
from experiments.configs import default
from rknet_jax import blocks, registry
from rknet_jax import conv as conv_lib
from rknet_jax import dropout as dropout_lib

_TOPOLOGY, _SLICES, _BATCH = "v5e:2x2", 2, 40  # 5 examples per chip: no parameter dim
# XLA:TPU splits a cross-slice all-reduce above a size threshold over the slice's chips (each
# sends 1/n over the data-centre network, then the n pieces are all-gathered); this value of
# the threshold turns the split off for the model below on v5e 2x2 slices.
_NO_DCN_SPLIT = {"xla_tpu_split_local_ar_for_dcn_ar_threshold": 2**40}


@pytest.fixture(scope="module")
def devices():
  return bench_aot.topology_devices(_TOPOLOGY, _SLICES)


def _compile_train(devices, compiler_options=None):
  config = default.get_config()
  config.model = "ERKNet-1x1 1x1"
  config.growth_rate = 8
  config.batch_size = _BATCH
  config.model_kwargs.dropout_rate = 0.2  # conv_impl, dense_formulation: "auto"
  mesh = steps_lib.make_mesh(devices)
  # 40x40 images: the first feature maps are as wide as the global batch (see
  # test_dropout_draws_no_collective_when_batch_and_spatial_sizes_meet).
  out = bench_aot.compile_steps(config, (40, 40, 3), mesh, "auto", ["train"], compiler_options)
  return out["train"]


@pytest.fixture(scope="module")
def compiled_train(devices):
  return _compile_train(devices)


def test_auto_resolves_for_the_platform_of_the_mesh(devices):
  """``conv_impl="auto"`` and the dense blocks' ``"auto"`` follow the devices a step is
  compiled for, not the host's default backend (here the CPU)."""
  model = registry.create_model("ERKNet-1x1 1x1", growth_rate=8, num_classes=10)
  assert model.conv_impl == "auto" and jax.default_backend() == "cpu"
  tpu_mesh, cpu_mesh = steps_lib.make_mesh(devices), steps_lib.make_mesh(jax.devices()[:1])
  for_tpu = steps_lib.model_for_mesh(model, tpu_mesh)
  for_cpu = steps_lib.model_for_mesh(model, cpu_mesh)
  assert for_tpu.conv_impl == "xla"
  assert for_cpu.conv_impl == conv_lib.resolve_impl("auto") == "dot1x1"  # as before
  # A shallow dense block: the channel buffer with XLA's convolutions, the loop on CPU.
  assert blocks.DenseBlock(2, 8, config=for_tpu.layer_config()).uses_buffer()
  assert not blocks.DenseBlock(2, 8, config=for_cpu.layer_config()).uses_buffer()
  # The programs themselves: on TPU every convolution (the 1x1 transition too) is XLA's.
  variables = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
  for mesh, dots in ((tpu_mesh, 0), (cpu_mesh, 1)):
    text = steps_lib.make_bn_stats_step(model, mesh).lower(variables, images).as_text()
    assert text.count("stablehlo.dot_general") == dots
    assert text.count("stablehlo.convolution") == 4 - dots


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
  # Data parallelism: BatchNorm statistics and gradients are all-reduced, within the slice
  # and between slices (sends over the data-centre network).  The TPU compiler exchanges
  # each larger gradient between slices in pieces, 1/4 per chip, and all-gathers the
  # reduced pieces within the slice: every all-gather is such a gather; no activation (a
  # batch-sized dimension, global or per chip) is ever gathered.
  assert kinds["all-reduce"] > 0 and kinds["dcn-send"] > 0 and kinds["all-gather"] > 0
  assert set(kinds) <= {"all-reduce", "all-gather", "dcn-send"}, kinds
  assert all(op.after_dcn for op in ops if op.kind == "all-gather")
  for op in ops:
    assert not {_BATCH, _BATCH // 8} & set(op.dims), op
  # Random bits and their counters are drawn shard-locally: nothing on u32 crosses chips.
  assert not [op for op in ops if "u32" in op.dtypes]


@pytest.mark.slow
def test_no_all_gather_but_the_compilers_split_of_cross_slice_reductions(devices, compiled_train):
  """With the compiler's split of cross-slice all-reduces off, nothing is all-gathered: the
  runner's shardings (state, batch, random bits) need no gather.  (The split is kept: on
  the paper's models it cuts the bytes each chip sends between slices several-fold,
  benchmarks/README.md.)"""
  ops = bench_aot.collectives(_compile_train(devices, _NO_DCN_SPLIT)["compiled"].as_text())
  kinds = collections.Counter(op.kind for op in ops)
  assert kinds["all-reduce"] > 0 and kinds["dcn-send"] > 0
  assert set(kinds) == {"all-reduce", "dcn-send"}, kinds
  split = bench_aot.collectives(compiled_train["compiled"].as_text())
  assert kinds["all-reduce"] == sum(op.kind == "all-reduce" for op in split)


def test_dropout_draws_no_collective_when_batch_and_spatial_sizes_meet(devices):
  """Global batch 16 on 16x16 maps, one slice of 4 chips: the TPU compiler all-reduces u32
  counters for ``jax.random.bernoulli`` of the activation's shape (flax's dropout draw), not
  for :func:`rknet_jax.dropout.keep_mask` (the same bits)."""
  mesh = steps_lib.make_mesh([d for d in devices if d.slice_index == 0])
  data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((16, 16, 16, 12), jnp.float32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)

  def u32_collectives(draw):
    def f(x, key):
      with jax.threefry_partitionable(True):
        return jnp.where(draw(key, 0.8, x.shape), x, 0.0).sum()

    jitted = jax.jit(f, in_shardings=(data, replicated), out_shardings=replicated)
    ops = bench_aot.collectives(jitted.lower(x, key).compile().as_text())
    return [op for op in ops if "u32" in op.dtypes]

  assert u32_collectives(jax.random.bernoulli)
  assert not u32_collectives(dropout_lib.keep_mask)


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


def test_collectives_parser_marks_gathers_of_cross_slice_transfers():
  """A send to the other slice is a ``dcn-send`` of its data array; an all-gather of what
  came back (through tuple elements, bitcasts, copies) is ``after_dcn``; one of a value
  computed from it together with other data is not."""
  hlo = """HloModule m

ENTRY %main (a: f32[3,8,128], b: f32[3,8,128]) -> f32[12,8,128] {
  %a = f32[3,8,128]{2,1,0} parameter(0)
  %b = f32[3,8,128]{2,1,0} parameter(1)
  %tok = token[] after-all()
  %send = (f32[3,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%a, %tok), MEGASCALE
  %recv = (f32[3,8,128]{2,1,0:T(8,128)}, u32[], token[]) recv(%tok), MEGASCALE
  %done = (f32[3,8,128]{2,1,0}, token[]) recv-done(%recv), MEGASCALE
  %gte = f32[3,8,128]{2,1,0} get-tuple-element(%done), index=0
  %cp = f32[3,8,128]{2,1,0} copy(%gte)
  %g1 = f32[12,8,128]{2,1,0} all-gather(%cp), dimensions={0}
  %sum = f32[3,8,128]{2,1,0} add(%gte, %b)
  ROOT %g2 = f32[12,8,128]{2,1,0} all-gather(%sum), dimensions={0}
}
""".replace(
    "MEGASCALE", 'frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime"}'
  )
  ops = bench_aot.collectives(hlo)
  assert [(o.kind, o.bytes, o.dtypes, o.dims, o.after_dcn) for o in ops] == [
    ("dcn-send", 3 * 8 * 128 * 4, ("f32",), (3, 8, 128), False),
    ("all-gather", 12 * 8 * 128 * 4, ("f32",), (12, 8, 128), True),
    ("all-gather", 12 * 8 * 128 * 4, ("f32",), (12, 8, 128), False),
  ]
  summary = bench_aot.collective_summary(ops)
  assert summary["all-gather"]["after_dcn"] == 1 and summary["dcn-send"]["count"] == 1


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
