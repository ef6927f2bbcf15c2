"""Precise BatchNorm statistics (experiments/steps.py, train.py): exact averages of the batch
statistics of training batches, for every BatchNorm of every family, data-parallel,
deterministic and resumable; the paper configs (running averages) warn when too short.
"""

import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import input_pipeline, run_config, train
from experiments import steps as steps_lib
from experiments.configs import default, paper
import rknet_jax
from rknet_jax import layers, registry


def _init(model, x):
  return model.init({"params": jax.random.PRNGKey(0)}, x, train=False)


def _digits_batches(config, n):
  it = input_pipeline.train_iterator(config, start_step=0, process_index=0, process_count=1)
  batches = [next(it) for _ in range(n)]
  it.close()
  return batches


# Every family; the BatchNorms of each are applied once per forward pass, except where noted.
SINGLE_USE = [
  ("ERKNet-2x1 1x2-AB", dict(growth_rate=4, bottleneck_width=5)),
  ("ERKNet-9x1-B", dict(growth_rate=4)),  # buffer formulation
  ("IRKNet-3x1 2x1-AB", dict(growth_rate=4, num_updates=2)),  # own BNs per update pass
  ("RKNet-1x1 2x1", dict(growth_rate=4, method="implicit", share_weights=False)),
  ("RK4Net-4x1 4x1", dict(growth_rate=4)),
  ("DenseNet-BC-16-k4", {}),
  ("CliqueNet-ABC-T12-k4", {}),
]


# The families that compile longest here (20-45 s each on a loaded 2-core machine) run in the
# full suite only.
SLOW_FAMILIES = ("ERKNet-2x1 1x2-AB", "ERKNet-9x1-B", "DenseNet-BC-16-k4", "CliqueNet-ABC-T12-k4")


@pytest.mark.parametrize(
  "name,kwargs",
  [
    pytest.param(n, k, marks=pytest.mark.slow) if n in SLOW_FAMILIES else (n, k)
    for n, k in SINGLE_USE
  ],
  ids=[n for n, _ in SINGLE_USE],
)
def test_one_batch_statistics_make_eval_mode_reproduce_training_mode(tiny_config, name, kwargs):
  """The per-batch statistics are each BatchNorm's statistics of that batch: evaluating the
  same batch with them gives the train-mode logits (every BatchNorm, every family)."""
  model = registry.create_model(name, num_classes=10, dropout_rate=0.3, **kwargs)
  x = jnp.asarray(_digits_batches(tiny_config(batch_size=16), 1)[0]["image"])
  variables = _init(model, x)
  mesh = steps_lib.make_mesh(jax.devices()[:1])
  stats = steps_lib.make_bn_stats_step(model, mesh)(variables, x)
  assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
  no_dropout = model.clone(dropout_rate=0.0)
  train_logits, _ = no_dropout.apply(variables, x, train=True, mutable=["batch_stats"])
  eval_logits = model.apply({"params": variables["params"], "batch_stats": stats}, x, train=False)
  assert float(jnp.max(jnp.abs(train_logits - model.apply(variables, x, train=False)))) > 1e-3
  np.testing.assert_allclose(eval_logits, train_logits, rtol=2e-4, atol=2e-4)


def _numpy_precise_stats(model, variables, batches):
  """Reference: each BatchNorm's input captured in a plain train-mode forward pass, its
  per-channel mean and biased variance in float64, averaged over the BatchNorm's applications
  in a pass and then over the batches."""
  per_batch = []
  for b in batches:
    seen = {}

    def capture(next_fun, args, kwargs, context, seen=seen):
      module = context.module
      if context.method_name == "__call__" and isinstance(
        module, (nn.BatchNorm, layers.BatchNormParts)
      ):
        parts = args[0] if isinstance(module, layers.BatchNormParts) else [args[0]]
        x = np.concatenate([np.asarray(p, np.float64) for p in parts], axis=-1)
        seen.setdefault(module.scope.path, []).append(
          (x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2)))
        )
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
      model.clone(dropout_rate=0.0).apply(
        variables, jnp.asarray(b["image"]), train=True, mutable=["batch_stats"]
      )
    per_batch.append(
      {
        path: (np.mean([m for m, _ in apps], 0), np.mean([v for _, v in apps], 0))
        for path, apps in seen.items()
      }
    )
  return {
    path: tuple(np.mean([pb[path][i] for pb in per_batch], 0) for i in (0, 1))
    for path in per_batch[0]
  }, {path: len(apps) for path, apps in seen.items()}


@pytest.mark.parametrize(
  "name,kwargs,shared",
  [
    ("RK4Net-1x1 1x1", dict(growth_rate=4), True),  # f(t, y) shared by the 4 stages
    ("IRKNet-2x1 2x1-B", dict(growth_rate=4, share_weights=False, num_updates=2), True),
    ("ERKNet-2x1 2x1", dict(growth_rate=4), False),
  ],
)
def test_precise_statistics_equal_numpy_means_over_the_same_batches(
  tiny_config, name, kwargs, shared
):
  model = registry.create_model(name, num_classes=10, **kwargs)
  batches = _digits_batches(tiny_config(batch_size=32), 3)
  variables = _init(model, jnp.asarray(batches[0]["image"]))
  mesh = steps_lib.make_mesh()  # 8 devices
  got = steps_lib.precise_batch_stats(
    steps_lib.make_bn_stats_step(model, mesh), variables, batches, mesh, 32
  )
  want, applications = _numpy_precise_stats(model, variables, batches)
  assert (max(applications.values()) > 1) == shared
  flat = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
  for path, (mean, var) in want.items():
    np.testing.assert_allclose(flat[path + ("mean",)], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flat[path + ("var",)], var, rtol=1e-4, atol=1e-5)
  # The nn.BatchNorm / BatchNormParts modules hold every statistic of these models.
  assert len(want) * 2 == len(flat)


