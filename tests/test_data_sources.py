"""npz:FILE, folder:PATH and TFDS short-name sources, data.json, and predict on raw images.

Datasets are built in temporary folders from scikit-learn's digits; training runs use a tiny
ERKNet (k = 4) for a few steps.
"""

import itertools
import json
import logging
import os

import jax
import numpy as np
import pytest

from experiments import input_pipeline as ip
from experiments import train
from experiments.data import folder as folder_lib
from experiments.data import tfds_utils
import rknet_jax
from rknet_jax import preprocessing

tfds = tfds_utils.import_tfds()


def _to_28(images):
  """8x8x1 digits (0..16) -> 28x28 uint8 (0..255): 3x upscaled, padded by 2."""
  big = np.kron(images[..., 0], np.ones((3, 3), np.uint8)) * 15
  return np.pad(big, ((0, 0), (2, 2), (2, 2))).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# npz


def _write_npz(path, **arrays):
  np.savez(path, **arrays)
  return f"npz:{path}"


def test_npz_trains_on_28x28_gray_and_saves_its_statistics(data_config, digits_splits, tmp_path):
  train_split, test_split = digits_splits
  train_x, test_x = _to_28(train_split.images), _to_28(test_split.images)
  names = np.array([f"digit_{i}" for i in range(10)])
  dataset = _write_npz(
    tmp_path / "d.npz",
    train_images=train_x,
    train_labels=train_split.labels,
    test_images=test_x,
    test_labels=test_split.labels,
    class_names=names,
  )
  config = data_config(dataset)
  info = ip.dataset_info(config)
  assert info.image_shape == (28, 28, 1) and info.num_classes == 10
  assert info.class_names == tuple(names)
  np.testing.assert_allclose(info.mean, [train_x.mean()], rtol=1e-9)
  np.testing.assert_allclose(info.std, [train_x.std()], rtol=1e-9)
  batch = next(
    iter(ip.eval_iterator(config, "test", batch_size=8, process_index=0, process_count=1))
  )
  np.testing.assert_allclose(
    batch["image"][..., 0], (test_x[:8] - train_x.mean()) / train_x.std(), rtol=1e-5, atol=1e-5
  )
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  assert results["test_examples"] == len(test_x) and results["steps"] == 6
  spec = preprocessing.read_data_spec(workdir)
  assert spec["image_shape"] == [28, 28, 1] and spec["class_names"] == list(names)
  assert spec["mean"] == pytest.approx([train_x.mean()])


def test_best_model_selection_uses_the_datas_own_validation_split(
  data_config, digits_splits, tmp_path
):
  """test_model='best' with validation_size=0 works when the npz brings validation arrays,
  and is refused, before compiling, when it does not."""
  train_split, test_split = digits_splits
  arrays = dict(
    train_images=train_split.images[:200],
    train_labels=train_split.labels[:200],
    test_images=test_split.images,
    test_labels=test_split.labels,
  )
  own = _write_npz(
    tmp_path / "own.npz",
    validation_images=train_split.images[200:300],
    validation_labels=train_split.labels[200:300],
    **arrays,
  )
  results = train.train_and_evaluate(data_config(own, test_model="best"), str(tmp_path / "run_own"))
  assert results["test_model"] == "best" and results["validation_examples"] == 100
  assert results["best_validation_step"] is not None
  none = _write_npz(tmp_path / "none.npz", **arrays)
  with pytest.raises(ValueError, match="test_model='best' needs a validation split"):
    train.train_and_evaluate(data_config(none, test_model="best"), str(tmp_path / "run_none"))
  assert not (tmp_path / "run_none" / "checkpoints").exists() or not any(
    (tmp_path / "run_none" / "checkpoints").iterdir()
  )


