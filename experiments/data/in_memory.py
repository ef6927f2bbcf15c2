"""Exact, index-based pipelines for datasets that fit in host memory: digits, CIFAR, SVHN.

The whole official split is held as uint8 numpy arrays (CIFAR-10 train: 150 MB). A batch is
`images[permutation[...]]`, so the order, the held-out validation split and the augmentation are
pure functions of integers (seeds, step, position) and resuming at any step is free and exact.
"""
import dataclasses
import math
import threading

import numpy as np

from experiments.data import prepare
from experiments.data import tfds_utils

# Tags that keep the random streams derived from one user seed independent of each other.
_TAG_VALIDATION = 0x5EED_0001
_TAG_EPOCH = 0x5EED_0002
_TAG_AUGMENT = 0x5EED_0003
# The digits train/test split is fixed forever (the README's accuracy refers to it).
DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 20190506


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory. `ids` are positions in the official split the examples come from."""
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]
  ids: np.ndarray  # int64 [N]

  def __len__(self):
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Splits:
  train: Split
  validation: Split
  test: Split


def _entropy(x: int) -> int:
  """Maps any Python int (negative seeds included) to a non-negative SeedSequence word."""
  return int(x) % (1 << 64)


def _rng(*words: int) -> np.random.Generator:
  return np.random.default_rng([_entropy(w) for w in words])


# ------------------------------------------------------------------------------------------------
# Loading (cached per process and per data source).

_CACHE_LOCK = threading.Lock()
_OFFICIAL_CACHE = {}
_SPLITS_CACHE = {}


def clear_cache():
  """Drops the in-memory copies of loaded datasets."""
  with _CACHE_LOCK:
    _OFFICIAL_CACHE.clear()
    _SPLITS_CACHE.clear()


def _load_digits():
  """scikit-learn's bundled 8x8 digits (offline), values 0..16, with the fixed test split."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.asarray(digits.images, np.float64)
  if not np.array_equal(images, np.round(images)) or images.min() < 0 or images.max() > 16:
    raise RuntimeError("scikit-learn digits are no longer integers in [0, 16]")
  images = images.astype(np.uint8)[..., None]
  labels = np.asarray(digits.target, np.int32)
  order = _rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
  test, train = np.sort(order[:DIGITS_TEST_SIZE]), np.sort(order[DIGITS_TEST_SIZE:])
  # ids: positions in sklearn's array (train and test ids are disjoint by construction).
  return (Split(images[train], labels[train], train.astype(np.int64)),
          Split(images[test], labels[test], test.astype(np.int64)))


def _read_tfds_split(builder, split: str) -> Split:
  tfds = tfds_utils.import_tfds()
  ds = tfds_utils.as_dataset(builder, split=split, shuffle_files=False)
  ds = ds.map(lambda ex: (ex["image"], ex["label"])).batch(4096)
  images, labels = [], []
  for x, y in tfds.as_numpy(ds):
    images.append(x)
    labels.append(y)
  if not images:
    raise ValueError(f"split {split!r} of {builder.name} is empty")
  images = np.concatenate(images)
  labels = np.concatenate(labels).astype(np.int32)
  if images.dtype != np.uint8:
    raise ValueError(f"{builder.name} images are {images.dtype}, expected uint8")
  return Split(images, labels, np.arange(len(labels), dtype=np.int64))


def _source_token(dataset: str):
  """Identifies where data comes from: the TFDS loading functions in effect.

  `tfds.testing.mock_data` installs new functions in each context, so cached arrays are never
  reused across mock contexts (or between mocked and real data).
  """
  if dataset == "digits":
    return "sklearn"
  core = tfds_utils.import_tfds().core
  return (core.dataset_builder.DatasetBuilder.as_dataset,
          core.dataset_builder.FileReaderBuilder._as_dataset)  # pylint: disable=protected-access


def _cached(cache, key, make, max_entries=2):
  with _CACHE_LOCK:
    if key in cache:
      return cache[key]
  value = make()
  with _CACHE_LOCK:
    if len(cache) >= max_entries:  # bounded host memory: usually one dataset per process
      cache.clear()
    cache[key] = value
  return value


def load_official(settings):
  """Returns (official train Split, test Split) for an in-memory dataset (cached)."""
  def make():
    if settings.dataset == "digits":
      return _load_digits()
    builder = prepare.get_builder(settings.dataset, settings.data_dir,
                                  download=settings.download)
    train_split = "train+extra" if settings.svhn_extra else "train"
    return _read_tfds_split(builder, train_split), _read_tfds_split(builder, "test")
  key = (settings.dataset, settings.data_dir, settings.svhn_extra,
         _source_token(settings.dataset))
  return _cached(_OFFICIAL_CACHE, key, make)


def holdout(official_train: Split, validation_size: int, split_seed: int):
  """Splits the official training set into disjoint (train, validation) by a seeded permutation."""
  n = len(official_train)
  if not 0 <= validation_size < n:
    raise ValueError(f"validation_size={validation_size} must be in [0, {n}) for this dataset "
                     f"({n} official training examples)")
  order = _rng(split_seed, _TAG_VALIDATION).permutation(n)
  val, train = np.sort(order[:validation_size]), np.sort(order[validation_size:])
  take = lambda idx: Split(official_train.images[idx], official_train.labels[idx],
                           official_train.ids[idx])
  return take(train), take(val)


