"""The training-time preprocessing of a run, saved as ``data.json`` and applied to raw images.

A workdir written by ``experiments.train`` holds ``data.json`` (made by
``experiments.input_pipeline.data_spec``)::

  {"dataset": "digits", "image_shape": [8, 8, 1], "num_classes": 10,
   "class_names": ["0", ..., "9"], "mean": [4.88], "std": [6.02], "resize": 0}

``mean``/``std`` are per-channel statistics of the training split in raw pixel units; the
network sees ``(raw - mean) / std``. :func:`preprocess` applies exactly that to raw images, so
``load_checkpoint(...).predict`` gives the accuracy the run reported on raw pixels.
"""
import json
import os
from typing import Optional

import numpy as np

DATA_FILE = "data.json"
_KEYS = ("image_shape", "num_classes", "class_names", "mean", "std")


def write_data_spec(workdir: str, spec: dict):
  """Writes ``spec`` (see module docstring) to ``workdir/data.json`` atomically."""
  missing = [k for k in _KEYS if k not in spec]
  if missing:
    raise ValueError(f"data spec lacks {missing}; it needs {list(_KEYS)}")
  tmp = os.path.join(workdir, DATA_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(spec, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, DATA_FILE))


def read_data_spec(workdir: str) -> Optional[dict]:
  """Returns the ``data.json`` of ``workdir``, or None when there is none (older runs)."""
  path = os.path.join(workdir, DATA_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def preprocess(images, spec: dict) -> np.ndarray:
  """Raw images -> the float32 NHWC network input of training: ``(x - mean) / std``.

  Args:
    images: raw pixels as in the dataset (uint8 0..255, digits 0..16, or the floats of an npz
      file), shaped ``[N, H, W, C]``, or ``[N, H, W]`` for one channel, with ``(H, W, C)`` the
      spec's ``image_shape`` (resize images first if the run resized them: ``spec["resize"]``).
    spec: a ``data.json`` dict.
  Raises:
    ValueError: shape or channel count differing from the training images.
  """
  x = np.asarray(images)
  shape = tuple(spec["image_shape"])
  if x.ndim == 3 and shape[-1] == 1:
    x = x[..., None]
  if x.ndim != 4 or x.shape[1:] != shape:
    hint = ""
    if spec.get("resize"):
      hint = f" (training resized every image to {spec['resize']}x{spec['resize']})"
    raise ValueError(f"images of shape {np.shape(images)} do not match the training images "
                     f"[N, {', '.join(map(str, shape))}]{hint}")
  if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.number):
    raise ValueError(f"images must be numeric raw pixels, got dtype {x.dtype}")
  mean = np.asarray(spec["mean"], np.float32)
  std = np.asarray(spec["std"], np.float32)
  return (x.astype(np.float32) - mean) / std
