"""Data checked at load, runs bound to their data, and predict knowing its input.

Each test names the silent wrong answer it used to give ("before") and asserts the refusal or
the right answer now. Datasets are built from scikit-learn's digits in temporary folders;
training runs use the tiny ERKNet of conftest.py for a few steps.
"""

import json
import logging
import os
import re
import shutil

import numpy as np
from PIL import Image
import pytest

from experiments import evaluate as evaluate_lib
from experiments import input_pipeline as ip
from experiments import train
from experiments.data import base
from experiments.data import fingerprint as fingerprint_lib
import rknet_jax
from rknet_jax import preprocessing


@pytest.fixture
def digits_arrays(digits_splits):
  """digits as npz arrays (fresh per test: tests edit them)."""
  train_split, test_split = digits_splits
  return dict(
    train_images=train_split.images[..., 0],
    train_labels=train_split.labels,
    test_images=test_split.images[..., 0],
    test_labels=test_split.labels,
  )


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return f"npz:{path}"


def _refused(dataset, pattern):
  with pytest.raises(ValueError, match=pattern) as e:
    ip.preflight({"dataset": dataset, "batch_size": 2})
  return str(e.value)


# ------------------------------------------------------------------------------------------------
# Checked at load.


def test_labels_that_do_not_fit_int32_or_are_not_whole_are_refused_before_the_cast(
  digits_arrays, tmp_path
):
  """Before: labels were cast to int32 unchecked, 2**32+3 trained as class 3 and 2**31 became
  negative (a NaN later blamed on the learning rate)."""
  d = digits_arrays
  labels = d["train_labels"].astype(np.int64)
  for i, value in ((7, 2**32 + 3), (11, 2**31)):
    bad = labels.copy()
    bad[i] = value
    message = _refused(
      _npz(tmp_path / f"big{i}.npz", **dict(d, train_labels=bad)),
      rf"train_labels\[{i}\] = {value} is not a valid label",
    )
    assert f"big{i}.npz" in message
  big_float = d["train_labels"].astype(np.float64)
  big_float[3] = 2.0**40
  _refused(
    _npz(tmp_path / "bigf.npz", **dict(d, train_labels=big_float)),
    r"train_labels\[3\] = 1099511627776.0 is not a valid label",
  )
  half = d["test_labels"].astype(np.float32)
  half[5] = 2.5
  _refused(
    _npz(tmp_path / "half.npz", **dict(d, test_labels=half)),
    r"test_labels\[5\] = 2.5 is not a whole number",
  )
  # Whole-number floats are labels like any other.
  ok = _npz(tmp_path / "float.npz", **dict(d, train_labels=d["train_labels"].astype(float)))
  splits = ip.load_splits({"dataset": ok, "batch_size": 2})
  np.testing.assert_array_equal(splits.train.labels, d["train_labels"])
  assert splits.train.labels.dtype == np.int32
  # The shared cast refuses the same values for every source.
  with pytest.raises(ValueError, match=r"labels\[1\] = 4294967299"):
    base.labels_int32(np.array([0, 2**32 + 3], np.uint64), "labels")


def test_one_class_of_training_labels_is_refused(digits_arrays, tmp_path):
  """Before: an npz whose labels are all 0 trained a 1-class model and reported test top-1
  error 0.0000."""
  d = digits_arrays
  zeros = dict(
    d, train_labels=np.zeros_like(d["train_labels"]), test_labels=np.zeros_like(d["test_labels"])
  )
  _refused(
    _npz(tmp_path / "zeros.npz", **zeros),
    r"every training label is 0 \(1437 images\): a classifier needs training examples "
    "of at least 2 classes",
  )
  # class_names do not make one present class into ten.
  named = dict(zeros, class_names=np.array([str(i) for i in range(10)]))
  _refused(_npz(tmp_path / "named.npz", **named), "every training label is 0")