def test_npz_errors_name_the_array(tmp_path):
  x = np.zeros((4, 8, 8), np.uint8)
  y = np.array([0, 1, 2, 1])
  good = dict(train_images=x, train_labels=y, test_images=x, test_labels=y)
  cases = [
    ({k: v for k, v in good.items() if k != "test_labels"}, r"lacks \['test_labels'\]"),
    (dict(good, train_images=np.zeros((4, 8), np.uint8)), r"train_images has shape \(4, 8\)"),
    (dict(good, train_images=x.astype(np.int64)), "train_images has dtype int64"),
    (dict(good, train_images=np.full((4, 8, 8), np.nan)), "train image 0 holds a non-finite pixel"),
    (dict(good, test_images=np.zeros((4, 9, 8), np.uint8)), r"test_images images are \(9, 8, 1\)"),
    (dict(good, train_labels=y[:3]), r"train_labels has shape \(3,\)"),
    (dict(good, train_labels=y + 0.5), r"train_labels\[0\] = 0.5 is not a whole number"),
    (dict(good, train_labels=np.array([0, -1, 2, 1])), r"train_labels\[1\] = -1"),
    (
      dict(good, test_labels=np.array([0, 1, 3, 1])),
      r"test_labels\[2\] = 3 is not a valid label \(0..2, the training classes\)",
    ),
    (dict(good, validation_images=x), "both validation_images and validation_labels"),
  ]
  for i, (arrays, pattern) in enumerate(cases):
    dataset = _write_npz(tmp_path / f"bad{i}.npz", **arrays)
    with pytest.raises(ValueError, match=pattern) as e:
      ip.preflight({"dataset": dataset, "batch_size": 2})
    assert str(tmp_path / f"bad{i}.npz") in str(e.value)
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    ip.preflight({"dataset": f"npz:{tmp_path / 'missing.npz'}", "batch_size": 2})
  # A text file: one line saying what an .npz is, not numpy's unsafe allow_pickle hint
  # (before: "... is not a readable .npz file: Cannot load file containing pickled data when
  # allow_pickle=False").
  (tmp_path / "junk.npz").write_text("label,pixels\n3,0 0 16\n")
  with pytest.raises(
    ValueError,
    match=r"junk.npz is not an .npz archive \(a file starting "
    r"with b'label,pi'; an .npz file is the zip archive numpy.savez writes",
  ) as e:
    ip.preflight({"dataset": f"npz:{tmp_path / 'junk.npz'}", "batch_size": 2})
  assert "pickle" not in str(e.value)
  (tmp_path / "cut.npz").write_bytes((tmp_path / "bad0.npz").read_bytes()[:40])  # a cut zip
  with pytest.raises(ValueError, match="cut.npz is not a readable .npz file") as e:
    ip.preflight({"dataset": f"npz:{tmp_path / 'cut.npz'}", "batch_size": 2})
  assert "pickle" not in str(e.value)
  # An own validation split is used as is (nothing held out of train).
  dataset = _write_npz(
    tmp_path / "val.npz", validation_images=x[:2], validation_labels=y[:2], **good
  )
  assert ip.split_sizes({"dataset": dataset, "batch_size": 2}) == {
    "train": 4,
    "validation": 2,
    "test": 4,
  }
  with pytest.raises(ValueError, match="own validation split"):
    ip.split_sizes({"dataset": dataset, "batch_size": 2, "validation_size": 1})


# ------------------------------------------------------------------------------------------------
# folder


