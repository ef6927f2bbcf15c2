"""Tests for the runner (experiments/train.py, steps.py, optim.py): data parallelism, exact
eval, end-to-end runs, resume.

Tiny models (k = 4, one or two periods) and few steps keep every test to seconds; the
eight virtual CPU devices come from tests/conftest.py.
"""

import collections
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest

from experiments import evaluate as evaluate_lib
from experiments import input_pipeline, optim, run_config, train
from experiments import steps as steps_lib
from experiments.data import fingerprint as fingerprint_lib
from experiments.data import in_memory, tfds_utils
import rknet_jax

tfds = tfds_utils.import_tfds()


def test_eight_devices_give_the_losses_and_params_of_one_device(tiny_config):
  """Batch sharded on 8 devices, BN over the global batch: same function as 1 device."""
  config = tiny_config()
  info = input_pipeline.dataset_info("digits")
  model = run_config.build_model(config, info.num_classes)
  schedule = optim.learning_rate_schedule(config, 20, 100)
  tx = optim.make_optimizer(config, schedule)
  batches = [
    b
    for _, b in zip(
      range(3),
      input_pipeline.train_iterator(config, start_step=0, process_index=0, process_count=1),
    )
  ]
  results = {}
  for n in (1, 8):
    mesh = steps_lib.make_mesh(jax.devices()[:n])
    state = steps_lib.create_train_state(model, tx, info.image_shape, 0, mesh)
    step = steps_lib.make_train_step(model, tx, schedule, mesh, state)
    losses = []
    for b in batches:
      state, m = step(state, steps_lib.global_batch(b, mesh, config.batch_size))
      losses.append(float(m["loss"]))
    leaf = jax.tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == n  # replicated on every mesh device
    results[n] = (losses, jax.device_get(state.params), jax.device_get(state.batch_stats))
  np.testing.assert_allclose(results[1][0], results[8][0], rtol=0, atol=1e-5)
  assert results[1][0][0] != results[1][0][2]  # training moved
  for a, b in zip(jax.tree.leaves(results[1][1:]), jax.tree.leaves(results[8][1:])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_exact_eval_counts_1003_examples_at_batch_64_on_8_devices(tiny_config):
  with tfds.testing.mock_data(num_examples=1003):
    config = tiny_config(dataset="cifar10", validation_size=0, data_dir="/nonexistent")
    info = input_pipeline.dataset_info("cifar10")
    model = run_config.build_model(config, info.num_classes)
    mesh = steps_lib.make_mesh()
    variables = steps_lib.create_train_state(
      model, optim.make_optimizer(config, 0.1), info.image_shape, 1, mesh
    ).model_vars()
    assert mesh.devices.size == 8
    batches = input_pipeline.eval_iterator(
      config, "test", batch_size=64, process_index=0, process_count=1
    )
    out = steps_lib.evaluate(steps_lib.make_eval_step(model, mesh), variables, batches, mesh, 64)
    assert out["examples"] == 1003
    # Reference: every example once, no padding, plain numpy.
    images, labels = [], []
    for b in input_pipeline.eval_iterator(
      config, "test", batch_size=1003, process_index=0, process_count=1
    ):
      images.append(b["image"]), labels.append(b["label"])
    logits = np.asarray(
      jax.jit(lambda v, x: model.apply(v, x, train=False))(
        jax.device_get(variables), np.concatenate(images)
      )
    )
    labels = np.concatenate(labels)
    assert len(labels) == 1003
    top1 = np.mean(np.argmax(logits, -1) != labels)
    top5 = np.mean([l not in np.argsort(-z)[:5] for z, l in zip(logits, labels)])
    assert out["top1_error"] == pytest.approx(top1, abs=1e-9)
    assert out["top5_error"] == pytest.approx(top5, abs=1e-9)


def test_digits_end_to_end_results_files_evaluate_and_load_checkpoint(
  tiny_config, tmp_path, caplog
):
  workdir = str(tmp_path / "run")
  config = tiny_config(test_model="best", num_train_steps=40, keep_checkpoints=2)
  results = train.train_and_evaluate(config, workdir)
  for key in (
    "dataset",
    "model",
    "params",
    "gflops",
    "steps",
    "test_examples",
    "test_top1_error",
    "test_top5_error",
    "test_model",
  ):
    assert key in results
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk["test_top1_error"] == results["test_top1_error"]
  assert on_disk["test_examples"] == 360 and on_disk["steps"] == 40
  assert on_disk["test_model"] == "best"
  assert on_disk["params"] == rknet_jax.count_params(run_config.build_model(config, 10), (8, 8, 1))
  assert on_disk["gflops"] > 0
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {r["split"] for r in recs} == {"train", "validation", "test"}
  assert all(np.isfinite(r["loss"]) for r in recs)
  # Checkpoints: epoch ends (20, 40) and every 5 steps; keep last 2 + the best one.
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps[-2:] == [35, 40]
  best = on_disk["best_validation_step"]
  val = {r["step"]: r["top1_error"] for r in recs if r["split"] == "validation"}
  assert best in steps and val[best] == min(val.values())
  assert on_disk["test_checkpoint_step"] == best
  assert len(steps) <= 3
  # The exact evaluator on the best checkpoint reproduces the run's test numbers.
  out = evaluate_lib.evaluate_checkpoint(workdir, step=best)
  assert out["examples"] == 360
  assert out["top1_error"] == pytest.approx(on_disk["test_top1_error"], abs=1e-9)
  # load_checkpoint: the final model (8-device checkpoint) on one device.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    model, variables, predict = rknet_jax.load_checkpoint(workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not [m for m in warnings if "read only" in m or "read_only" in m]  # orbax's notices
  assert set(variables) == {"params", "batch_stats"}
  test = next(
    iter(
      input_pipeline.eval_iterator(config, "test", batch_size=360, process_index=0, process_count=1)
    )
  )
  logits = np.asarray(predict(test["image"], preprocess=False))  # already standardised
  assert logits.shape == (360, 10) and logits.dtype == np.float32
  final = evaluate_lib.evaluate_checkpoint(workdir)
  assert final["step"] == 40
  assert np.mean(np.argmax(logits, -1) != test["label"]) == pytest.approx(
    final["top1_error"], abs=1e-9
  )
  assert model.num_classes == 10


def test_a_run_and_an_evaluation_each_read_their_data_once(
  tiny_config, digits_splits, tmp_path, monkeypatch
):
  """One ``train_and_evaluate`` call (new or resumed, with validation and precise BN) and one
  ``evaluate_checkpoint`` call each load and check the official splits once, carve the
  validation split once, and compute mean/std and the file's SHA-256 once (npz: no published
  statistics; digits: neither statistics nor a file to hash)."""
  train_split, test_split = digits_splits
  path = tmp_path / "digits.npz"
  np.savez(
    path,
    train_images=train_split.images,
    train_labels=train_split.labels,
    test_images=test_split.images,
    test_labels=test_split.labels,
  )
  calls = collections.Counter()

  def counted(name, fn):
    def wrapper(*args, **kwargs):
      calls[name] += 1
      return fn(*args, **kwargs)

    return wrapper

  for source in ("digits", "npz"):
    loader = input_pipeline._IN_MEMORY_LOADERS[source]
    monkeypatch.setitem(input_pipeline._IN_MEMORY_LOADERS, source, counted("load", loader))
  monkeypatch.setattr(in_memory, "holdout", counted("holdout", in_memory.holdout))
  monkeypatch.setattr(in_memory, "image_summary", counted("mean/std", in_memory.image_summary))
  sha256 = fingerprint_lib._sha256_of_file
  monkeypatch.setattr(fingerprint_lib, "_sha256_of_file", counted("sha256", sha256))
  once = {"load": 1, "holdout": 1}
  for dataset, steps, expected in (
    ("digits", 6, once),
    (f"npz:{path}", 6, dict(once, **{"mean/std": 1, "sha256": 1})),
    (f"npz:{path}", 12, dict(once, **{"mean/std": 1, "sha256": 1})),  # resumed at step 6
  ):
    calls.clear()
    config = tiny_config(
      dataset=dataset, num_train_steps=steps, precise_bn_batches=4, keep_checkpoints=10
    )
    results = train.train_and_evaluate(config, str(tmp_path / dataset.split(":")[0]))
    assert results["steps"] == steps and results["validation_examples"] == 144
    assert calls == expected, (dataset, steps)
  calls.clear()
  out = evaluate_lib.evaluate_checkpoint(str(tmp_path / "npz"), step=10)  # precise BN again
  assert out["examples"] == 360 and out["batch_stats"] == "precise"
  assert calls == {"load": 1, "holdout": 1, "mean/std": 1, "sha256": 1}


@pytest.mark.slow
def test_checkpoints_move_between_8_and_1_devices_and_match(resumable_config, tmp_path, caplog):
  """6 steps on 8 devices then 6 on 1 (and 1 then 8) = 12 steps on 1 device."""
  config = resumable_config(checkpoint_every_steps=6)
  first = config.copy_and_resolve_references()
  first.num_train_steps = 6
  one, eight = steps_lib.make_mesh(jax.devices()[:1]), steps_lib.make_mesh()
  ref = str(tmp_path / "ref")
  train.train_and_evaluate(config, ref, mesh=one)
  _, ref_vars, _ = rknet_jax.load_checkpoint(ref)
  for name, a, b in (("8to1", eight, one), ("1to8", one, eight)):
    workdir = str(tmp_path / name)
    train.train_and_evaluate(first, workdir, mesh=a)
    caplog.clear()
    with caplog.at_level(logging.INFO):
      r = train.train_and_evaluate(config, workdir, mesh=b)
    assert "Resumed from checkpoint step 6" in caplog.text
    assert r["steps"] == 12 and r["devices"] == b.devices.size
    _, got, _ = rknet_jax.load_checkpoint(workdir)
    for x, y in zip(jax.tree.leaves(ref_vars), jax.tree.leaves(got)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_naming_the_step_without_checkpointing_it(resumable_config, tmp_path):
  workdir = str(tmp_path / "nan")
  config = resumable_config(
    learning_rate=1e30, weight_decay=0.0, checkpoint_every_steps=1, log_every_steps=1
  )
  with pytest.raises(FloatingPointError, match=r"non-finite training state at step (\d+)") as e:
    train.train_and_evaluate(config, workdir)
  bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert steps and max(steps) < bad  # the broken state was never written
  _, variables, _ = rknet_jax.load_checkpoint(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))
  # When no checkpoint restores at all, the run refuses to start over and moves nothing.
  for s in steps:
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(s), "model"))
  with pytest.raises(RuntimeError, match="none of the checkpoints .* can be restored"):
    train.train_and_evaluate(config, workdir)
  assert sorted(
    int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()
  ) == sorted(steps)
  assert not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))


