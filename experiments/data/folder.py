"""`--config.dataset=folder:PATH`: images in class folders.

Layout: `PATH/train/<class>/<image>`, `PATH/test/<class>/<image>`, optional
`PATH/validation/<class>/<image>` (then used as the validation split; nothing is held out of
train). Labels are the sorted class folder names of `train/` (label i = i-th name); files are
taken in sorted order.

What counts (`_listing`, the one rule): a class is a folder of a split whose name does not
start with "."; an image is a file of a class folder whose name does not start with "." and
ends in one of `IMAGE_EXTENSIONS` (any case), as torchvision's and TFDS's ImageFolder filter.
Everything else (notes, CSVs, hidden files such as `.DS_Store`, subfolders, files next to the
class folders) is skipped, and one log line gives the count with examples. A class folder
without images, or a split without any, is an error naming it.

Channels: one if every image is grayscale (PIL modes 1, L, LA), else three (gray images are
repeated, alpha is dropped). Sizes: with `config.resize=0` (default) every image must have the
size of the first training image; `config.resize=N` resizes every image whose size differs to
N x N (PIL bilinear; aspect ratio not kept).

Memory. All file headers are read first (sizes, modes: the checks above). A dataset whose
decoded pixels fit in `IN_MEMORY_BYTES` is then decoded once and held in memory; a larger one
is kept as `FileImages`, which decodes the files of each batch when the batch is made (in the
prefetch thread), so order, resumption and exact evaluation are those of in-memory data.

Errors name the offending file or folder: unreadable image, class folder without images, a
class in test/ or validation/ that train/ lacks, a size that differs, 16-bit or float pixels.
"""

import os

from absl import logging
import numpy as np

from experiments.data import base
from rknet_jax import preprocessing

# Image files by name (lower-cased): torchvision ImageFolder's list plus GIF; PIL decodes all.
IMAGE_EXTENSIONS = (
  ".png",
  ".jpg",
  ".jpeg",
  ".bmp",
  ".gif",
  ".webp",
  ".tif",
  ".tiff",
  ".ppm",
  ".pgm",
)
_SKIPPED_EXAMPLES = 3  # skipped entries named in the log line
IN_MEMORY_BYTES = 4 << 30  # decoded uint8 pixels held in memory; larger datasets stream
_GRAY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _pil():
  from PIL import Image

  return Image


def _listing(folder, *, classes: bool):
  """(kept names, skipped names) of `folder`, sorted: the module docstring's rule.

  `classes=True`: a split folder, whose class folders are kept; otherwise a class folder,
  whose image files are kept. Skipped folders' names end in "/".
  """
  kept, skipped = [], []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    is_dir = os.path.isdir(path)
    wanted = is_dir if classes else os.path.isfile(path) and name.lower().endswith(IMAGE_EXTENSIONS)
    if wanted and not name.startswith("."):
      kept.append(name)
    else:
      skipped.append(name + ("/" if is_dir else ""))
  return kept, skipped


def image_paths(root):
  """Every image file of `root`'s splits (`_listing`'s rule), relative to `root`, sorted.

  What a folder dataset reads, without the layout checks of `load` (its data fingerprint).
  """
  out = []
  for split in ("train", "validation", "test"):
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
      continue
    for name in _listing(folder, classes=True)[0]:
      files = _listing(os.path.join(folder, name), classes=False)[0]
      out += [os.path.join(split, name, f) for f in files]
  return sorted(out)


def _log_skipped(root, skipped):
  """One line: how many entries were skipped, with a few examples (visible ones first)."""
  if not skipped:
    return
  visible = [p for p in skipped if not os.path.basename(p.rstrip("/")).startswith(".")]
  examples = (visible + [p for p in skipped if p not in visible])[:_SKIPPED_EXAMPLES]
  log = logging.warning if visible else logging.info
  log(
    "folder:%s: skipped %d entries that are not images (%d hidden), e.g. %s; images are "
    "files ending in %s",
    root,
    len(skipped),
    len(skipped) - len(visible),
    ", ".join(repr(p) for p in examples),
    " ".join(IMAGE_EXTENSIONS),
  )


