"""The training-time preprocessing of a run, saved as ``data.json`` and applied to raw images.

A workdir written by ``experiments.train`` holds ``data.json`` (made by
``experiments.input_pipeline.load(config).data_spec()``)::

  {"dataset": "digits", "image_shape": [8, 8, 1], "num_classes": 10,
   "class_names": ["0", ..., "9"], "mean": [4.88], "std": [6.02], "resize": 0,
   "pixel_range": [0.0, 16.0], "pixel_dtype": "uint8", "fingerprint": {...}}

``mean``/``std`` are per-channel statistics of the training split in raw pixel units; the
network sees ``(raw - mean) / std``. :func:`preprocess` applies exactly that to raw images, so
``load_checkpoint(...).predict`` gives the accuracy the run reported on raw pixels.
``pixel_range``/``pixel_dtype`` are the training pixels' (min, max) and dtype: inputs at
another scale are refused (:func:`range_problem`). ``resize`` N > 0 means training resized
every image of another size to N x N (:func:`read_image`, :func:`resize_images`).
``fingerprint`` identifies the data the run trained on (``experiments/data/fingerprint.py``).
Files written before ``pixel_range`` or ``fingerprint`` existed still load.
"""

from collections.abc import Sequence
import math
import os

import numpy as np

from rknet_jax import workdir_files

DATA_FILE = "data.json"
_KEYS = ("image_shape", "num_classes", "class_names", "mean", "std")
# What predict does with inputs outside the training pixel range (see `check_range`).
ON_OUT_OF_RANGE = ("raise", "warn", "ignore")


def _spec_problem(spec) -> str | None:
  """What makes ``spec`` unusable as a data.json (naming the field), or None."""
  if not isinstance(spec, dict):
    return f"it holds {type(spec).__name__}, not an object"
  missing = [k for k in _KEYS if k not in spec]
  if missing:
    return f"it lacks {missing} (needs {list(_KEYS)})"
  shape = spec["image_shape"]
  if (
    not isinstance(shape, (list, tuple))
    or len(shape) != 3
    or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
  ):
    return f"image_shape is {shape!r}; expected [H, W, C] positive integers"
  num_classes = spec["num_classes"]
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    return f"num_classes is {num_classes!r}; expected a positive integer"
  names = spec["class_names"]
  if not isinstance(names, (list, tuple)) or len(names) != num_classes:
    return f"class_names is {names!r}; expected a list of num_classes = {num_classes} names"
  for key in ("mean", "std"):
    values = spec[key]
    if (
      not isinstance(values, (list, tuple))
      or len(values) != shape[2]
      or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
      )
    ):
      return f"{key} is {values!r}; expected {shape[2]} finite numbers (one per channel)"
  if any(v <= 0 for v in spec["std"]):
    return f"std is {spec['std']!r}; every channel's std must be > 0"
  resize = spec.get("resize", 0)
  if isinstance(resize, bool) or not isinstance(resize, int) or resize < 0:
    return f"resize is {resize!r}; expected 0 or a positive integer"
  if "pixel_range" in spec:
    r = spec["pixel_range"]
    if (
      not isinstance(r, (list, tuple))
      or len(r) != 2
      or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in r)
      or r[0] > r[1]
    ):
      return f"pixel_range is {r!r}; expected [min, max], finite, min <= max"
  return None


def check_data_spec(spec, where: str = DATA_FILE) -> dict:
  """Returns ``spec`` unchanged, or raises ValueError naming the bad or missing field."""
  problem = _spec_problem(spec)
  if problem:
    raise ValueError(
      f"{where} (the training preprocessing) cannot be used: {problem}. "
      "Restore the file the run wrote."
    )
  return spec


def write_data_spec(workdir: str, spec: dict):
  """Writes ``spec`` (see module docstring) to ``workdir/data.json`` atomically."""
  check_data_spec(spec, "data spec")
  workdir_files.write_json(workdir_files.path(workdir, DATA_FILE), spec)