def test_splits_at_another_scale_or_dtype_than_train_are_refused_naming_both(
  digits_arrays, tmp_path
):
  """Before: train images as float 0..1 with test images as uint8 0..255 were accepted; the
  reported test error was 0.90 against 0.28 for the same data at one scale."""
  d = digits_arrays
  as_unit = dict(
    d, train_images=d["train_images"] / 16.0, test_images=(d["test_images"] * 15).astype(np.uint8)
  )
  message = _refused(
    _npz(tmp_path / "mixed.npz", **as_unit),
    r"test images are uint8 in \[0, 240\] but train images are float32 in "
    r"\[0, 1\]",
  )
  assert "one dtype and one pixel scale" in message
  # Same dtype, other scale: float 0..1 train, float 0..255 test; and the reverse.
  floats = dict(d, train_images=d["train_images"] / 16.0, test_images=d["test_images"] * 15.0)
  _refused(
    _npz(tmp_path / "floats.npz", **floats),
    r"test images are float32 in \[0, 240\] .*reaches far outside the training range "
    r"\[0, 1\]",
  )
  reverse = dict(d, train_images=d["train_images"] * 15.0, test_images=d["test_images"] / 16.0)
  _refused(
    _npz(tmp_path / "reverse.npz", **reverse),
    r"test images are float32 in \[0, 1\] .*spans under 1/12 of the training range "
    r"\[0, 240\]",
  )
  val = dict(d, validation_images=d["test_images"] * 15, validation_labels=d["test_labels"])
  _refused(_npz(tmp_path / "val.npz", **val), r"validation images are uint8 in \[0, 240\]")
  # One scale everywhere (digits as floats 0..1) is fine.
  fine = dict(d, train_images=d["train_images"] / 16.0, test_images=d["test_images"] / 16.0)
  assert "1437 train" in ip.preflight(
    {"dataset": _npz(tmp_path / "fine.npz", **fine), "batch_size": 2}
  )


def test_non_finite_pixels_are_refused_naming_split_and_image(digits_arrays, tmp_path):
  d = digits_arrays
  test = d["test_images"].astype(np.float32)
  test[17, 3, 4] = np.inf
  _refused(
    _npz(tmp_path / "inf.npz", **dict(d, train_images=d["train_images"] * 1.0, test_images=test)),
    r"test image 17 holds a non-finite pixel \(inf\)",
  )


def test_every_in_memory_source_passes_the_same_check():
  """TFDS and folder data go through `base.check_official` too (here on hand-made splits)."""
  images = np.zeros((4, 8, 8, 1), np.uint8)
  images[:, 0, 0] = 255

  def split(labels):
    return base.Split(images, np.asarray(labels, np.int32), np.arange(4))

  names = ("a", "b")
  base.check_official(base.Official(split([0, 1, 0, 1]), split([1, 1, 0, 0]), None, names), "x")
  with pytest.raises(ValueError, match=r"x: test label \[2\] = 2 is not a valid label \(0..1"):
    base.check_official(base.Official(split([0, 1, 0, 1]), split([1, 1, 2, 0]), None, names), "x")
  with pytest.raises(ValueError, match="every training label is 1"):
    base.check_official(base.Official(split([1, 1, 1, 1]), split([1, 1, 0, 0]), None, names), "x")


# ------------------------------------------------------------------------------------------------
# A run is bound to its data.


def _swap_train_images(d):
  """The same test split with other training images (so other mean/std), one file size more."""
  swapped = dict(
    d,
    train_images=np.clip(d["train_images"].astype(np.int64) + 2, 0, 16).astype(np.uint8),
    extra=np.zeros(3),
  )
  return swapped