@pytest.mark.parametrize(
  "dataset,model,stem,size,dtype",
  [
    ("cifar10", "ERKNet-1x1 1x1", "cifar", 32, "bfloat16"),
    ("imagenet2012", "ERKNet-1x1 1x1-B", "imagenet", 32, "float32"),
  ],
)
@pytest.mark.slow
def test_mock_data_end_to_end(tiny_config, tmp_path, dataset, model, stem, size, dtype):
  """The tfds pipelines (CIFAR-10 in memory, ImageNet via tf.data) drive a few steps."""
  with tfds.testing.mock_data(num_examples=80):
    config = tiny_config(
      dataset=dataset,
      model=model,
      stem=stem,
      image_size=size,
      dtype=dtype,
      validation_size=16,
      batch_size=16,
      eval_batch_size=16,
      num_train_steps=3,
      data_dir="/nonexistent",
      download=False,
      shuffle_buffer=16,
      augment=dataset == "imagenet2012",
    )
    r = train.train_and_evaluate(config, str(tmp_path / dataset))
  assert r["steps"] == 3 and r["dataset"] == dataset
  assert r["test_examples"] == 80
  assert 0.0 <= r["test_top1_error"] <= 1.0 and r["test_top5_error"] <= r["test_top1_error"]
  assert np.isfinite(r["test_loss"])