def test_eight_devices_give_the_statistics_of_one_device(tiny_config):
  config = tiny_config(model="ERKNet-2x1 1x1-B")
  model = run_config.build_model(config, 10)
  batches = _digits_batches(tiny_config(batch_size=64), 2)
  variables = _init(model, jnp.asarray(batches[0]["image"]))
  got = {}
  for n in (1, 8):
    mesh = steps_lib.make_mesh(jax.devices()[:n])
    got[n] = jax.device_get(
      steps_lib.precise_batch_stats(
        steps_lib.make_bn_stats_step(model, mesh), variables, batches, mesh, 64
      )
    )
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(got[8])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batches_are_the_first_of_the_epoch_of_the_last_step(tiny_config):
  assert [train.precise_bn_first_batch(s, 20) for s in (0, 1, 12, 20, 21, 40, 41)] == [
    0,
    0,
    0,
    0,
    20,
    20,
    40,
  ]
  assert train.precise_bn_batches(tiny_config(precise_bn_batches=50), 20) == 20
  assert train.precise_bn_batches(tiny_config(precise_bn_batches=5), 20) == 5
  assert train.precise_bn_batches(tiny_config(precise_bn_batches=0), 20) == 0


def _final(workdir):
  _, variables, _ = rknet_jax.load_checkpoint(workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  results.pop("train_wall_time_sec")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = [{k: v for k, v in json.loads(l).items() if not k.startswith("time_")} for l in f]
  return jax.device_get(variables), results, metrics


def _assert_identical(a, b):
  for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])):
    np.testing.assert_array_equal(x, y)
  assert a[1] == b[1]
  assert a[2] == b[2]


def test_runs_are_deterministic_resume_bit_identically_and_export_precise_statistics(
  tiny_config, tmp_path, caplog
):
  config = tiny_config(
    num_train_steps=24, checkpoint_every_steps=4, keep_checkpoints=10, precise_bn_batches=6
  )
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  first = train.train_and_evaluate(config, a)
  assert first["precise_bn_batches"] == 6
  assert first["test_top1_error"] != first["running_averages_test_top1_error"]
  # Same command again in a new workdir: bit for bit the same run.
  train.train_and_evaluate(config, b)
  _assert_identical(_final(a), _final(b))
  # The final checkpoint holds the precise statistics of its weights (recomputed here).
  variables = _final(a)[0]
  model = run_config.build_model(config, 10)
  mesh = steps_lib.make_mesh()
  again = train.precise_model_vars(
    config, variables, 24, 20, steps_lib.make_bn_stats_step(model, mesh), mesh
  )
  for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(jax.device_get(again))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # Interrupted after step 20 (newer checkpoints and outputs lost): resumes bit-identically.
  for s in (24,):
    shutil.rmtree(os.path.join(b, "checkpoints", str(s)))
  os.remove(os.path.join(b, "results.json"))
  with open(os.path.join(b, "metrics.jsonl")) as f:
    kept = [l for l in f if json.loads(l)["step"] <= 20]
  with open(os.path.join(b, "metrics.jsonl"), "w") as f:
    f.writelines(kept)
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, b)
  assert "Resumed from checkpoint step 20" in caplog.text
  _assert_identical(_final(a), _final(b))


@pytest.mark.slow
def test_continuing_a_finished_run_trains_the_same_weights(resumable_config, tmp_path, caplog):
  """The finished run's final checkpoint holds precise statistics; continuing from it says
  so, trains the same parameters and ends with the same precise statistics."""
  config = resumable_config(num_train_steps=12, precise_bn_batches=4)
  ref, cont = str(tmp_path / "ref"), str(tmp_path / "cont")
  train.train_and_evaluate(config, ref)
  short = resumable_config(num_train_steps=6, precise_bn_batches=4)
  train.train_and_evaluate(short, cont)
  with caplog.at_level(logging.WARNING):
    result = train.train_and_evaluate(config, cont)
  assert "holds precise BatchNorm statistics; the running averages continue from them" in (
    caplog.text
  )
  want, got = _final(ref), _final(cont)
  for x, y in zip(jax.tree.leaves(want[0]), jax.tree.leaves(got[0])):
    np.testing.assert_array_equal(x, y)
  assert result["test_top1_error"] == want[1]["test_top1_error"]


def test_short_runs_without_precise_bn_warn_naming_the_fix(tiny_config, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    off = train.train_and_evaluate(tiny_config(precise_bn_batches=0), str(tmp_path / "off"))
  assert "momentum 0.99 needs 459 steps" in caplog.text
  assert "--config.precise_bn_batches=50" in caplog.text
  assert off["precise_bn_batches"] == 0
  assert off["running_averages_test_top1_error"] == off["test_top1_error"]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "on"))
  assert "precise_bn_batches=50" not in caplog.text


def test_config_defaults_and_validation(tiny_config, tmp_path):
  assert default.get_config().precise_bn_batches == 50
  row = paper.get_config("table1_erknet_6x1_6x1_6x1")
  assert row.precise_bn_batches == 0  # the authors evaluate the running averages
  with pytest.raises(
    ValueError,
    match=r"config.precise_bn_batches must be a non-negative "
    r"integer; got -1",
  ):
    run_config.validate_config(tiny_config(precise_bn_batches=-1), str(tmp_path / "w"))