@pytest.mark.slow
def test_resume_and_evaluate_on_a_replaced_npz_are_refused_unless_asked(
  data_config, digits_arrays, tmp_path, caplog
):
  """Before: replacing the npz at the same path and resuming continued silently on the new
  data and rewrote data.json's mean/std; evaluate after the swap recomputed mean/std from the
  new file (0.85 vs 0.78)."""
  d = digits_arrays
  path = tmp_path / "data.npz"
  dataset = _npz(path, **d)
  workdir = str(tmp_path / "run")
  config = data_config(dataset, num_train_steps=6)
  train.train_and_evaluate(config, workdir)
  spec = preprocessing.read_data_spec(workdir)
  assert spec["fingerprint"]["size"] == os.path.getsize(path)
  before = evaluate_lib.evaluate_checkpoint(workdir)
  old_size = os.path.getsize(path)

  _npz(path, **_swap_train_images(d))
  new_size = os.path.getsize(path)
  with pytest.raises(
    ip.DataChanged,
    match=rf"the npz file {path} changed since this run started: size "
    rf"{old_size} bytes -> {new_size} bytes, sha256 \w+\.\.\. -> \w+"
    r"\.\.\..*config.allow_data_change=True",
  ):
    train.train_and_evaluate(data_config(dataset, num_train_steps=9), workdir)
  with pytest.raises(
    ip.DataChanged, match="Refusing to evaluate on other data.*--allow_data_change"
  ):
    evaluate_lib.evaluate_checkpoint(workdir)
  # Other classes cannot continue even when asked.
  with pytest.raises(ip.DataChanged, match=r"class_names \['0', '1', '2'\] differ .* \(not even"):
    three = dict(d, train_labels=d["train_labels"] % 3, test_labels=d["test_labels"] % 3)
    ip.load(data_config(_npz(tmp_path / "three.npz", **three))).bind_data_spec(
      spec, allow_change=True
    )
  # Asked for: evaluate standardises with the run's data.json, not the new file's statistics,
  # so the unchanged test split scores exactly as before the swap.
  assert ip.dataset_info(config).mean != pytest.approx(spec["mean"])
  with caplog.at_level(logging.WARNING):
    after = evaluate_lib.evaluate_checkpoint(workdir, allow_data_change=True)
  assert after["top1_error"] == before["top1_error"] and after["loss"] == before["loss"]
  assert f"Evaluating on other data than the run's (allow_data_change): the npz file {path}" in (
    caplog.text
  )
  # Resume asked for: continues on the new data with the run's mean/std, says so in run.json.
  results = train.train_and_evaluate(
    data_config(dataset, num_train_steps=9, allow_data_change=True), workdir
  )
  assert results["steps"] == 9
  resumed = preprocessing.read_data_spec(workdir)
  assert resumed["mean"] == spec["mean"] and resumed["std"] == spec["std"]
  assert resumed["fingerprint"]["size"] == new_size
  with open(os.path.join(workdir, "run.json")) as f:
    run = json.load(f)
  assert run["data_fingerprint"]["size"] == new_size
  assert run["data_changes"][0]["at_step"] == 6
  assert f"size {old_size} bytes -> {new_size} bytes" in run["data_changes"][0]["change"]
  # The new data are now the run's: a plain resume continues.
  assert train.train_and_evaluate(data_config(dataset, num_train_steps=12), workdir)["steps"] == 12