def read_data_spec(workdir: str) -> dict | None:
  """Returns the checked ``data.json`` of ``workdir``, or None when there is none (older runs).

  Raises ValueError naming the field when the file lacks a field or holds a bad value (std <= 0,
  non-finite mean, ...).
  """
  file = workdir_files.path(workdir, DATA_FILE)
  spec = workdir_files.read_json(file, "the training preprocessing")
  return None if spec is None else check_data_spec(spec, os.fspath(file))


# ------------------------------------------------------------------------------------------------
# The pixel scale.


def range_problem(expected, got) -> str | None:
  """Why pixel values spanning ``got`` = (min, max) are not at the scale of ``expected``.

  The rule shared by the data checks of training (every split against the training split) and
  by ``predict`` (inputs against ``data.json``'s ``pixel_range``): values more than half the
  training span beyond it (0..255 given to a 0..16 or 0..1 model), or spanning under 1/12 of it
  (0..1 given to a 0..16 or 0..255 model), are at another scale. Returns None when they fit
  (also for constant training pixels, where no scale is known, and for constant inputs).
  """
  lo, hi = (float(v) for v in expected)
  a, b = (float(v) for v in got)
  span = hi - lo
  if span <= 0:
    return None
  if a < lo - span / 2 or b > hi + span / 2:
    return f"[{a:g}, {b:g}] reaches far outside the training range [{lo:g}, {hi:g}]"
  if 0 < b - a < span / 12:
    return f"[{a:g}, {b:g}] spans under 1/12 of the training range [{lo:g}, {hi:g}]: another scale"
  return None


def check_range(images: np.ndarray, spec: dict, on_out_of_range: str = "raise") -> None:
  """Refuses (``"raise"``), warns about (``"warn"``) or accepts (``"ignore"``) raw ``images``
  whose pixel values are not at the training scale of ``spec`` (:func:`range_problem`).

  A ``spec`` without ``pixel_range`` (written before it existed) is not checked.
  """
  if on_out_of_range not in ON_OUT_OF_RANGE:
    raise ValueError(f"on_out_of_range={on_out_of_range!r}; allowed: {ON_OUT_OF_RANGE}")
  x = np.asarray(images)
  if on_out_of_range == "ignore" or "pixel_range" not in spec or x.size == 0:
    return
  if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
    raise ValueError("images hold NaN or infinite pixels")
  problem = range_problem(spec["pixel_range"], (x.min(), x.max()))
  if problem is None:
    return
  lo, hi = spec["pixel_range"]
  message = (
    f"input pixels {problem}: the model was trained on "
    f"{spec.get('pixel_dtype') or 'raw'} pixels in [{lo:g}, {hi:g}]; give images at "
    "that scale (or pass on_out_of_range='warn' or 'ignore')"
  )
  if on_out_of_range == "raise":
    raise ValueError(message)
  import warnings

  warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------------------------
# Image files and resizing (the rule training used for folder:PATH data).


def _pil():
  from PIL import Image

  return Image


def resize_image(image, size: int):
  """A PIL image resized to ``size`` x ``size`` the way training resized it (bilinear; the
  aspect ratio is not kept). ``experiments/data/folder.py`` and ``predict`` both call this."""
  return image.resize((size, size), _pil().BILINEAR)