def _header(path):
  """(mode, (height, width)) of an image file, from its header; clear error if unreadable."""
  image_lib = _pil()
  try:
    with image_lib.open(path) as image:
      mode, (width, height) = image.mode, image.size
  except (OSError, ValueError, image_lib.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None
  if mode not in _GRAY_MODES + _COLOUR_MODES:
    raise ValueError(
      f"image {path} has PIL mode {mode!r} (16-bit or float pixels); only 8-bit "
      "grayscale or colour images are supported"
    )
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
      out.reshape((-1,) + self.shape[1:])[j] = decode(
        self.paths[i], shape=self.shape[1:], resize=self._resize
      )
    return out

  def subset(self, idx):
    return FileImages(self.paths[np.asarray(idx)], self.shape[1:], self._resize)


def _scan_split(root, split, classes, size, resize, skipped):
  """(paths, labels, modes) of `root/split` after the layout/size checks; fixes size[0].

  Entries that are not classes or images are appended to `skipped` (relative to `root`).
  """
  folder = os.path.join(root, split)
  paths, labels, gray = [], [], []
  names, other = _listing(folder, classes=True)
  here = [os.path.join(split, n) for n in other]  # this split's skipped entries
  for name in names:
    class_dir = os.path.join(folder, name)
    if name not in classes:
      raise ValueError(
        f"class folder {class_dir} has no counterpart in {root}/train/ (training "
        f"classes: {', '.join(sorted(classes))})"
      )
    files, other = _listing(class_dir, classes=False)
    here += [os.path.join(split, name, n) for n in other]
    if not files:
      example = next((n for n in other if not n.startswith(".")), other[0]) if other else ""
      found = f"only {len(other)} other entries, e.g. {example!r}" if other else "it is empty"
      raise ValueError(
        f"class folder {class_dir} has no images ({found}): every class needs "
        f"at least one image file ({' '.join(IMAGE_EXTENSIONS)})"
      )
    for f in files:
      path = os.path.join(class_dir, f)
      mode, hw = _header(path)
      if size[0] is None:
        size[0] = (resize, resize) if resize else hw
      if hw != size[0] and not resize:
        raise ValueError(
          f"image {path} is {hw[1]}x{hw[0]} (width x height) but the first training image is "
          f"{size[0][1]}x{size[0][0]}: set config.resize=N to resize every image to N x N, or "
          "give all images one size"
        )
      paths.append(path)
      labels.append(classes[name])
      gray.append(mode in _GRAY_MODES)
  if not paths:
    found = f" (only {len(here)} other entries, e.g. {here[0]!r})" if here else ""
    raise ValueError(
      f"{folder} holds no images{found}: expected {folder}/<class>/<image> with "
      f"image files ending in {' '.join(IMAGE_EXTENSIONS)}"
    )
  skipped.extend(here)
  return paths, labels, gray


def load(settings) -> base.Official:
  """Reads and checks the image folder `settings.target` (see module docstring)."""
  root = settings.target
  for required in ("train", "test"):
    if not os.path.isdir(os.path.join(root, required)):
      raise FileNotFoundError(
        f"{os.path.join(root, required)} not found: config.dataset=folder:"
        f"{root} needs {root}/train/<class>/<image> and "
        f"{root}/test/<class>/<image>"
      )
  names, _ = _listing(os.path.join(root, "train"), classes=True)
  if not names:
    raise ValueError(f"{root}/train has no class folders: expected {root}/train/<class>/<image>")
  classes = {n: i for i, n in enumerate(names)}
  size = [None]  # (H, W) of every image, fixed by the first training image (or by resize)
  resize = int(settings.resize or 0)
  skipped = []
  scanned = {
    split: _scan_split(root, split, classes, size, resize, skipped)
    for split in ("train", "test", "validation")
    if split != "validation" or os.path.isdir(os.path.join(root, split))
  }
  _log_skipped(root, skipped)
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

  return base.Official(
    split("train"),
    split("test"),
    split("validation") if "validation" in scanned else None,
    tuple(names),
  )
