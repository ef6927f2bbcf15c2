"""Tests for experiments/input_pipeline.py: no network; tfds.testing.mock_data and digits only."""

import itertools
import os

import numpy as np
import pytest

from experiments import input_pipeline as ip
from experiments.data import tfds_utils

tfds = tfds_utils.import_tfds()
tf = tfds_utils.import_tf()

CIFAR_MEAN = np.asarray(ip.dataset_info("cifar10").mean, np.float32)
CIFAR_STD = np.asarray(ip.dataset_info("cifar10").std, np.float32)


def take(iterator, n):
  batches = list(itertools.islice(iterator, n))
  iterator.close()
  return batches


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _data(config_or_data):
  """A config's `RunData` (built once by the caller, or here)."""
  if isinstance(config_or_data, ip.RunData):
    return config_or_data
  return ip.load(config_or_data)


def concat_hosts(config, step, num_steps, process_count):
  data = _data(config)  # read once for every host (each host of a real run reads its own)
  per_host = [
    take(
      data.train_iterator(start_step=step, process_index=p, process_count=process_count),
      num_steps,
    )
    for p in range(process_count)
  ]
  return [
    {k: np.concatenate([h[i][k] for h in per_host]) for k in per_host[0][i]}
    for i in range(num_steps)
  ]


def raw(images):
  """Undoes CIFAR standardisation; exact uint8 values come back if it was (x - mean) / std."""
  return images * CIFAR_STD + CIFAR_MEAN


# ------------------------------------------------------------------------------------------------
# Registry, config and preflight errors.


def test_unknown_dataset_lists_known_ones():
  for call in (
    lambda: ip.dataset_info("mnsit"),
    lambda: ip.preflight({"dataset": "mnsit", "batch_size": 8}),
    lambda: ip.train_iterator(
      {"dataset": "mnsit", "batch_size": 8}, start_step=0, process_index=0, process_count=1
    ),
    lambda: ip.check_dataset_name("mnsit"),
  ):
    with pytest.raises(ValueError, match="mnsit") as e:
      call()
    for name in (
      "cifar10",
      "cifar100",
      "svhn_cropped",
      "imagenet2012",
      "digits",
      "mnist",
      "fashion_mnist",
      "kmnist",
      "tfds:NAME",
      "npz:FILE",
      "folder:PATH",
    ):
      assert name in str(e.value)


def test_dataset_info():
  info = ip.dataset_info("cifar10")
  assert (info.num_classes, info.image_shape) == (10, (32, 32, 3))
  assert info.train_size + info.validation_size == 50_000 and info.test_size == 10_000
  assert ip.dataset_info("cifar100").num_classes == 100
  assert ip.dataset_info("imagenet2012", image_size=160).image_shape == (160, 160, 3)
  assert ip.dataset_info("digits").image_shape == (8, 8, 1)


