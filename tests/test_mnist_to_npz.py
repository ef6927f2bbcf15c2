"""experiments/tools/mnist_to_npz.py: the four MNIST IDX files -> the npz the runner reads."""

import gzip

import numpy as np
import pytest

from experiments import input_pipeline as ip
from experiments.tools import mnist_to_npz


def _write_idx(path, array, gz):
  header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(
    d.to_bytes(4, "big") for d in array.shape
  )
  data = header + array.astype(np.uint8).tobytes()
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)


def _tiny_mnist(folder, n_train=12, n_test=5, gz=True):
  rng = np.random.default_rng(0)
  arrays = {
    "train_images": rng.integers(0, 256, (n_train, 28, 28)),
    "train_labels": np.arange(n_train) % 10,
    "test_images": rng.integers(0, 256, (n_test, 28, 28)),
    "test_labels": np.arange(n_test) % 10,
  }
  for key, stem in mnist_to_npz.FILES.items():
    _write_idx(folder / stem, arrays[key], gz=gz and key != "test_labels")  # mixed on purpose
  return arrays


def test_converts_idx_files_into_the_runners_npz(run_python, tmp_path):
  arrays = _tiny_mnist(tmp_path)
  out = tmp_path / "mnist.npz"
  proc = run_python("-m", "experiments.tools.mnist_to_npz", f"--idx_dir={tmp_path}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  assert "12 train / 5 test images of shape (28, 28, 1)" in proc.stdout
  with np.load(out) as data:
    np.testing.assert_array_equal(data["train_images"][..., 0], arrays["train_images"])
    np.testing.assert_array_equal(data["test_labels"], arrays["test_labels"])
    assert data["train_images"].dtype == np.uint8 and data["train_labels"].dtype == np.int64
  info = ip.dataset_info({"dataset": f"npz:{out}", "batch_size": 4, "validation_size": 0})
  assert info.image_shape == (28, 28, 1) and info.num_classes == 10
  assert (info.train_size, info.test_size) == (12, 5)


def test_never_overwrites_and_names_bad_files(tmp_path):
  _tiny_mnist(tmp_path, gz=False)
  out = tmp_path / "mnist.npz"
  out.write_bytes(b"precious")
  assert mnist_to_npz.main([f"--idx_dir={tmp_path}", f"--out={out}"]) == 1
  assert out.read_bytes() == b"precious"
  cut = tmp_path / "t10k-images-idx3-ubyte"
  cut.write_bytes(cut.read_bytes()[:-10])
  with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: header says shape"):
    mnist_to_npz.convert(str(tmp_path), str(tmp_path / "other.npz"))
  (tmp_path / "train-labels-idx1-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match="no train-labels-idx1-ubyte"):
    mnist_to_npz.convert(str(tmp_path), str(tmp_path / "other.npz"))
  assert not (tmp_path / "other.npz").exists()
