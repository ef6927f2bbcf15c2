"""The one interface every data source implements, and the facts it reports.

A source is built once per run from the parsed config (`experiments.input_pipeline.load`,
which wraps it in the run's `RunData`) and then answers everything the run asks: `info`,
`preflight()`, `split_sizes()`, `train_batches(...)` from any step, and padded
`eval_batches(...)`. It reads its data on first use and keeps what it read (the object is the
only cache). Adding a source means one module with one `Dataset` subclass (see
`in_memory.InMemoryDataset`, `imagenet.ImagenetDataset`).
"""

import abc
from collections.abc import Iterator
import dataclasses
from typing import NamedTuple

import numpy as np

from rknet_jax import preprocessing


class DatasetInfo(NamedTuple):
  """Static facts about a dataset.

  `train_size` excludes the `validation_size` examples held out of the official training split;
  `test_size` is the official test split (ImageNet: the official validation set). `mean` / `std`
  are the per-channel statistics used for standardisation, in raw pixel units (0..255; digits
  0..16); `class_names[i]` names label i (empty when not known without loading the data).
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  train_size: int
  validation_size: int
  test_size: int
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()
  class_names: tuple[str, ...] = ()
  pixel_range: tuple[float, ...] = ()  # (min, max) of the raw training pixels, when known
  pixel_dtype: str = ""  # their dtype as the source stores them ("uint8", "float32")


class Dataset(abc.ABC):
  """A data source with deterministic, resumable training batches and exact evaluation.

  Contract (checked by tests/test_input_pipeline.py for every source):
    * `train_batches`: global batch s is a pure function of (config.seed, s); host p of P gets
      rows [p*B/P, (p+1)*B/P) as {"image": float32[B/P, H, W, C], "label": int32[B/P]}.
    * `eval_batches`: global batch k holds examples [k*B, (k+1)*B) of the split, the last one
      padded with zero images of `mask` 0; every host yields ceil(N/B) batches.
  """

  @property
  @abc.abstractmethod
  def info(self) -> DatasetInfo:
    """Sizes, shape, classes and standardisation statistics (may load the training split)."""

  @abc.abstractmethod
  def preflight(self) -> str:
    """Raises (naming the missing or bad file) unless the data can be loaded; says from where."""

  @abc.abstractmethod
  def split_sizes(self) -> dict:
    """{"train", "validation", "test"} example counts (train after any hold-out)."""

  @abc.abstractmethod
  def train_batches(
    self, *, start_step: int, process_index: int, process_count: int, stats=None
  ) -> Iterator[dict]:
    """This host's part of global training batches start_step, start_step + 1, ... forever.

    `stats` = (mean, std) standardises with those (a run's data.json) instead of `info`'s."""

  @abc.abstractmethod
  def eval_batches(
    self,
    split: str,
    *,
    batch_size: int,
    process_index: int,
    process_count: int,
    with_index: bool,
    stats=None,
  ) -> Iterator[dict]:
    """Padded, masked batches covering `split` ("validation" or "test") once over all hosts
    (`stats` as in `train_batches`)."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory. `ids` are positions in the official split the examples come from."""

  images: np.ndarray  # [N, H, W, C], uint8 (or the float values of an npz file)
  labels: np.ndarray  # int32 [N]
  ids: np.ndarray  # int64 [N]

  def __len__(self):
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Splits:
  """Train (after the validation hold-out), validation and test splits in memory."""

  train: Split
  validation: Split
  test: Split


@dataclasses.dataclass(frozen=True)
class Official:
  """What an in-memory source reads: its official splits (validation: None when it has none,
  then one is held out of train) and the class names (label i is `class_names[i]`)."""

  train: Split
  test: Split
  validation: Split | None
  class_names: tuple[str, ...]


# ------------------------------------------------------------------------------------------------
# The checks every in-memory source's data passes before anything trains on it.

_INT32_MAX = int(np.iinfo(np.int32).max)


def labels_int32(labels, what: str) -> np.ndarray:
  """``labels`` as int32 after checking, before the cast, that each is a whole number >= 0
  that int32 holds (a float like 3.0 is accepted; 3.5, NaN, -1 or 2**31 are refused, naming
  ``what[index] = value``), so no label wraps or truncates into another class."""
  y = np.asarray(labels)
  if y.dtype == np.bool_ or not (
    np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)
  ):
    raise ValueError(f"{what} has dtype {y.dtype}; expected integers (class indices)")
  if np.issubdtype(y.dtype, np.floating):
    with np.errstate(invalid="ignore"):
      bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
    if bad.size:
      raise ValueError(
        f"{what}[{bad[0]}] = {float(y[bad[0]])} is not a whole number; labels "
        "are class indices 0, 1, ..., K-1"
      )
  bad = np.flatnonzero((y < 0) | (y > _INT32_MAX))
  if bad.size:
    value = y[bad[0]]
    value = int(value) if np.issubdtype(y.dtype, np.integer) else float(value)
    raise ValueError(
      f"{what}[{bad[0]}] = {value} is not a valid label (class indices are "
      f"0..K-1, at most {_INT32_MAX})"
    )
  return y.astype(np.int32)


def pixel_range(images) -> tuple[str, float, float]:
  """(dtype name, min, max) of an in-memory image array (float arrays: finite by then)."""
  x = np.asarray(images)
  return x.dtype.name, float(x.min()), float(x.max())


def _dtype_kind(dtype_name: str) -> str:
  return "float" if dtype_name.startswith("float") else dtype_name


def check_official(official: "Official", where: str) -> None:
  """Raises ValueError, naming the split and the first offending index, unless the data can be
  trained on as it is: labels in [0, K) with K = len(class_names), at least 2 classes among
  the training labels, finite pixels, and every split stored with the training split's dtype
  and scale (`rknet_jax.preprocessing.range_problem`). Images decoded from files on access
  (`folder.FileImages`, uint8 by construction) are not scanned here."""
  num_classes = len(official.class_names)
  splits = [("train", official.train), ("test", official.test)]
  if official.validation is not None:
    splits.append(("validation", official.validation))
  for name, split in splits:
    y = np.asarray(split.labels)
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if bad.size:
      raise ValueError(
        f"{where}: {name} label [{bad[0]}] = {int(y[bad[0]])} is not a valid "
        f"label (0..{num_classes - 1}, the training classes)"
      )
  present = np.unique(np.asarray(official.train.labels))
  if len(present) < 2:
    raise ValueError(
      f"{where}: every training label is {int(present[0])} ({len(official.train)} images): "
      "a classifier needs training examples of at least 2 classes (a 1-class model reports "
      "0 error without learning anything)"
    )
  ranges = {}
  for name, split in splits:
    if not isinstance(split.images, np.ndarray):
      continue
    x = split.images
    if np.issubdtype(x.dtype, np.floating):
      finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
      if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        value = x[i][~np.isfinite(x[i])].reshape(-1)[0]
        raise ValueError(
          f"{where}: {name} image {i} holds a non-finite pixel ({value}); "
          "every pixel must be a finite number"
        )
    ranges[name] = pixel_range(x)
  if "train" not in ranges:
    return
  train_dtype, lo, hi = ranges["train"]
  for name, (dtype, a, b) in ranges.items():
    problem = preprocessing.range_problem((lo, hi), (a, b))
    if _dtype_kind(dtype) != _dtype_kind(train_dtype) or problem:
      raise ValueError(
        f"{where}: {name} images are {dtype} in [{a:g}, {b:g}] but train images are "
        f"{train_dtype} in [{lo:g}, {hi:g}]"
        + (f" ({problem})" if problem else "")
        + ": store every split with one dtype and one pixel scale"
      )
