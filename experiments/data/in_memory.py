"""Exact, index-based pipelines for datasets that fit in host memory: digits, CIFAR, SVHN, MNIST,
any small TFDS image-classification dataset, npz files and image folders.

The whole official split is held as uint8 numpy arrays (CIFAR-10 train: 150 MB). A batch is
`images[permutation[...]]`, so the order, the held-out validation split and the augmentation are
pure functions of integers (seeds, step, position) and resuming at any step is free and exact.
"""

import math

import numpy as np

from experiments.data import base, prepare, tfds_utils

# Tags that keep the random streams derived from one user seed independent of each other.
_TAG_VALIDATION = 0x5EED_0001
_TAG_EPOCH = 0x5EED_0002
_TAG_AUGMENT = 0x5EED_0003
# The digits train/test split is fixed forever (the README's accuracy refers to it).
DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 20190506


def _entropy(x: int) -> int:
  """Maps any Python int (negative seeds included) to a non-negative SeedSequence word."""
  return int(x) % (1 << 64)


def _rng(*words: int) -> np.random.Generator:
  return np.random.default_rng([_entropy(w) for w in words])


# ------------------------------------------------------------------------------------------------
# Loading.


def _load_digits():
  """scikit-learn's bundled 8x8 digits (offline), values 0..16, with the fixed test split."""
  from sklearn import datasets

  digits = datasets.load_digits()
  images = np.asarray(digits.images, np.float64)
  if not np.array_equal(images, np.round(images)) or images.min() < 0 or images.max() > 16:
    raise RuntimeError("scikit-learn digits are no longer integers in [0, 16]")
  images = images.astype(np.uint8)[..., None]
  labels = np.asarray(digits.target, np.int32)
  order = _rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
  test, train = np.sort(order[:DIGITS_TEST_SIZE]), np.sort(order[DIGITS_TEST_SIZE:])
  # ids: positions in sklearn's array (train and test ids are disjoint by construction).
  return (
    base.Split(images[train], labels[train], train.astype(np.int64)),
    base.Split(images[test], labels[test], test.astype(np.int64)),
  )


def _supervised_keys(builder):
  keys = builder.info.supervised_keys or ("image", "label")
  features = builder.info.features
  image_key, label_key = keys[0], keys[1]
  tfds = tfds_utils.import_tfds()
  if (
    image_key not in features
    or label_key not in features
    or not isinstance(features[image_key], tfds.features.Image)
    or not isinstance(features[label_key], tfds.features.ClassLabel)
  ):
    raise ValueError(
      f"TFDS dataset {builder.name!r} is not an image-classification dataset "
      f"(needs an Image feature and a ClassLabel feature; has {features})"
    )
  return image_key, label_key


def _read_tfds_split(builder, split: str) -> base.Split:
  tfds = tfds_utils.import_tfds()
  image_key, label_key = _supervised_keys(builder)
  ds = tfds_utils.as_dataset(builder, split=split, shuffle_files=False)
  ds = ds.map(lambda ex: (ex[image_key], ex[label_key])).batch(4096)
  images, labels = [], []
  for x, y in tfds.as_numpy(ds):
    images.append(x)
    labels.append(y)
  if not images:
    raise ValueError(f"split {split!r} of {builder.name} is empty")
  images = np.concatenate(images)
  labels = base.labels_int32(np.concatenate(labels), f"{builder.name} {split} labels")
  if images.dtype != np.uint8:
    raise ValueError(f"{builder.name} images are {images.dtype}, expected uint8")
  return base.Split(images, labels, np.arange(len(labels), dtype=np.int64))


def load_tfds(settings) -> base.Official:
  """Official train (train+extra for svhn_extra) and test splits of a TFDS dataset."""
  builder = prepare.get_builder(settings.target, settings.data_dir, download=settings.download)
  splits = set(builder.info.splits)
  if splits and ("train" not in splits or "test" not in splits):  # (mock data lists none)
    raise ValueError(
      f"TFDS dataset {settings.target!r} has splits {sorted(splits)}; the runner "
      "needs 'train' and 'test'"
    )
  train_split = "train+extra" if settings.svhn_extra else "train"
  _, label_key = _supervised_keys(builder)
  names = tuple(builder.info.features[label_key].names)
  return base.Official(
    _read_tfds_split(builder, train_split), _read_tfds_split(builder, "test"), None, names
  )