def read_image(path, *, shape: Sequence[int], resize: int) -> np.ndarray:
  """uint8 [H, W, C] pixels of one PNG/JPEG file, as training decoded them: converted to
  grayscale (C = 1) or RGB (C = 3), and resized to H x W when ``resize`` > 0 and its size
  differs (:func:`resize_image`). Raises ValueError naming the file when it cannot be read or,
  with ``resize`` = 0, has another size."""
  image_lib = _pil()
  height, width, channels = shape
  try:
    with image_lib.open(path) as image:
      image = image.convert("L" if channels == 1 else "RGB")
      if image.size != (width, height):
        if not resize:
          raise ValueError(
            f"image {path} is {image.size[0]}x{image.size[1]} (width x height) "
            f"but the dataset's images are {width}x{height}"
          )
        image = resize_image(image, height)
      array = np.asarray(image, np.uint8)
  except (OSError, image_lib.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None
  return array[..., None] if channels == 1 else array


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """NHWC raw images resized to ``size`` x ``size`` with :func:`resize_image`: uint8 images as
  8-bit grayscale/RGB PIL images (exactly as training resized decoded files), other dtypes
  channel by channel as 32-bit float images."""
  image_lib = _pil()
  x = np.asarray(images)
  out = []
  for image in x:
    if x.dtype == np.uint8 and image.shape[-1] in (1, 3):
      pil = image_lib.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      resized = np.asarray(resize_image(pil, size), np.uint8)
      out.append(resized[..., None] if image.shape[-1] == 1 else resized)
    else:
      channels = [
        np.asarray(
          resize_image(image_lib.fromarray(image[..., c].astype(np.float32), mode="F"), size)
        )
        for c in range(image.shape[-1])
      ]
      out.append(np.stack(channels, axis=-1))
  return np.stack(out)


def load_images(images, spec: dict) -> np.ndarray:
  """Raw NHWC pixels of ``images``: an array (``[N, H, W, C]``, or ``[N, H, W]`` for one
  channel), or image file paths (a str/PathLike, or a list of them) read with
  :func:`read_image`. Arrays of another H x W are resized when training resized
  (``spec["resize"]``)."""
  shape = tuple(spec["image_shape"])
  resize = int(spec.get("resize") or 0)
  if isinstance(images, (str, os.PathLike)):
    images = [images]
  if (
    isinstance(images, (list, tuple))
    and images
    and all(isinstance(p, (str, os.PathLike)) for p in images)
  ):
    return np.stack([read_image(os.fspath(p), shape=shape, resize=resize) for p in images])
  x = np.asarray(images)
  if x.ndim == 3 and shape[-1] == 1:
    x = x[..., None]
  if resize and x.ndim == 4 and x.shape[-1] == shape[-1] and x.shape[1:3] != shape[:2]:
    x = resize_images(x, resize)
  return x


def preprocess(images, spec: dict, *, on_out_of_range: str = "raise") -> np.ndarray:
  """Raw images -> the float32 NHWC network input of training: ``(x - mean) / std``.

  Args:
    images: raw pixels as in the dataset (uint8 0..255, digits 0..16, or the floats of an npz
      file), shaped ``[N, H, W, C]``, or ``[N, H, W]`` for one channel, with ``(H, W, C)`` the
      spec's ``image_shape``; or image file paths (see :func:`load_images`). When the run
      resized images (``spec["resize"]``), other sizes are resized the same way.
    spec: a ``data.json`` dict.
    on_out_of_range: ``"raise"`` (default), ``"warn"`` or ``"ignore"`` pixels outside the
      training scale (:func:`check_range`).
  Raises:
    ValueError: shape or channel count differing from the training images; pixels at another
      scale than training's (with ``on_out_of_range="raise"``).
  """
  x = load_images(images, spec)
  shape = tuple(spec["image_shape"])
  if x.ndim != 4 or x.shape[1:] != shape:
    hint = ""
    if spec.get("resize"):
      hint = f" (training resized every image to {spec['resize']}x{spec['resize']})"
    raise ValueError(
      f"images of shape {np.shape(x)} do not match the training images "
      f"[N, {', '.join(map(str, shape))}]{hint}"
    )
  if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.number):
    raise ValueError(f"images must be numeric raw pixels, got dtype {x.dtype}")
  check_range(x, spec, on_out_of_range)
  mean = np.asarray(spec["mean"], np.float32)
  std = np.asarray(spec["std"], np.float32)
  return (x.astype(np.float32) - mean) / std
