"""`--config.dataset=npz:FILE`: a dataset in one NumPy .npz file, held in memory.

Arrays (names fixed): `train_images` (N, H, W) or (N, H, W, C), uint8 or float; `train_labels`
(N,) whole numbers in [0, K) (integers, or floats such as 3.0); `test_images`, `test_labels`
likewise with the same H, W, C; optional
`validation_images`, `validation_labels` (then used as the validation split, and nothing is
held out of train); optional `class_names` (K strings). K is `len(class_names)`, else the largest
training label + 1; test and validation labels must be training classes. Every split is then
checked like any in-memory source's (`base.check_official`: at least 2 training classes, finite
pixels, one dtype and pixel scale for all splits).
"""

import os
import zipfile

import numpy as np

from experiments.data import base

REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")


def _images(path, data, key, shape=None):
  x = data[key]
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or min(x.shape) == 0:
    raise ValueError(
      f"{path}: {key} has shape {data[key].shape}; expected a non-empty "
      "(N, H, W) or (N, H, W, C) array"
    )
  if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{path}: {key} has dtype {x.dtype}; expected uint8 or a float dtype")
  if np.issubdtype(x.dtype, np.floating):  # (non-finite values: base.check_official)
    x = x.astype(np.float32)
  if shape is not None and x.shape[1:] != shape:
    raise ValueError(
      f"{path}: {key} images are {x.shape[1:]} (H, W, C) but the training images are {shape}"
    )
  return x


def _labels(path, data, key, n, num_classes=None):
  y = data[key]
  if y.ndim != 1 or len(y) != n:
    raise ValueError(f"{path}: {key} has shape {y.shape}; expected ({n},), one label per image")
  y = base.labels_int32(y, f"{path}: {key}")  # checked before the cast: nothing wraps
  bad = np.flatnonzero(y >= num_classes) if num_classes else np.zeros(0, int)
  if bad.size:
    raise ValueError(
      f"{path}: {key}[{bad[0]}] = {y[bad[0]]} is not a valid label "
      f"(0..{num_classes - 1}, the training classes)"
    )
  return y


# The first bytes of what np.load reads: a zip archive (.npz) or a single .npy array.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


def _check_magic(path):
  """Refuses a file that is neither a zip archive nor an .npy array before np.load sees it
  (np.load would try to unpickle it and suggest allow_pickle=True, an unsafe load)."""
  with open(path, "rb") as f:
    head = f.read(8)
  if not head.startswith(_ZIP_MAGIC + (_NPY_MAGIC,)):
    kind = "an empty file" if not head else f"a file starting with {head!r}"
    raise ValueError(
      f"{path} is not an .npz archive ({kind}; an .npz file is the zip archive "
      "numpy.savez writes): config.dataset=npz:FILE needs such a file"
    )


def load(settings) -> base.Official:
  """Reads and checks `settings.target` (see module docstring)."""
  path = settings.target
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz file {path} not found (config.dataset=npz:{path})")
  _check_magic(path)
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a readable .npz file: {e}") from None
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} holds a single array, not an .npz archive of {REQUIRED}")
  with data:
    missing = [k for k in REQUIRED if k not in data.files]
    if missing:
      raise ValueError(
        f"{path} lacks {missing}; it has {sorted(data.files)} and needs "
        f"{list(REQUIRED)} (optional: validation_images, validation_labels, "
        "class_names)"
      )
    has_val = "validation_images" in data.files or "validation_labels" in data.files
    if has_val and not {"validation_images", "validation_labels"} <= set(data.files):
      raise ValueError(f"{path}: give both validation_images and validation_labels, or neither")
    train_x = _images(path, data, "train_images")
    train_y = _labels(path, data, "train_labels", len(train_x))
    names = None
    if "class_names" in data.files:
      names = tuple(str(c) for c in data["class_names"].reshape(-1))
      if train_y.size and len(names) <= train_y.max():
        raise ValueError(
          f"{path}: class_names has {len(names)} names but train_labels go up to {train_y.max()}"
        )
    num_classes = len(names) if names else int(train_y.max()) + 1
    names = names or tuple(str(i) for i in range(num_classes))

    def split(prefix):
      x = _images(path, data, f"{prefix}_images", train_x.shape[1:])
      y = _labels(path, data, f"{prefix}_labels", len(x), num_classes)
      return base.Split(x, y, np.arange(len(y), dtype=np.int64))

    return base.Official(
      base.Split(train_x, train_y, np.arange(len(train_y), dtype=np.int64)),
      split("test"),
      split("validation") if has_val else None,
      names,
    )