def load_digits(unused_settings) -> base.Official:
  """scikit-learn's bundled 8x8 digits (offline), values 0..16, with the fixed test split."""
  train, test = _load_digits()
  return base.Official(train, test, None, tuple(str(i) for i in range(10)))


def holdout(official_train: base.Split, validation_size: int, split_seed: int):
  """Splits the official training set into disjoint (train, validation) by a seeded permutation."""
  n = len(official_train)
  if not 0 <= validation_size < n:
    raise ValueError(
      f"validation_size={validation_size} must be in [0, {n}) for this dataset "
      f"({n} official training examples)"
    )
  order = _rng(split_seed, _TAG_VALIDATION).permutation(n)
  val, train = np.sort(order[:validation_size]), np.sort(order[validation_size:])

  def take(idx):
    images = official_train.images
    images = images.subset(idx) if hasattr(images, "subset") else images[idx]  # (file-backed)
    return base.Split(images, official_train.labels[idx], official_train.ids[idx])

  return take(train), take(val)


def image_summary(images, chunk: int = 4096):
  """(mean, std, min, max) of NHWC images (an array or `folder.FileImages`), in their own
  units: per-channel mean/std from two passes of float64 sums over chunks of `chunk` images,
  and the overall pixel min/max from the first pass."""
  n, c = images.shape[0], images.shape[-1]
  chunks = [np.arange(i, min(i + chunk, n)) for i in range(0, n, chunk)]
  pixels = n * int(np.prod(images.shape[1:-1]))
  total = np.zeros(c)
  lo, hi = np.inf, -np.inf
  for idx in chunks:
    x = np.asarray(images[idx])
    total += x.reshape(-1, c).sum(axis=0, dtype=np.float64)
    lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
  mean = total / pixels
  squares = np.zeros(c)
  for idx in chunks:
    centred = np.asarray(images[idx]).reshape(-1, c).astype(np.float64) - mean
    squares += np.einsum("ij,ij->j", centred, centred)
  std = np.sqrt(squares / pixels)
  std = np.where(std > 0, std, 1.0)  # a constant channel is only centred
  return tuple(float(v) for v in mean), tuple(float(v) for v in std), lo, hi


def channel_stats(images, chunk: int = 4096):
  """Per-channel (mean, std) of NHWC images (see `image_summary`)."""
  return image_summary(images, chunk)[:2]


class InMemoryDataset(base.Dataset):
  """A source held in host memory: batches are index arithmetic on uint8 arrays (module doc).

  Args:
    settings: the parsed config (`experiments.input_pipeline`).
    load: settings -> `base.Official` (digits, TFDS, npz, folder readers).
    preflight: settings -> str, the cheap availability check (default: load the data).
    mean, std: the dataset's published standardisation constants (default: computed on the
      official train split).

  The data are read on first use and kept by this object: the official splits are loaded and
  pass `base.check_official` (labels, classes, finite pixels, one dtype and scale for every
  split) once, the validation split is carved once and the statistics are computed once,
  however many batches and facts are asked for. Nothing is kept anywhere else: a new object
  reads the data as they are then.
  """

  def __init__(self, settings, load, *, preflight=None, mean=None, std=None):
    self._s = settings
    self._load = load
    self._preflight = preflight
    self._stats = (tuple(mean), tuple(std)) if mean is not None else None
    self._range = None
    self._official = None
    self._splits = None

  def official(self) -> base.Official:
    """The official splits, read and checked on the first call."""
    if self._official is None:
      official = self._load(self._s)
      base.check_official(official, self._s.dataset)
      self._official = official
    return self._official

  def splits(self) -> base.Splits:
    """Train (after the hold-out), validation and test, carved on the first call."""
    if self._splits is None:
      self._splits = self._carve(self.official())
    return self._splits

  def _carve(self, official: base.Official) -> base.Splits:
    s = self._s
    if official.validation is not None:
      if s.validation_size:
        raise ValueError(
          f"{s.dataset} has its own validation split ({len(official.validation)} examples), "
          f"used as is: set config.validation_size=0, not {s.validation_size}"
        )
      return base.Splits(official.train, official.validation, official.test)
    train, validation = holdout(official.train, s.validation_size, s.split_seed)
    return base.Splits(train, validation, official.test)

  def _summarise(self):
    images = self.official().train.images
    if self._stats is None or (self._range is None and not isinstance(images, np.ndarray)):
      mean, std, lo, hi = image_summary(images)  # one pass over decoded files
      self._stats = self._stats or (mean, std)
      self._range = (lo, hi)
    elif self._range is None:
      self._range = base.pixel_range(images)[1:]

  def stats(self):
    """The dataset's own per-channel (mean, std)."""
    if self._stats is None:
      self._summarise()
    return self._stats

  def pixel_range(self):
    """(min, max) of the raw official training pixels."""
    if self._range is None:
      self._summarise()
    return self._range

  @property
  def info(self) -> base.DatasetInfo:
    official, splits = self.official(), self.splits()
    mean, std = self.stats()
    return base.DatasetInfo(
      self._s.dataset,
      len(official.class_names),
      tuple(official.train.images.shape[1:]),
      len(splits.train),
      len(splits.validation),
      len(splits.test),
      mean,
      std,
      official.class_names,
      tuple(self.pixel_range()),
      np.dtype(official.train.images.dtype).name,
    )

  def preflight(self) -> str:
    if self._preflight is not None:
      return self._preflight(self._s)
    info = self.info
    return (
      f"{self._s.dataset}: {info.train_size} train / {info.validation_size} validation / "
      f"{info.test_size} test images of {info.image_shape}, {info.num_classes} classes"
    )

  def split_sizes(self) -> dict:
    splits = self.splits()
    return {
      "train": len(splits.train),
      "validation": len(splits.validation),
      "test": len(splits.test),
    }

  def train_batches(self, *, start_step, process_index, process_count, stats=None):
    mean, std = stats or self.stats()
    return train_batches(
      self.splits().train,
      mean=mean,
      std=std,
      batch_size=self._s.batch_size,
      seed=self._s.seed,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
      augment=self._s.augment,
    )

  def eval_batches(
    self, split, *, batch_size, process_index, process_count, with_index, stats=None
  ):
    mean, std = stats or self.stats()
    return eval_batches(
      getattr(self.splits(), split),
      mean=mean,
      std=std,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
      with_index=with_index,
    )


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