def test_bad_config_values_are_named():
  base = {"dataset": "digits", "batch_size": 32}
  cases = [
    (dict(base, batch_size=0), "batch_size"),
    (dict(base, validation_size=1437), "validation_size=1437"),
    (dict(base, validation_size=-1), "validation_size"),
    (dict(base, augment=True), "augment"),
    (dict(base, svhn_extra=True), "svhn_extra"),
    ({"batch_size": 32}, "dataset"),
  ]
  for config, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      ip.train_iterator(config, start_step=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    ip.train_iterator(base, start_step=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index=4"):
    ip.train_iterator(base, start_step=0, process_index=4, process_count=4)
  with pytest.raises(ValueError, match="'train'"):
    ip.eval_iterator(base, "train", batch_size=8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="validation_size=0"):
    ip.eval_iterator(
      dict(base, validation_size=0), "validation", batch_size=8, process_index=0, process_count=1
    )


def test_preflight_names_missing_tfds_dataset_dir(tmp_path):
  config = {"dataset": "cifar10", "batch_size": 64, "data_dir": str(tmp_path)}
  with pytest.raises(FileNotFoundError) as e:
    ip.preflight(config)
  expected = str(tfds.builder("cifar10", data_dir=str(tmp_path)).data_dir)
  assert expected.startswith(str(tmp_path / "cifar10")) and expected in str(e.value)
  assert "download" in str(e.value)
  assert "will be downloaded" in ip.preflight(dict(config, download=True))
  assert "digits" in ip.preflight({"dataset": "digits", "batch_size": 64})


def test_preflight_names_missing_imagenet_tar_files(tmp_path):
  config = {"dataset": "imagenet2012", "batch_size": 256, "data_dir": str(tmp_path)}
  manual = tmp_path / "downloads" / "manual"
  train_tar, val_tar = manual / "ILSVRC2012_img_train.tar", manual / "ILSVRC2012_img_val.tar"
  with pytest.raises(FileNotFoundError) as e:
    ip.preflight(config)
  assert str(train_tar) in str(e.value) and str(val_tar) in str(e.value)
  manual.mkdir(parents=True)
  train_tar.write_bytes(b"")
  with pytest.raises(FileNotFoundError) as e:
    ip.preflight(dict(config, download=True))
  assert str(val_tar) in str(e.value) and str(train_tar) not in str(e.value)
  val_tar.write_bytes(b"")
  with pytest.raises(FileNotFoundError) as e:  # tars present, but preparing is not allowed
    ip.preflight(config)
  assert str(tmp_path / "imagenet2012") in str(e.value)
  assert "python -m experiments.prepare_data --dataset=imagenet2012" in str(e.value)
  assert "will be prepared" in ip.preflight(dict(config, download=True))
  # An explicit manual_dir is where the tar files are looked for.
  other = tmp_path / "elsewhere"
  with pytest.raises(FileNotFoundError, match=str(other / "ILSVRC2012_img_val.tar")):
    ip.preflight(dict(config, manual_dir=str(other), download=True))


# ------------------------------------------------------------------------------------------------
# Digits: real data, offline.


def test_digits_splits_sizes_disjoint_and_seeded():
  config = {"dataset": "digits", "batch_size": 32, "seed": 0}
  splits = ip.load_splits(config)
  assert (len(splits.train), len(splits.validation), len(splits.test)) == (1293, 144, 360)
  assert ip.split_sizes(config) == {"train": 1293, "validation": 144, "test": 360}
  assert ip.steps_per_epoch(config) == 1293 // 32
  # train/validation ids index the official train split; train/test are disjoint by sklearn id.
  assert not set(splits.train.ids) & set(splits.validation.ids)
  assert len(set(splits.train.ids) | set(splits.validation.ids)) == 1437
  assert splits.train.images.dtype == np.uint8 and splits.train.images.shape[1:] == (8, 8, 1)
  # Same split_seed -> same validation set; another -> another; the test split never moves.
  other = ip.load_splits(dict(config, split_seed=1))
  assert not np.array_equal(other.validation.ids, splits.validation.ids)
  np.testing.assert_array_equal(other.test.images, splits.test.images)
  assert len(ip.load_splits(dict(config, validation_size=0)).train) == 1437
  # The digits standardisation constants are the statistics of all 1,797 images.
  everything = np.concatenate(
    [splits.train.images, splits.validation.images, splits.test.images]
  ).astype(np.float64)
  info = ip.dataset_info("digits")
  np.testing.assert_allclose(
    [everything.mean(), everything.std()], [info.mean[0], info.std[0]], rtol=1e-9
  )
  # All ten classes appear in every split.
  for split in (splits.train, splits.validation, splits.test):
    assert set(split.labels) == set(range(10))


def test_digits_epoch_covers_train_set_once():
  config = {"dataset": "digits", "batch_size": 64, "seed": 3}
  steps = ip.steps_per_epoch(config)
  batches = take(
    ip.train_iterator(config, start_step=0, process_index=0, process_count=1), steps + 1
  )
  train = ip.load_splits(config).train
  flat = train.images.reshape(len(train), -1).astype(np.float32)
  info = ip.dataset_info("digits")
  seen = []
  for b in batches[:steps]:
    assert b["image"].dtype == np.float32 and b["image"].shape == (64, 8, 8, 1)
    assert b["label"].dtype == np.int32
    restored = b["image"].reshape(64, -1) * info.std[0] + info.mean[0]
    np.testing.assert_allclose(restored, np.round(restored), atol=1e-4)
    # Identify each example by (image, label) among the training examples.
    for x, y in zip(np.round(restored), b["label"]):
      matches = np.flatnonzero((flat == x).all(axis=1) & (train.labels == y))
      assert len(matches) >= 1
      seen.append(tuple(matches))
  # 20 steps x 64 = 1280 of the 1293 examples, none twice (duplicate digit images aside).
  assert len(set(seen)) >= len(seen) - 5
  # The next epoch starts with another order.
  assert not np.array_equal(batches[steps]["label"], batches[0]["label"])


def test_digits_exact_count_eval_8_hosts():
  # 1,003 real examples held out as validation, batch 64 over 8 simulated hosts.
  config = {"dataset": "digits", "batch_size": 32, "validation_size": 1003}
  check_exact_eval(
    config,
    "validation",
    1003,
    batch_size=64,
    process_count=8,
    labels=ip.load_splits(config).validation.labels,
  )


def check_exact_eval(config, split, num_examples, *, batch_size, process_count, labels=None):
  local = batch_size // process_count
  data = _data(config)  # read once for every host (each host of a real run reads its own)
  per_host = [
    list(
      data.eval_iterator(
        split,
        batch_size=batch_size,
        process_index=p,
        process_count=process_count,
        with_index=True,
      )
    )
    for p in range(process_count)
  ]
  num_batches = -(-num_examples // batch_size)
  assert all(len(h) == num_batches for h in per_host)
  counted, indices = 0.0, []
  for host in per_host:
    for b in host:
      assert b["image"].shape[0] == local and b["mask"].shape == (local,)
      assert b["mask"].dtype == np.float32 and b["label"].dtype == np.int32
      valid = b["mask"] > 0
      assert np.array_equal(valid, b["index"] >= 0)
      assert not b["image"][~valid].any() and not b["label"][~valid].any()
      counted += float(b["mask"].sum())
      indices.extend(b["index"][valid])
      if labels is not None:
        np.testing.assert_array_equal(b["label"][valid], labels[b["index"][valid]])
  assert counted == num_examples
  assert sorted(indices) == list(range(num_examples))
  # Host slices of each global batch are consecutive examples: global batch k = [kB, (k+1)B).
  for k in range(num_batches):
    glob = np.concatenate([h[k]["index"] for h in per_host])
    expected = np.arange(k * batch_size, (k + 1) * batch_size)
    np.testing.assert_array_equal(glob, np.where(expected < num_examples, expected, -1))


# ------------------------------------------------------------------------------------------------
# CIFAR-10 under tfds.testing.mock_data.

CIFAR = {
  "dataset": "cifar10",
  "batch_size": 16,
  "seed": 5,
  "validation_size": 10,
  "data_dir": "/nonexistent/never/read",
  "download": False,
}


@pytest.fixture
def mock_cifar():
  with tfds.testing.mock_data(num_examples=100):
    yield


def test_cifar_shapes_dtypes_standardisation_and_holdout(mock_cifar):
  del mock_cifar
  assert "mock" in ip.preflight(CIFAR)
  splits = ip.load_splits(CIFAR)
  assert (len(splits.train), len(splits.validation)) == (90, 10)
  assert not set(splits.train.ids) & set(splits.validation.ids)
  assert ip.steps_per_epoch(CIFAR) == 90 // 16
  batch = take(ip.train_iterator(CIFAR, start_step=0, process_index=0, process_count=1), 1)[0]
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  # (x - mean) / std with the published per-channel constants: undoing it gives back uint8
  # training images exactly.
  restored = raw(batch["image"])
  np.testing.assert_allclose(restored, np.round(restored), atol=1e-3)
  flat = splits.train.images.reshape(90, -1).astype(np.float32)
  for x, y in zip(np.round(restored).reshape(16, -1), batch["label"]):
    match = np.flatnonzero((flat == x).all(axis=1))
    assert len(match) == 1 and splits.train.labels[match[0]] == y
  # Over the whole (synthetic) training split, standardised pixels have per-channel mean
  # (m_data - mean) / std and std std_data / std.
  pixels = splits.train.images.reshape(-1, 3).astype(np.float64)
  epoch = take(ip.train_iterator(CIFAR, start_step=0, process_index=0, process_count=1), 5)
  got = np.concatenate([b["image"] for b in epoch]).reshape(-1, 3)
  assert abs(got.mean(0) - (pixels.mean(0) - CIFAR_MEAN) / CIFAR_STD).max() < 0.05
  assert abs(got.std(0) - pixels.std(0) / CIFAR_STD).max() < 0.05


def test_cifar_determinism_resume_and_hosts(mock_cifar):
  del mock_cifar
  for augment in (False, True):
    config = dict(CIFAR, augment=augment)
    data = ip.load(config)
    run = take(data.train_iterator(start_step=0, process_index=0, process_count=1), 13)
    # Same seed -> same batches (from the same data object, and from a new one).
    assert_batches_equal(
      run, take(data.train_iterator(start_step=0, process_index=0, process_count=1), 13)
    )
    assert_batches_equal(
      run, take(ip.train_iterator(config, start_step=0, process_index=0, process_count=1), 13)
    )
    # Resuming at step 7 (inside epoch 1; 5 steps per epoch) continues the same sequence,
    # across the next epoch boundary.
    resumed = take(data.train_iterator(start_step=7, process_index=0, process_count=1), 6)
    assert_batches_equal(run[7:], resumed)
    # Host slices concatenate to the one-host global batch, for 2 and 4 hosts.
    for hosts in (2, 4):
      assert_batches_equal(run[3:7], concat_hosts(data, 3, 4, hosts))
    # Another seed -> another order.
    other = take(
      ip.train_iterator(dict(config, seed=6), start_step=0, process_index=0, process_count=1), 2
    )
    assert not np.array_equal(other[0]["image"], run[0]["image"])


def test_cifar_augmentation_is_pad4_crop_and_flip(mock_cifar):
  del mock_cifar
  plain = take(ip.train_iterator(CIFAR, start_step=0, process_index=0, process_count=1), 3)
  aug = take(
    ip.train_iterator(dict(CIFAR, augment=True), start_step=0, process_index=0, process_count=1), 3
  )
  flips, offsets = 0, set()
  for p, a in zip(plain, aug):
    np.testing.assert_array_equal(p["label"], a["label"])  # same order, augmented images
    assert not np.array_equal(p["image"], a["image"])
    for x, y in zip(np.round(raw(p["image"])), np.round(raw(a["image"]))):
      padded = np.pad(x, ((4, 4), (4, 4), (0, 0)))
      found = [
        (dy, dx, f)
        for dy in range(9)
        for dx in range(9)
        for f in (False, True)
        if np.array_equal(y, (lambda c: c[:, ::-1] if f else c)(padded[dy : dy + 32, dx : dx + 32]))
      ]
      assert found, "augmented image is not a flipped/unflipped pad-4 crop of the original"
      flips += found[0][2]
      offsets.add(found[0][:2])
  assert 0 < flips < 48 and len(offsets) > 10


def test_cifar_exact_count_eval_1003_examples_8_hosts():
  with tfds.testing.mock_data(num_examples=1003):
    data = ip.load(dict(CIFAR, validation_size=0))
    check_exact_eval(
      data, "test", 1003, batch_size=64, process_count=8, labels=data.splits().test.labels
    )
    # Eval images are standardised like training images.
    b = next(iter(data.eval_iterator("test", batch_size=64, process_index=0, process_count=8)))
    np.testing.assert_allclose(raw(b["image"]), np.round(raw(b["image"])), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# ImageNet under tfds.testing.mock_data (random JPEGs of 5..50 pixels a side).

IMAGENET = {
  "dataset": "imagenet2012",
  "batch_size": 8,
  "seed": 1,
  "validation_size": 10,
  "image_size": 32,
  "shuffle_buffer": 16,
  "data_dir": "/nonexistent/never/read",
  "augment": None,
}


@pytest.mark.slow
def test_imagenet_pipeline_shapes_determinism_resume_hosts():
  with tfds.testing.mock_data(num_examples=24):
    assert "mock" in ip.preflight(IMAGENET)
    assert ip.steps_per_epoch(IMAGENET) == 3  # 24 mock examples per split // 8
    run = take(ip.train_iterator(IMAGENET, start_step=0, process_index=0, process_count=1), 5)
    for b in run:
      assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
      assert b["label"].shape == (8,) and b["label"].dtype == np.int32
      assert np.isfinite(b["image"]).all()
    # An epoch visits every example once: its labels are a permutation of the split's labels.
    split_labels = np.array(
      [
        int(ex["label"])
        for ex in tfds.as_numpy(tfds.builder("imagenet2012").as_dataset(split="train"))
      ]
    )
    np.testing.assert_array_equal(
      np.sort(np.concatenate([b["label"] for b in run[:3]])), np.sort(split_labels)
    )
    # Same seed -> same batches; resume inside epoch 1 continues the sequence.
    again = take(ip.train_iterator(IMAGENET, start_step=0, process_index=0, process_count=1), 5)
    assert_batches_equal(run, again)
    assert_batches_equal(
      run[4:], take(ip.train_iterator(IMAGENET, start_step=4, process_index=0, process_count=1), 1)
    )
    assert_batches_equal(run[2:4], concat_hosts(IMAGENET, 2, 2, 2))
    other = take(
      ip.train_iterator(dict(IMAGENET, seed=2), start_step=0, process_index=0, process_count=1), 1
    )
    assert not np.array_equal(other[0]["image"], run[0]["image"])
    # Epochs differ in order (or at least in augmentation).
    assert not np.array_equal(run[0]["image"], run[3]["image"])
    # Exact-count eval (mock splits all hold the same 24 examples): batch 8 on 2 hosts, and
    # batch 16 on 4 hosts (last global batch half padding).
    check_exact_eval(IMAGENET, "test", 24, batch_size=8, process_count=2, labels=split_labels)
    check_exact_eval(
      IMAGENET, "validation", 24, batch_size=16, process_count=4, labels=split_labels
    )


def test_imagenet_host_shards_mode_is_deterministic_and_resumable():
  config = dict(IMAGENET, host_shards=True)
  with tfds.testing.mock_data(num_examples=24):
    for p in range(2):
      run = take(ip.train_iterator(config, start_step=1, process_index=p, process_count=2), 4)
      assert all(b["image"].shape == (4, 32, 32, 3) for b in run)
      resumed = take(ip.train_iterator(config, start_step=3, process_index=p, process_count=2), 2)
      assert_batches_equal(run[2:], resumed)
    # The two hosts read different shards with different orders and augmentations.
    h0, h1 = (
      take(ip.train_iterator(config, start_step=0, process_index=p, process_count=2), 1)
      for p in range(2)
    )
    assert not np.array_equal(h0[0]["image"], h1[0]["image"])


def test_imagenet_eval_preprocessing_centre_crop_and_standardisation():
  from experiments.data import imagenet

  info = ip.dataset_info("imagenet2012")
  mean, std = np.asarray(info.mean), np.asarray(info.std)
  # A 300x400 image: left half one colour, right half another; the 224 centre crop of the
  # 256x341 resize keeps both halves, split in the middle.
  image = np.zeros((300, 400, 3), np.uint8)
  image[:, :200] = (200, 30, 90)
  image[:, 200:] = (20, 220, 140)
  data = tf.io.encode_jpeg(image, quality=100)
  out = imagenet.eval_preprocess(tf, data, image_size=224, mean=info.mean, std=info.std).numpy()
  assert out.shape == (224, 224, 3)
  restored = out * std + mean
  np.testing.assert_allclose(restored[:, :100].mean((0, 1)), (200, 30, 90), atol=3)
  np.testing.assert_allclose(restored[:, -100:].mean((0, 1)), (20, 220, 140), atol=3)
  # Training crops: right size, values of a jittered/lit image around the source colours.
  seed = tf.constant([3, 4], tf.int64)
  crops = [
    imagenet.train_preprocess(
      tf, data, tf.constant([3, i], tf.int64), image_size=64, mean=info.mean, std=info.std
    ).numpy()
    for i in range(8)
  ]
  assert all(c.shape == (64, 64, 3) for c in crops)
  assert len({c.tobytes() for c in crops}) == 8
  again = imagenet.train_preprocess(
    tf, data, seed, image_size=64, mean=info.mean, std=info.std
  ).numpy()
  np.testing.assert_array_equal(again, crops[4])
  restored = np.stack(crops) * std + mean
  assert restored.min() > -0.6 * 255 and restored.max() < 1.6 * 255


def test_tensorflow_sees_no_accelerator():
  assert all(d.device_type == "CPU" for d in tf.config.get_visible_devices())
  assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") is not None


def test_prefetcher_propagates_errors_and_stops_when_abandoned():
  import gc

  from experiments.data import prefetch

  def failing():
    yield 1
    raise KeyError("boom")

  it = prefetch.Prefetcher(failing())
  assert next(it) == 1
  with pytest.raises(KeyError, match="boom"):
    next(it)
  assert list(prefetch.Prefetcher(iter(range(5)), size=1)) == list(range(5))
  endless = prefetch.Prefetcher(itertools.count(), size=2)
  assert [next(endless) for _ in range(3)] == [0, 1, 2]
  thread = endless._thread
  del endless
  gc.collect()
  thread.join(timeout=5)  # the producer notices within ~0.1 s
  assert not thread.is_alive()