def test_folder_fingerprint_follows_the_image_files_only(write_image_folder, tmp_path):
  images = (np.arange(6 * 64).reshape(6, 8, 8) % 256).astype(np.uint8)
  root = tmp_path / "data"
  write_image_folder(root, {"train": (images[:4], [0, 1, 0, 1]), "test": (images[4:], [0, 1])})
  settings = ip._settings({"dataset": f"folder:{root}", "batch_size": 2})
  first = fingerprint_lib.fingerprint(settings)
  assert first["files"] == 6
  (root / "train" / "c0" / ".hidden.png").write_bytes(b"x")
  (root / "train" / "c0" / "notes.txt").write_text("not an image")
  assert fingerprint_lib.describe_change(first, fingerprint_lib.fingerprint(settings)) is None
  Image.fromarray(images[0]).save(root / "train" / "c1" / "extra.png")
  change = fingerprint_lib.describe_change(first, fingerprint_lib.fingerprint(settings))
  assert re.fullmatch(
    rf"the image files of {re.escape(str(root))} changed since this run started: files 6 -> 7, "
    r"total size \d+ bytes -> \d+ bytes, sha256 \w{12}\.\.\. -> \w{12}\.\.\.",
    change,
  ), change
  # A copy of the same npz elsewhere is the same data; digits are fixed.
  np.savez(tmp_path / "a.npz", x=np.arange(3))
  shutil.copy(tmp_path / "a.npz", tmp_path / "b.npz")
  a, b = (
    fingerprint_lib.fingerprint(ip._settings({"dataset": f"npz:{tmp_path / n}", "batch_size": 2}))
    for n in ("a.npz", "b.npz")
  )
  assert a["path"] != b["path"] and fingerprint_lib.describe_change(a, b) is None
  digits = ip.data_fingerprint({"dataset": "digits", "batch_size": 2})
  assert digits == ip.data_fingerprint({"dataset": "digits", "batch_size": 4})