def test_folder_of_png_trains_and_labels_are_sorted_folder_names(
  data_config, digits_splits, write_image_folder, tmp_path, caplog
):
  train_split, test_split = digits_splits

  def pick(split, n):
    return (split.images[:n, :, :, 0] * 15).astype(np.uint8), split.labels[:n]

  root = tmp_path / "data"
  dataset = write_image_folder(
    root, {"train": pick(train_split, 200), "test": pick(test_split, 50)}
  )
  # What a user's folder also holds: notes, hidden files and folders, a subfolder, a file next
  # to the class folders. All are skipped (one log line), none is read as an image or class.
  (root / "train" / "c3" / "notes.txt").write_text("my notes")
  (root / "train" / "c3" / "0000.png.txt").write_text("not an image either")
  (root / "train" / "c1" / ".DS_Store").write_bytes(b"\0\1")
  (root / "train" / "c1" / "old").mkdir()
  (root / "train" / "c1" / "old" / "0001.png").write_bytes(b"a subfolder is not read")
  (root / "train" / ".ipynb_checkpoints").mkdir()
  (root / "test" / "labels.csv").write_text("file,label")
  config = data_config(dataset)
  with caplog.at_level(logging.INFO):
    splits = ip.load_splits(config)
  skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert skipped == [
    f"folder:{root}: skipped 6 entries that are not images (2 hidden), e.g. "
    "'train/c1/old/', 'train/c3/0000.png.txt', 'train/c3/notes.txt'; images are files ending "
    "in " + " ".join(folder_lib.IMAGE_EXTENSIONS)
  ], skipped
  info = ip.dataset_info(config)
  assert info.image_shape == (8, 8, 1) and info.class_names == tuple(f"c{i}" for i in range(10))
  assert (info.train_size, info.test_size) == (200, 50)
  # Label i is the i-th sorted folder name; files are read in sorted order.
  expected = sorted(
    (f"c{label}", f"{i:04d}.png", i) for i, label in enumerate(pick(train_split, 200)[1])
  )
  np.testing.assert_array_equal(splits.train.labels, [int(c[1:]) for c, _, _ in expected])
  np.testing.assert_array_equal(
    splits.train.images[:, :, :, 0], pick(train_split, 200)[0][[i for _, _, i in expected]]
  )
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  assert results["test_examples"] == 50
  with open(os.path.join(workdir, preprocessing.DATA_FILE)) as f:
    assert json.load(f)["class_names"] == [f"c{i}" for i in range(10)]


def test_folder_colour_jpeg_mixed_sizes_and_validation(write_image_folder, tmp_path):
  rng = np.random.default_rng(0)

  def colour(n):
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % 2

  root = tmp_path / "data"
  dataset = write_image_folder(
    root, {"train": colour(6), "test": colour(4), "validation": colour(2)}, mode="RGB", ext="jpg"
  )
  # gray, 10x12
  write_image_folder(root, {"train": (np.zeros((1, 12, 10), np.uint8), [1])}, mode="L")
  config = {"dataset": dataset, "batch_size": 2}
  with pytest.raises(ValueError, match=r"c1/0000.png is 10x12 .* config.resize"):
    ip.preflight(config)
  config["resize"] = 8
  splits = ip.load_splits(config)
  assert splits.train.images.shape == (7, 8, 8, 3)  # the gray image got three channels
  assert len(splits.validation) == 2 and len(splits.test) == 4
  with pytest.raises(ValueError, match="folder:PATH datasets only"):
    ip.preflight({"dataset": "digits", "batch_size": 2, "resize": 8})


def test_folder_errors_name_the_file_or_folder(write_image_folder, tmp_path):
  def gray(n):
    return np.zeros((n, 8, 8), np.uint8), np.arange(n) % 2

  def make(name):
    root = tmp_path / name
    write_image_folder(root, {"train": gray(4), "test": gray(2)})
    return root

  def refused(root, match, error=ValueError):
    with pytest.raises(error, match=match):
      ip.preflight({"dataset": f"folder:{root}", "batch_size": 2})

  root = make("unreadable")
  (root / "train" / "c0" / "broken.png").write_bytes(b"\x89PNG not really")
  refused(root, r"cannot read image .*unreadable/train/c0/broken.png")
  root = make("empty")
  (root / "train" / "c7").mkdir()
  refused(
    root,
    r"class folder .*empty/train/c7 has no images \(it is "
    r"empty\): every class needs at least one image file \(.png .jpg",
  )
  root = make("notes_only")
  (root / "train" / "c9").mkdir()
  (root / "train" / "c9" / "notes.txt").write_text("hello")
  (root / "train" / "c9" / ".hidden.png").write_bytes(b"")
  refused(
    root,
    r"class folder .*notes_only/train/c9 has no images \(only "
    r"2 other entries, e.g. 'notes.txt'\)",
  )
  root = make("no_test_images")
  for picture in (root / "test").glob("c*/*.png"):
    picture.unlink()
  for class_dir in (root / "test").iterdir():
    class_dir.rmdir()
  (root / "test" / "README").write_text("to do")
  refused(
    root,
    r"no_test_images/test holds no images \(only 1 other "
    r"entries, e.g. 'test/README'\): expected .*/test/<class>/<image>",
  )
  root = make("extra_class")
  write_image_folder(root, {"test": (np.zeros((1, 8, 8), np.uint8), [5])})
  refused(root, r"extra_class/test/c5 has no counterpart")
  refused(tmp_path / "nowhere", r"nowhere/train not found", FileNotFoundError)