def pad_crop_flip(
  images: np.ndarray, *, seed: int, step: int, start: int, global_batch: int, pad: int = 4
) -> np.ndarray:
  """Standard CIFAR augmentation: zero-pad by `pad`, random HxW crop, random horizontal flip.

  The random numbers are drawn for the whole global batch from (seed, step), and rows
  `start:start+len(images)` are used, so an example's augmentation depends only on
  (seed, step, position in the global batch): not on the host count, nor on resumption.
  """
  n, h, w, _ = images.shape
  rng = _rng(seed, _TAG_AUGMENT, step)
  offsets = rng.integers(0, 2 * pad + 1, size=(global_batch, 2))[start : start + n]
  flips = (rng.random(global_batch) < 0.5)[start : start + n]
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.empty_like(images)
  for j, ((dy, dx), flip) in enumerate(zip(offsets, flips)):
    crop = padded[j, dy : dy + h, dx : dx + w]
    out[j] = crop[:, ::-1] if flip else crop
  return out


def train_batches(
  train: base.Split,
  *,
  mean,
  std,
  batch_size: int,
  seed: int,
  start_step: int,
  process_index: int,
  process_count: int,
  augment: bool,
):
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
    idx = perm[k * batch_size + start : k * batch_size + start + local]
    images = train.images[idx]
    if augment:
      images = pad_crop_flip(images, seed=seed, step=step, start=start, global_batch=batch_size)
    yield {"image": standardise(images, mean, std), "label": train.labels[idx]}
    step += 1


def host_slot_positions(
  num_examples: int, *, batch_size: int, process_index: int, process_count: int
):
  """Split positions of this host's eval slots, batch by batch; positions >= N are padding.

  Global eval batch k holds positions [k*B, (k+1)*B); host p owns [k*B + p*b, k*B + (p+1)*b)
  with b = B/P. Every host gets ceil(N/B) batches, and every position < N is owned once.
  """
  local = batch_size // process_count
  num_batches = math.ceil(num_examples / batch_size)
  base = np.arange(num_batches)[:, None] * batch_size + process_index * local
  return base + np.arange(local)[None, :]  # [num_batches, local]


def eval_batches(
  split: base.Split,
  *,
  mean,
  std,
  batch_size: int,
  process_index: int,
  process_count: int,
  with_index: bool,
):
  """Yields padded, masked batches that cover `split` exactly once across all hosts."""
  n = len(split)
  positions = host_slot_positions(
    n, batch_size=batch_size, process_index=process_index, process_count=process_count
  )
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
