"""`--config.dataset=folder:PATH`: PNG/JPEG images in class folders, held in memory.

Layout: `PATH/train/<class>/<image>`, `PATH/test/<class>/<image>`, optional
`PATH/validation/<class>/<image>` (then used as the validation split; nothing is held out of
train). Labels are the sorted class folder names of `train/` (label i = i-th name). Files and
folders whose names start with "." are ignored; every other file must be a PNG or JPEG image.

Channels: one if every image is grayscale (PIL modes 1, L, LA), else three (gray images are
repeated, alpha is dropped). Sizes: with `config.resize=0` (default) every image must have the
size of the first training image; `config.resize=N` resizes every image whose size differs to
N x N (PIL bilinear; aspect ratio not kept).

Errors name the offending file or folder: unreadable image, empty class folder, a class in
test/ or validation/ that train/ lacks, a size that differs.
"""
import os

import numpy as np

from experiments.data import base

EXTENSIONS = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _visible(folder):
  return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def _decode(path):
  """(uint8 [H, W] or [H, W, 3] array, is_gray) of one image file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      image.load()
      mode = image.mode
      if mode in _GRAY_MODES:
        return np.asarray(image.convert("L")), True
      if mode in _COLOUR_MODES:
        return np.asarray(image.convert("RGB")), False
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None
  raise ValueError(f"image {path} has PIL mode {mode!r} (16-bit or float pixels); only 8-bit "
                   "grayscale or colour PNG/JPEG images are supported")


def _resized(array, path, size, resize):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if array.shape[:2] == size:
    return array
  if not resize:
    raise ValueError(
        f"image {path} is {array.shape[1]}x{array.shape[0]} (width x height) but the first "
        f"training image is {size[1]}x{size[0]}: set config.resize=N to resize every image to "
        "N x N, or give all images one size")
  return np.asarray(Image.fromarray(array).resize((resize, resize), Image.BILINEAR))


def _read_split(root, split, classes, size, resize):
  """(images list, labels, paths) of `root/split`; classes: name -> label (None: any folder)."""
  folder = os.path.join(root, split)
  images, labels, paths = [], [], []
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
      array, gray = _decode(path)
      if size[0] is None:
        size[0] = array.shape[:2] if not resize else (resize, resize)
      images.append((_resized(array, path, size[0], resize), gray))
      labels.append(classes[name])
      paths.append(path)
  return images, labels, paths


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
  read = {split: _read_split(root, split, classes, size, resize)
          for split in ("train", "test", "validation")
          if split != "validation" or os.path.isdir(os.path.join(root, split))}
  channels = 1 if all(g for imgs, _, _ in read.values() for _, g in imgs) else 3

  def split(name):
    images, labels, _ = read[name]
    if not images:
      raise ValueError(f"{root}/{name} holds no images")
    arrays = [a[..., None] if gray else a for a, gray in images]
    if channels == 3:
      arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    return base.Split(np.stack(arrays).astype(np.uint8), np.asarray(labels, np.int32),
                      np.arange(len(labels), dtype=np.int64))

  return base.Official(split("train"), split("test"),
                       split("validation") if "validation" in read else None, tuple(names))
