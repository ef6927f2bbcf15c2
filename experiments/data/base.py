"""The one interface every data source implements, and the facts it reports.

A source is built once from the parsed config (`experiments.input_pipeline.load`) and then
answers everything the runner asks: `info`, `preflight()`, `split_sizes()`, `train_batches(...)`
from any step, and padded `eval_batches(...)`. Adding a source means one module with one
`Dataset` subclass (see `in_memory.InMemoryDataset`, `imagenet.ImagenetDataset`).
"""
import abc
import dataclasses
from typing import Iterator, NamedTuple, Optional, Tuple

import numpy as np


class DatasetInfo(NamedTuple):
  """Static facts about a dataset.

  `train_size` excludes the `validation_size` examples held out of the official training split;
  `test_size` is the official test split (ImageNet: the official validation set). `mean` / `std`
  are the per-channel statistics used for standardisation, in raw pixel units (0..255; digits
  0..16); `class_names[i]` names label i (empty when not known without loading the data).
  """
  name: str
  num_classes: int
  image_shape: Tuple[int, int, int]
  train_size: int
  validation_size: int
  test_size: int
  mean: Tuple[float, ...] = ()
  std: Tuple[float, ...] = ()
  class_names: Tuple[str, ...] = ()


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
  def train_batches(self, *, start_step: int, process_index: int,
                    process_count: int) -> Iterator[dict]:
    """This host's part of global training batches start_step, start_step + 1, ... forever."""

  @abc.abstractmethod
  def eval_batches(self, split: str, *, batch_size: int, process_index: int,
                   process_count: int, with_index: bool) -> Iterator[dict]:
    """Padded, masked batches covering `split` ("validation" or "test") once over all hosts."""


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
  validation: Optional[Split]
  class_names: Tuple[str, ...]
