"""Dataset preparation through TFDS's real download path, with the network replaced by loopback.

A tiny archive in CIFAR-10's real binary format is served by a local HTTP server on 127.0.0.1;
TFDS downloads it (checksum registered and verified), extracts it, writes its records, and the
input pipeline reads it back. Offline behaviour is tested against a closed and a silent port.
"""

import functools
import http.server
import io
import socket
import tarfile
import threading
import time

import numpy as np
import pytest

from experiments import input_pipeline as ip
from experiments.data import prepare, tfds_utils

tfds = tfds_utils.import_tfds()
CIFAR10 = tfds.image_classification.Cifar10
RECORDS_PER_BATCH = 2  # 5 training files -> 10 training images; 3 test images
NUM_TEST = 3


def _cifar10_archive(rng):
  """cifar-10-binary.tar.gz bytes and the (images, labels) of its train and test splits."""

  def records(n):
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    # One record: label byte, then the red, green and blue 32x32 planes, row-major.
    planes = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    return np.concatenate([labels[:, None], planes], axis=1).tobytes(), images, labels

  files, train_images, train_labels = {}, [], []
  for k in range(1, 6):
    files[f"data_batch_{k}.bin"], x, y = records(RECORDS_PER_BATCH)
    train_images.append(x)
    train_labels.append(y)
  files["test_batch.bin"], test_images, test_labels = records(NUM_TEST)
  files["batches.meta.txt"] = ("\n".join(f"class_{i}" for i in range(10)) + "\n").encode()
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo("cifar-10-batches-bin/" + name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return (
    buffer.getvalue(),
    (np.concatenate(train_images), np.concatenate(train_labels)),
    (test_images, test_labels),
  )


def _examples(images, labels):
  return sorted((x.tobytes(), int(y)) for x, y in zip(images, labels))


@pytest.fixture(name="served_folder")
def fixture_served_folder(tmp_path):
  """(folder, base URL) of a loopback HTTP server serving `folder`."""
  folder = tmp_path / "served"
  folder.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield folder, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def _point_cifar10_at(monkeypatch, url, url_info=None):
  """Makes TFDS's cifar10 builder download from `url` (its checksum registered if given)."""
  for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    monkeypatch.delenv(var, raising=False)
  original = CIFAR10._cifar_info.fget
  monkeypatch.setattr(
    CIFAR10, "_cifar_info", property(lambda self: original(self)._replace(url=url))
  )
  if url_info is None:  # a registered URL whose file was never downloaded
    url_info = tfds.core.download.checksums.UrlInfo(
      size=1, checksum="0" * 64, filename="cifar-10-binary.tar.gz"
    )
  monkeypatch.setattr(CIFAR10, "url_infos", {url: url_info})


def test_download_prepare_and_load_real_cifar10_format(tmp_path, served_folder, monkeypatch):
  folder, base = served_folder
  archive, (train_x, train_y), (test_x, test_y) = _cifar10_archive(np.random.default_rng(0))
  (folder / "cifar-10-binary.tar.gz").write_bytes(archive)
  url = base + "/cifar-10-binary.tar.gz"
  # Register the archive's real checksum: TFDS verifies the download against it.
  checksum = tfds.core.download.checksums.compute_url_info
  (tmp_path / "copy.tar.gz").write_bytes(archive)
  url_info = checksum(tfds.core.Path(tmp_path / "copy.tar.gz"))
  url_info = tfds.core.download.checksums.UrlInfo(
    size=url_info.size, checksum=url_info.checksum, filename="cifar-10-binary.tar.gz"
  )
  _point_cifar10_at(monkeypatch, url, url_info)
  data_dir = tmp_path / "data"

  builder = prepare.prepare("cifar10", str(data_dir))
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 5 * RECORDS_PER_BATCH
  assert builder.info.features["label"].names[:2] == ["class_0", "class_1"]

  config = {
    "dataset": "cifar10",
    "batch_size": 2,
    "data_dir": str(data_dir),
    "validation_size": 0,
    "download": False,
  }
  assert "prepared TFDS dataset" in ip.preflight(config)
  splits = ip.load_splits(config)
  # TFDS stores the examples in its own (key-hashed) order: compare as sets of (image, label).
  assert _examples(splits.train.images, splits.train.labels) == _examples(train_x, train_y)
  assert _examples(splits.test.images, splits.test.labels) == _examples(test_x, test_y)
  assert len(splits.train) == len(train_y) and len(splits.test) == NUM_TEST
  # A second prepare is a no-op (nothing is downloaded again).
  (folder / "cifar-10-binary.tar.gz").unlink()
  assert prepare.prepare("cifar10", str(data_dir)).is_prepared()


def _closed_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_offline_download_fails_fast_with_one_clear_message(tmp_path, monkeypatch):
  url = f"http://127.0.0.1:{_closed_port()}/cifar-10-binary.tar.gz"
  _point_cifar10_at(monkeypatch, url)
  data_dir = tmp_path / "data"
  config = {
    "dataset": "cifar10",
    "batch_size": 2,
    "data_dir": str(data_dir),
    "validation_size": 0,
    "download": True,
  }
  start = time.monotonic()
  with pytest.raises(prepare.DownloadUnavailableError) as e:
    ip.load_splits(config)  # the path config.download=True takes in training
  assert time.monotonic() - start < 30
  message = str(e.value)
  for part in (
    "'cifar10'",
    url,
    "python -m experiments.prepare_data --dataset=cifar10",
    str(data_dir / "cifar10"),
    "copy",
  ):
    assert part in message
  assert (
    not (data_dir / "cifar10").exists()
    or not tfds.builder("cifar10", data_dir=str(data_dir)).is_prepared()
  )


def test_silent_server_times_out_within_the_probe_timeout(tmp_path, monkeypatch):
  with socket.socket() as listener:  # accepts connections (kernel backlog), never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/cifar-10-binary.tar.gz"
    _point_cifar10_at(monkeypatch, url)
    start = time.monotonic()
    with pytest.raises(prepare.DownloadUnavailableError, match="no answer within 1 s"):
      prepare.prepare("cifar10", str(tmp_path), probe_timeout=1.0)
    assert time.monotonic() - start < 10


def test_prepare_data_command_and_errors(run_python, tmp_path):
  prepare_data = ("-m", "experiments.prepare_data", f"--data_dir={tmp_path}")
  out = run_python(*prepare_data, f"--dataset=digits,npz:{tmp_path}/d.npz")
  assert out.returncode == 0, out.stderr
  assert "digits: nothing to prepare" in out.stdout and "npz:" in out.stdout
  out = run_python(*prepare_data, "--dataset=cifar11")
  assert out.returncode == 1 and "Unknown TFDS dataset 'cifar11'" in out.stderr
  assert "Traceback" not in out.stderr
  with pytest.raises(ValueError, match="Unknown TFDS dataset 'cifar11'"):
    prepare.prepare("cifar11", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar"):
    prepare.prepare("imagenet2012", str(tmp_path))


def test_a_name_tfds_cannot_parse_is_one_line():
  """Before: a look-alike letter (Cyrillic 'с', U+0441) in --dataset printed TFDS's 20-line
  grammar of builder names as the error."""
  with pytest.raises(ValueError) as e:
    prepare.builder_for("\u0441ifar10", None)
  assert str(e.value) == (
    "'\u0441ifar10' is not a TFDS dataset name (TFDS cannot parse it): names are ASCII, like "
    "cifar10, mnist or NAME/CONFIG:VERSION"
  )