# ------------------------------------------------------------------------------------------------
# TFDS short names, and predict on raw images


def test_tfds_short_names_and_prefix_read_28x28_gray_with_computed_statistics():
  with tfds.testing.mock_data(num_examples=40):
    for name in ("mnist", "tfds:fashion_mnist", "kmnist"):
      data = ip.load({"dataset": name, "batch_size": 8})
      assert "mock_data" in data.preflight()
      info = data.info
      assert info.image_shape == (28, 28, 1) and info.num_classes == 10
      train_images = data.splits().train.images
      assert info.mean == pytest.approx((train_images.mean(),))
      batch = next(iter(data.train_iterator(start_step=0, process_index=0, process_count=1)))
      assert batch["image"].shape == (8, 28, 28, 1)


def test_predict_on_raw_images_reproduces_the_runs_test_error(data_config, tmp_path):
  config = data_config("digits", num_train_steps=100, batch_size=64, growth_rate=8)
  # 100 steps: running BN statistics that follow the batches quickly (the RKNet default,
  # the authors' 0.99, needs several hundred steps before eval mode is accurate).
  config.model_kwargs.bn_momentum = 0.9
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  _, _, predict = rknet_jax.load_checkpoint(workdir)
  raw = ip.load_splits(config).test  # uint8 0..16, as the dataset stores them
  logits = np.asarray(predict(raw.images[..., 0]))  # [N, H, W] is accepted for one channel
  error = np.mean(np.argmax(logits, -1) != raw.labels)
  assert error == pytest.approx(results["test_top1_error"], abs=1e-9)
  assert results["test_top1_error"] < 0.3
  # Before: predict fed raw pixels to the network as they were (28.6% vs 99.4%).
  unprocessed = np.asarray(predict(raw.images.astype(np.float32), preprocess=False))
  assert np.mean(np.argmax(unprocessed, -1) != raw.labels) > results["test_top1_error"] + 0.2
  assert predict.data_spec["class_names"] == [str(i) for i in range(10)]
  with pytest.raises(ValueError, match=r"do not match the training images \[N, 8, 8, 1\]"):
    predict(np.zeros((2, 9, 8, 1), np.uint8))
  os.remove(os.path.join(workdir, preprocessing.DATA_FILE))
  _, _, old_predict = rknet_jax.load_checkpoint(workdir)
  with pytest.raises(ValueError, match="preprocess=False"):
    old_predict(raw.images)


def test_large_folder_streams_from_files_with_the_batches_of_memory(
  write_image_folder, tmp_path, monkeypatch
):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
  dataset = write_image_folder(
    tmp_path / "data",
    {"train": (images[:30], np.arange(30) % 3), "test": (images[30:], np.arange(10) % 3)},
    mode="RGB",
  )
  config = {
    "dataset": dataset,
    "batch_size": 4,
    "validation_size": 6,
    "augment": True,
    "prefetch": 1,
  }

  def batches():
    train_batches = list(
      itertools.islice(ip.train_iterator(config, start_step=5, process_index=0, process_count=1), 4)
    )
    evals = [
      list(ip.eval_iterator(config, split, batch_size=4, process_index=0, process_count=1))
      for split in ("validation", "test")
    ]
    return train_batches, evals, ip.dataset_info(config)

  in_memory = batches()
  assert isinstance(ip.load_splits(config).train.images, np.ndarray)
  monkeypatch.setattr(folder_lib, "IN_MEMORY_BYTES", 0)
  streamed = batches()
  assert isinstance(ip.load_splits(config).train.images, folder_lib.FileImages)
  assert streamed[2] == in_memory[2]  # same statistics, shape, sizes
  for a, b in zip(jax.tree.leaves(streamed[:2]), jax.tree.leaves(in_memory[:2])):
    np.testing.assert_array_equal(a, b)