def load_splits(settings) -> Splits:
  """Train (official train minus validation), validation (held out) and test, in memory."""
  def make():
    official_train, test = load_official(settings)
    train, validation = holdout(official_train, settings.validation_size, settings.split_seed)
    return Splits(train, validation, test)
  key = (settings.dataset, settings.data_dir, settings.svhn_extra, settings.validation_size,
         settings.split_seed, _source_token(settings.dataset))
  return _cached(_SPLITS_CACHE, key, make, max_entries=1)


# ------------------------------------------------------------------------------------------------
# Batches.


def standardise(images: np.ndarray, mean, std) -> np.ndarray:
  """Per-channel standardisation (x - mean) / std in float32, NHWC."""
  n, h, w, c = images.shape
  # Broadcasting over a length-C trailing axis is slow in numpy; tile mean/std along each row.
  mean = np.tile(np.asarray(mean, np.float32), h * w)
  inv_std = np.tile(1.0 / np.asarray(std, np.float32), h * w)
  out = images.reshape(n, h * w * c).astype(np.float32)
  out -= mean
  out *= inv_std
  return out.reshape(n, h, w, c)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the training examples in `epoch`: a pure function of (seed, epoch)."""
  return _rng(seed, _TAG_EPOCH, epoch).permutation(n)


def pad_crop_flip(images: np.ndarray, *, seed: int, step: int, start: int, global_batch: int,
                  pad: int = 4) -> np.ndarray:
  """Standard CIFAR augmentation: zero-pad by `pad`, random HxW crop, random horizontal flip.

  The random numbers are drawn for the whole global batch from (seed, step), and rows
  `start:start+len(images)` are used, so an example's augmentation depends only on
  (seed, step, position in the global batch): not on the host count, nor on resumption.
  """
  n, h, w, _ = images.shape
  rng = _rng(seed, _TAG_AUGMENT, step)
  offsets = rng.integers(0, 2 * pad + 1, size=(global_batch, 2))[start:start + n]
  flips = (rng.random(global_batch) < 0.5)[start:start + n]
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.empty_like(images)
  for j, ((dy, dx), flip) in enumerate(zip(offsets, flips)):
    crop = padded[j, dy:dy + h, dx:dx + w]
    out[j] = crop[:, ::-1] if flip else crop
  return out


def train_batches(train: Split, *, mean, std, batch_size: int, seed: int, start_step: int,
                  process_index: int, process_count: int, augment: bool):
  """Yields this host's slice of global batch s, s = start_step, start_step + 1, ... forever.

  Global batch s holds examples permutation_e[k*B:(k+1)*B] with e, k = divmod(s, steps_per_epoch)
  and permutation_e = epoch_permutation(seed, e); the last N mod B examples of each epoch's
  permutation are dropped. Host p gets rows [p*B/P, (p+1)*B/P).
  """
  n = len(train)
  steps = n // batch_size
  if steps == 0:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples")
  local = batch_size // process_count
  start = process_index * local
  epoch, perm = None, None
  step = start_step
  while True:
    e, k = divmod(step, steps)
    if e != epoch:
      epoch, perm = e, epoch_permutation(seed, e, n)
    idx = perm[k * batch_size + start:k * batch_size + start + local]
    images = train.images[idx]
    if augment:
      images = pad_crop_flip(images, seed=seed, step=step, start=start, global_batch=batch_size)
    yield {"image": standardise(images, mean, std), "label": train.labels[idx]}
    step += 1


def host_slot_positions(num_examples: int, *, batch_size: int, process_index: int,
                        process_count: int):
  """Split positions of this host's eval slots, batch by batch; positions >= N are padding.

  Global eval batch k holds positions [k*B, (k+1)*B); host p owns [k*B + p*b, k*B + (p+1)*b)
  with b = B/P. Every host gets ceil(N/B) batches, and every position < N is owned once.
  """
  local = batch_size // process_count
  num_batches = math.ceil(num_examples / batch_size)
  base = np.arange(num_batches)[:, None] * batch_size + process_index * local
  return base + np.arange(local)[None, :]  # [num_batches, local]


def eval_batches(split: Split, *, mean, std, batch_size: int, process_index: int,
                 process_count: int, with_index: bool):
  """Yields padded, masked batches that cover `split` exactly once across all hosts."""
  n = len(split)
  positions = host_slot_positions(n, batch_size=batch_size, process_index=process_index,
                                  process_count=process_count)
  for pos in positions:
    valid = pos < n
    idx = np.where(valid, pos, 0)
    images = standardise(split.images[idx], mean, std)
    images[~valid] = 0.0
    batch = {
        "image": images,
        "label": np.where(valid, split.labels[idx], 0).astype(np.int32),
        "mask": valid.astype(np.float32),
    }
    if with_index:
      batch["index"] = np.where(valid, pos, -1).astype(np.int64)
    yield batch