def test_a_workdir_without_fingerprint_or_pixel_range_still_resumes_and_predicts(
  data_config, tmp_path, caplog
):
  """Older data.json files (no fingerprint, no pixel range) load, predict and resume; the
  resume records the fingerprint and keeps mean/std."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(data_config("digits", num_train_steps=6), workdir)
  file = os.path.join(workdir, preprocessing.DATA_FILE)
  with open(file) as f:
    spec = json.load(f)
  old = {k: v for k, v in spec.items() if k not in ("fingerprint", "pixel_range", "pixel_dtype")}
  old["mean"] = [spec["mean"][0] + 0.5]  # as if computed differently by an older version
  with open(file, "w") as f:
    json.dump(old, f)
  _, _, predict = rknet_jax.load_checkpoint(workdir)
  assert np.asarray(predict(np.full((2, 8, 8), 255.0))).shape == (2, 10)  # no range to check
  results = train.train_and_evaluate(data_config("digits", num_train_steps=9), workdir)
  assert results["steps"] == 9
  assert "no data fingerprint" in caplog.text
  resumed = preprocessing.read_data_spec(workdir)
  assert resumed["mean"] == old["mean"]  # never rewritten on resume
  assert resumed["fingerprint"]["kind"] == "digits"
  assert resumed["pixel_range"] == [0.0, 16.0]


# ------------------------------------------------------------------------------------------------
# predict knows its input.


@pytest.fixture(scope="module")
def digits_run(data_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("predict") / "run")
  config = data_config("digits", num_train_steps=60, batch_size=64, growth_rate=8)
  config.model_kwargs.bn_momentum = 0.9
  results = train.train_and_evaluate(config, workdir)
  return workdir, results, ip.load_splits(config).test


def test_predict_refuses_pixels_at_another_scale_naming_the_training_range(digits_run):
  """Before: predict on 0..255 or 0..1 images for a 0..16 model returned confident garbage
  (accuracy 0.70 -> 0.21 / 0.10)."""
  workdir, results, test = digits_run
  _, _, predict = rknet_jax.load_checkpoint(workdir)
  assert predict.data_spec["pixel_range"] == [0.0, 16.0]
  raw = test.images.astype(np.float32)
  error = np.mean(np.argmax(np.asarray(predict(raw)), -1) != test.labels)
  assert error == pytest.approx(results["test_top1_error"], abs=1e-9)
  expected = r"the model was trained on uint8 pixels in \[0, 16\]"
  with pytest.raises(ValueError, match=r"\[0, 255\] reaches far outside .*" + expected):
    predict(raw * 255 / 16)
  with pytest.raises(ValueError, match=r"\[0, 1\] spans under 1/12 .*" + expected):
    predict(raw / 16)
  with pytest.warns(UserWarning, match=expected):
    predict(raw * 255 / 16, on_out_of_range="warn")
  assert np.asarray(predict(raw / 16, on_out_of_range="ignore")).shape == (len(raw), 10)
  with pytest.raises(ValueError, match="on_out_of_range='loud'; allowed"):
    predict(raw, on_out_of_range="loud")


def test_predict_returns_class_names_and_probabilities(digits_run):
  workdir, _, test = digits_run
  _, _, predict = rknet_jax.load_checkpoint(workdir)
  out = predict(test.images[:5], return_probs=True)
  logits = np.asarray(predict(test.images[:5]))
  np.testing.assert_array_equal(out.labels, np.argmax(logits, -1))
  assert out.class_names == [str(int(i)) for i in out.labels]
  np.testing.assert_allclose(out.probabilities.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out.logits, logits)


@pytest.mark.parametrize(
  "edit, field",
  [
    ({"std": [0.0]}, r"std is \[0.0\]; every channel's std must be > 0"),
    ({"std": [-1.0]}, "std is"),
    ({"mean": [float("nan")]}, "mean is"),
    ({"mean": [1.0, 2.0]}, r"mean is \[1.0, 2.0\]; expected 1 finite numbers"),
    ({"class_names": ["a"]}, "class_names is"),
    ({"pixel_range": [16, 0]}, "pixel_range is"),
    ({"std": None}, r"it lacks \['std'\]"),
  ],
)
def test_a_damaged_data_json_is_an_error_at_load_naming_the_field(
  digits_run, tmp_path, edit, field
):
  """Before: a data.json edited to std [0.0] loaded and predicted at chance with only a numpy
  warning."""
  workdir = str(tmp_path / "run")
  shutil.copytree(digits_run[0], workdir)
  file = os.path.join(workdir, preprocessing.DATA_FILE)
  with open(file) as f:
    spec = json.load(f)
  spec.update(edit)
  spec = {k: v for k, v in spec.items() if v is not None}
  with open(file, "w") as f:
    json.dump(spec, f)
  with pytest.raises(
    ValueError,
    match=r"data.json \(the training preprocessing\) cannot be "
    "used: " + field,
  ):
    rknet_jax.load_checkpoint(workdir)
  with pytest.raises(ValueError, match=field):
    evaluate_lib.evaluate_checkpoint(workdir)


def test_predict_reads_image_files_and_applies_the_training_resize(
  data_config, write_image_folder, tmp_path
):
  """Before: predict took arrays only and did not apply the resize data.json records."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 12, 12), dtype=np.uint8)
  root = tmp_path / "data"
  dataset = write_image_folder(
    root, {"train": (images[:32], np.arange(32) % 2), "test": (images[32:], np.arange(8) % 2)}
  )
  # One training image of another size: config.resize=8 resizes every 12x12 image to 8x8.
  Image.fromarray(images[0][:10, :10]).save(root / "train" / "c0" / "small.png")
  config = data_config(dataset, resize=8, num_train_steps=3, batch_size=8)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  _, _, predict = rknet_jax.load_checkpoint(workdir)
  assert predict.data_spec["resize"] == 8
  files = sorted(str(p) for p in (root / "test").glob("*/*.png"))
  from_files = np.asarray(predict(files))
  # The files as training read them (folder decode, resized 12x12 -> 8x8) give the same logits.
  decoded = ip.load_splits(config).test.images
  np.testing.assert_allclose(from_files, np.asarray(predict(decoded)), rtol=1e-5, atol=1e-5)
  # Raw 12x12 arrays are resized the same way (PIL bilinear on the 8-bit image).
  raw = np.stack([np.asarray(Image.open(f)) for f in files])
  np.testing.assert_allclose(np.asarray(predict(raw)), from_files, rtol=1e-5, atol=1e-5)
  assert predict(files[0], return_probs=True).class_names[0] in ("c0", "c1")
