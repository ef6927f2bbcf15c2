"""`--config.dataset=folder:PATH`: PNG/JPEG images in class folders.

Layout: `PATH/train/<class>/<image>`, `PATH/test/<class>/<image>`, optional
`PATH/validation/<class>/<image>` (then used as the validation split; nothing is held out of
train). Labels are the sorted class folder names of `train/` (label i = i-th name); files are
taken in sorted order. Names starting with "." are ignored; every other file must be a PNG or
JPEG image.

Channels: one if every image is grayscale (PIL modes 1, L, LA), else three (gray images are
repeated, alpha is dropped). Sizes: with `config.resize=0` (default) every image must have the
size of the first training image; `config.resize=N` resizes every image whose size differs to
N x N (PIL bilinear; aspect ratio not kept).

Memory. All file headers are read first (sizes, modes: the checks above). A dataset whose
decoded pixels fit in `IN_MEMORY_BYTES` is then decoded once and held in memory; a larger one
is kept as `FileImages`, which decodes the files of each batch when the batch is made (in the
prefetch thread), so order, resumption and exact evaluation are those of in-memory data.

Errors name the offending file or folder: unreadable image, empty class folder, a class in
test/ or validation/ that train/ lacks, a size that differs, a file that is not PNG/JPEG.
"""
import os

import numpy as np

from experiments.data import base
from rknet_jax import preprocessing

EXTENSIONS = (".png", ".jpg", ".jpeg")
IN_MEMORY_BYTES = 4 << 30  # decoded uint8 pixels held in memory; larger datasets stream
_GRAY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _pil():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return Image


def _visible(folder):
  return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def _header(path):
  """(mode, (height, width)) of an image file, from its header; clear error if unreadable."""
  image_lib = _pil()
  try:
    with image_lib.open(path) as image:
      mode, (width, height) = image.mode, image.size
  except (OSError, ValueError, image_lib.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None
  if mode not in _GRAY_MODES + _COLOUR_MODES:
    raise ValueError(f"image {path} has PIL mode {mode!r} (16-bit or float pixels); only 8-bit "
                     "grayscale or colour PNG/JPEG images are supported")
  return mode, (height, width)


def decode(path, *, shape, resize: int) -> np.ndarray:
  """uint8 [H, W, C] pixels of one image file, converted to the dataset's `shape` (the rule
  `rknet_jax.load_checkpoint(...).predict` applies to image files too)."""
  return preprocessing.read_image(path, shape=shape, resize=resize)


class FileImages:
  """Images decoded from their files on access: `images[idx]` -> uint8 [len(idx), H, W, C].

  Stands in for an in-memory uint8 array (`shape`, `dtype`, `len`, integer-array indexing);
  `subset(idx)` is a lazy selection (used for the validation hold-out).
  """

  def __init__(self, paths, shape, resize: int):
    self.paths = np.asarray(paths, dtype=object)
    self.shape = (len(self.paths),) + tuple(shape)
    self.dtype = np.dtype(np.uint8)
    self._resize = resize

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, idx):
    idx = np.asarray(idx)
    out = np.empty(idx.shape + self.shape[1:], np.uint8)
    for j, i in enumerate(idx.reshape(-1)):
      out.reshape((-1,) + self.shape[1:])[j] = decode(self.paths[i], shape=self.shape[1:],
                                                      resize=self._resize)
    return out

  def subset(self, idx):
    return FileImages(self.paths[np.asarray(idx)], self.shape[1:], self._resize)


def _scan_split(root, split, classes, size, resize):
  """(paths, labels, modes) of `root/split` after the layout/size checks; fixes size[0]."""
  folder = os.path.join(root, split)
  paths, labels, gray = [], [], []
  for name in _visible(folder):
    class_dir = os.path.join(folder, name)
    if not os.path.isdir(class_dir):
      raise ValueError(f"{class_dir} is a file; {folder} must hold one folder per class")
    if name not in classes:
      raise ValueError(f"class folder {class_dir} has no counterpart in {root}/train/ (training "
                       f"classes: {', '.join(sorted(classes))})")
    files = _visible(class_dir)
    if not files:
      raise ValueError(f"class folder {class_dir} is empty: every class needs at least one image")
    for f in files:
      path = os.path.join(class_dir, f)
      if not f.lower().endswith(EXTENSIONS) or not os.path.isfile(path):
        raise ValueError(f"{path} is not a PNG or JPEG file ({', '.join(EXTENSIONS)})")
      mode, hw = _header(path)
      if size[0] is None:
        size[0] = (resize, resize) if resize else hw
      if hw != size[0] and not resize:
        raise ValueError(
            f"image {path} is {hw[1]}x{hw[0]} (width x height) but the first training image is "
            f"{size[0][1]}x{size[0][0]}: set config.resize=N to resize every image to N x N, or "
            "give all images one size")
      paths.append(path)
      labels.append(classes[name])
      gray.append(mode in _GRAY_MODES)
  if not paths:
    raise ValueError(f"{folder} holds no images")
  return paths, labels, gray


def load(settings) -> base.Official:
  """Reads and checks the image folder `settings.target` (see module docstring)."""
  root = settings.target
  for required in ("train", "test"):
    if not os.path.isdir(os.path.join(root, required)):
      raise FileNotFoundError(f"{os.path.join(root, required)} not found: config.dataset=folder:"
                              f"{root} needs {root}/train/<class>/<image> and "
                              f"{root}/test/<class>/<image>")
  names = [n for n in _visible(os.path.join(root, "train"))
           if os.path.isdir(os.path.join(root, "train", n))]
  if not names:
    raise ValueError(f"{root}/train has no class folders")
  classes = {n: i for i, n in enumerate(names)}
  size = [None]  # (H, W) of every image, fixed by the first training image (or by resize)
  resize = int(settings.resize or 0)
  scanned = {split: _scan_split(root, split, classes, size, resize)
             for split in ("train", "test", "validation")
             if split != "validation" or os.path.isdir(os.path.join(root, split))}
  channels = 1 if all(all(gray) for _, _, gray in scanned.values()) else 3
  shape = tuple(size[0]) + (channels,)
  total = sum(len(paths) for paths, _, _ in scanned.values()) * int(np.prod(shape))
  in_memory = total <= IN_MEMORY_BYTES

  def split(name):
    paths, labels, _ = scanned[name]
    images = FileImages(paths, shape, resize)
    if in_memory:
      images = images[np.arange(len(paths))]
    return base.Split(images, np.asarray(labels, np.int32), np.arange(len(labels), dtype=np.int64))

  return base.Official(split("train"), split("test"),
                       split("validation") if "validation" in scanned else None, tuple(names))
