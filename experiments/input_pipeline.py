"""Input pipelines: datasets, preprocessing, deterministic resumable per-host batches, exact eval.

Datasets (paper section 4.1, plus `digits` for an offline quickstart):

| name | images | classes | train / validation (held out of train) / test |
| --- | --- | --- | --- |
| `digits` | 8x8x1 (scikit-learn, bundled) | 10 | 1,293 / 144 / 360 (fixed seeded test split) |
| `cifar10`, `cifar100` | 32x32x3 | 10, 100 | 45,000 / 5,000 / 10,000 |
| `svhn_cropped` | 32x32x3 | 10 | 68,257 / 5,000 / 26,032 (`svhn_extra` adds 531,131) |
| `imagenet2012` | image_size^2 x 3 | 1000 | 1,271,167 / 10,000 / 50,000 (official val) |
| `mnist`, `fashion_mnist`, `kmnist` | 28x28x1 (TFDS) | 10 | 60,000 / 0 / 10,000 |
| `tfds:NAME` | any TFDS image-classification dataset with train and test splits, in memory |
| `npz:FILE` | arrays in one .npz file (experiments/data/npz.py) |
| `folder:PATH` | PNG/JPEG in PATH/{train,test[,validation]}/<class>/ (experiments/data/folder.py) |

Paper datasets use the published per-channel mean/std; every other source computes them from
its official training split. `load(config).data_spec()` returns them with the image shape and
class names as JSON (the runner saves it as `workdir/data.json`; `rknet_jax.load_checkpoint`'s
`predict` applies it to raw images).

Config fields read (a `ml_collections.ConfigDict` or a dict; those after `seed` are optional):
  dataset: one of the names or forms above.
  batch_size: global batch size (all hosts together).
  seed: training seed (default 0): fixes the order of the training examples and the
    augmentation; batch `s` is a pure function of (seed, s).
  data_dir: TFDS data directory (None: `$TFDS_DATA_DIR` or ~/tensorflow_datasets).
  validation_size: examples held out of the official training split for model selection
    (None: the dataset's default above, 0 for the other sources; 0: no validation split). An
    npz/folder source with its own validation split uses it as is (validation_size must be 0).
  split_seed: seed of the validation hold-out (default 0), separate from `seed` so that runs
    with different seeds are selected on the same validation examples.
  augment: training augmentation (None: dataset default). False for digits, CIFAR and SVHN (the
    paper trains CIFAR without augmentation); True gives pad-4 random crop + horizontal flip.
    ImageNet defaults to True (random resized crop, colour jitter, PCA lighting, flip); False
    trains on centre crops.
  image_size: ImageNet crop size (None or 0: 224; the other datasets keep their native size).
  download: allow TFDS to download and prepare a missing dataset (default False; ImageNet is
    then prepared from the manual download, see below).
  manual_dir: folder with ImageNet's tar files (default `<data_dir>/downloads/manual`).
  shuffle_buffer: ImageNet shuffle buffer in examples (default 10,000, ~1 GB of JPEG bytes).
  host_shards: ImageNet only (default False): each host reads only its 1/P of the training
    records (`tfds.even_splits`) instead of reading all and decoding its 1/P. Cuts I/O P-fold on
    pods, but then global batches depend on the host count (resume with the same count).
  svhn_extra: train SVHN on train+extra (default False).
  prefetch: host batches prepared ahead by a background thread (default 2).
  resize: folder datasets only: 0 (default) requires one image size; N resizes images of another
    size to N x N.

Structure. `load(config)` reads the config once into the run's `RunData`: the parsed config and
its source, a `Dataset` (experiments/data/base.py: info, preflight, split sizes, training
batches from any step, padded eval batches) implemented by `in_memory.InMemoryDataset` (digits,
TFDS, npz, folder) and `imagenet.ImagenetDataset`. The data are read on first use and kept by
that object, so a run (`experiments.train`) and an evaluation (`experiments.evaluate`) build
one each and load, check, summarise and fingerprint their data once. The functions that take a
config (`preflight(config)`, `train_iterator(config, ...)`, ...) build their own `RunData` per
call: for scripts and tests.

Determinism and resumption. Digits, CIFAR, SVHN and the other sources above except ImageNet are
held in host memory as arrays (large folders: as file lists decoded batch by batch); epoch e
visits the training examples in `permutation(seed, e)` order and the last N mod B are dropped, so
`steps_per_epoch = N // B`, and batch s is exact and free to compute from (seed, s). ImageNet is
streamed with tf.data (see experiments/data/imagenet.py for its order and resumption cost).
Host p of P receives rows [p*B/P, (p+1)*B/P) of every global batch, so the global batch does not
depend on the host count; augmentation randomness depends only on (seed, step, row).

Evaluation. `eval_iterator` covers its split exactly once: global eval batch k holds examples
[k*B, (k+1)*B), the last one padded with zero images whose `mask` is 0, and every host yields
ceil(N/B) batches. Sum a metric times `mask` and divide by the sum of `mask`.

ImageNet preparation (manual; TFDS cannot download it):
  1. Get ILSVRC2012_img_train.tar (~138 GB) and ILSVRC2012_img_val.tar (~6.3 GB) from
     https://image-net.org/download-images (account required).
  2. Put both in `<data_dir>/downloads/manual/` (or any folder given as `manual_dir`).
  3. Prepare once: `python -m experiments.prepare_data --dataset=imagenet2012
     --data_dir=<data_dir> --manual_dir=<manual_dir>` (several hours, ~160 GB more disk), or
     train once with `--config.download=True`.
  `preflight(config)` names the missing file or folder before any training starts.
"""

import dataclasses
import numbers
import os

import numpy as np

from experiments.data import base, in_memory, tfds_utils
from experiments.data import fingerprint as fingerprint_lib
from experiments.data import folder as folder_lib
from experiments.data import imagenet as imagenet_lib
from experiments.data import npz as npz_lib
from experiments.data import prefetch as prefetch_lib
from experiments.data import prepare as prepare_lib

IMAGENET_MANUAL_FILES = prepare_lib.IMAGENET_MANUAL_FILES
EVAL_SPLITS = ("validation", "test")
SVHN_EXTRA_SIZE = 531_131
DatasetInfo = base.DatasetInfo
Dataset = base.Dataset


@dataclasses.dataclass(frozen=True)
class _Spec:
  num_classes: int
  image_shape: tuple[int, int, int]
  official_train: int
  default_validation: int
  test: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  default_augment: bool
  in_memory: bool


def _scaled(values, scale=255.0):
  return tuple(v * scale for v in values)


# Per-channel mean/std of each official training split (CIFAR/SVHN/ImageNet: the widely used
# published values; digits: computed from all 1,797 images, checked by a test).
# One dataset per line: num_classes, image shape, official train / default validation / test
# sizes, per-channel mean and std, augment by default, held in memory.
# fmt: off
_SPECS = {
  "digits": _Spec(10, (8, 8, 1), 1797 - in_memory.DIGITS_TEST_SIZE, 144, in_memory.DIGITS_TEST_SIZE, (4.884164579855314,), (6.016787548672236,), False, True),  # noqa: E501
  "cifar10": _Spec(10, (32, 32, 3), 50_000, 5_000, 10_000, _scaled((0.4914, 0.4822, 0.4465)), _scaled((0.2470, 0.2435, 0.2616)), False, True),  # noqa: E501
  "cifar100": _Spec(100, (32, 32, 3), 50_000, 5_000, 10_000, _scaled((0.5071, 0.4865, 0.4409)), _scaled((0.2673, 0.2564, 0.2762)), False, True),  # noqa: E501
  "svhn_cropped": _Spec(10, (32, 32, 3), 73_257, 5_000, 26_032, _scaled((0.4377, 0.4438, 0.4728)), _scaled((0.1980, 0.2010, 0.1970)), False, True),  # noqa: E501
  "imagenet2012": _Spec(1000, (224, 224, 3), 1_281_167, 10_000, 50_000, _scaled((0.485, 0.456, 0.406)), _scaled((0.229, 0.224, 0.225)), True, False),  # noqa: E501
}
# fmt: on
DATASETS = tuple(_SPECS)
# TFDS image-classification datasets known by their plain name (any other: `tfds:NAME`).
TFDS_SHORT_NAMES = ("mnist", "fashion_mnist", "kmnist")
PREFIXES = ("tfds:", "npz:", "folder:")


def _parse_name(name):
  """config.dataset -> (source, target): digits/tfds/imagenet/npz/folder and a name or path."""
  if not isinstance(name, str):
    raise ValueError(f"config.dataset must be a string, got {name!r}")
  if name == "digits":
    return "digits", name
  if name == "imagenet2012":
    return "imagenet", name
  if name in _SPECS or name in TFDS_SHORT_NAMES:
    return "tfds", name
  for prefix in PREFIXES:
    if name.startswith(prefix) and name[len(prefix) :]:
      target = name[len(prefix) :]
      if prefix == "tfds:":
        return ("imagenet" if target == "imagenet2012" else "tfds"), target
      return prefix[:-1], os.path.abspath(os.path.expanduser(target))
  raise ValueError(
    f"Unknown dataset {name!r}; known datasets: {', '.join(DATASETS + TFDS_SHORT_NAMES)}, "
    "or tfds:NAME (any TFDS image-classification dataset), npz:FILE, folder:PATH"
  )


def check_dataset_name(name: str) -> None:
  """Raises ValueError for a `config.dataset` value that names no dataset (no data is read)."""
  _parse_name(name)


def _spec(name) -> _Spec | None:
  """The static facts of a paper dataset (None for the other sources)."""
  _parse_name(name)
  return _SPECS.get(name)


def dataset_info(name, *, image_size: int = 224) -> DatasetInfo:
  """Sizes, shape, classes and standardisation constants of a dataset.

  Args:
    name: one of `DATASETS` (answered without reading data), or a config (any source: reads
      the training split where the facts come from the data).
    image_size: ImageNet crop size (ignored by the other datasets and when `name` is a config).
  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  if not isinstance(name, str):
    return load(name).info
  spec = _spec(name)
  if spec is None:
    return load({"dataset": name, "batch_size": 1}).info
  shape = (image_size, image_size, 3) if name == "imagenet2012" else spec.image_shape
  return DatasetInfo(
    name,
    spec.num_classes,
    shape,
    spec.official_train - spec.default_validation,
    spec.default_validation,
    spec.test,
    spec.mean,
    spec.std,
    pixel_range=(0.0, 255.0) if name == "imagenet2012" else (),
    pixel_dtype="uint8" if name == "imagenet2012" else "",
  )


# ------------------------------------------------------------------------------------------------
# Config parsing (all validation happens here, before any data is touched).

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class _Settings:
  dataset: str
  source: str
  target: str
  batch_size: int
  seed: int
  data_dir: str | None
  validation_size: int
  split_seed: int
  augment: bool
  image_size: int
  download: bool
  manual_dir: str | None
  shuffle_buffer: int
  svhn_extra: bool
  prefetch: int
  host_shards: bool
  resize: int


def _field(config, name, default=_MISSING):
  if hasattr(config, "get"):  # dict, ml_collections.ConfigDict / FrozenConfigDict
    value = config.get(name, default)
  else:
    value = getattr(config, name, default)
  if value is _MISSING:
    raise ValueError(f"config has no field {name!r}, which the input pipeline needs")
  return value


def _int(label, value, minimum=None):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{label} must be an integer, got {value!r}")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"{label} must be >= {minimum}, got {value}")
  return value


def _settings(config) -> _Settings:
  dataset = _field(config, "dataset")
  source, target = _parse_name(dataset)
  spec = _SPECS.get(dataset)
  batch_size = _int("config.batch_size", _field(config, "batch_size"), 1)
  validation_size = _field(config, "validation_size", None)
  if validation_size is None:
    validation_size = spec.default_validation if spec else 0
  validation_size = _int("config.validation_size", validation_size, 0)
  svhn_extra = bool(_field(config, "svhn_extra", False))
  if svhn_extra and dataset != "svhn_cropped":
    raise ValueError(f"config.svhn_extra=True applies to svhn_cropped only, not {dataset!r}")
  if spec:
    official = spec.official_train + (SVHN_EXTRA_SIZE if svhn_extra else 0)
    if validation_size >= official:
      raise ValueError(
        f"config.validation_size={validation_size} must be smaller than the "
        f"{official} official training examples of {dataset}"
      )
  augment = _field(config, "augment", None)
  augment = (spec.default_augment if spec else False) if augment is None else bool(augment)
  if augment and dataset == "digits":
    raise ValueError(
      "config.augment=True is not supported for digits (8x8 images: pad-4 "
      "crops would remove half the digit); use augment=False or None"
    )
  image_size = _field(config, "image_size", None)
  image_size = 224 if not image_size else _int("config.image_size", image_size, 8)
  resize = _int("config.resize", _field(config, "resize", 0) or 0, 0)
  if resize and source != "folder":
    raise ValueError(
      f"config.resize={resize} applies to folder:PATH datasets only, not {dataset!r}"
    )
  data_dir = _field(config, "data_dir", None)
  manual_dir = _field(config, "manual_dir", None)
  return _Settings(
    dataset=dataset,
    source=source,
    target=target,
    batch_size=batch_size,
    seed=_int("config.seed", _field(config, "seed", 0)),
    data_dir=os.path.expanduser(data_dir) if data_dir else None,
    validation_size=validation_size,
    split_seed=_int("config.split_seed", _field(config, "split_seed", 0)),
    augment=augment,
    image_size=image_size,
    download=bool(_field(config, "download", False)),
    manual_dir=os.path.expanduser(manual_dir) if manual_dir else None,
    shuffle_buffer=_int("config.shuffle_buffer", _field(config, "shuffle_buffer", 10_000), 1),
    svhn_extra=svhn_extra,
    prefetch=_int("config.prefetch", _field(config, "prefetch", 2), 1),
    host_shards=bool(_field(config, "host_shards", False)),
    resize=resize,
  )


def _check_hosts(batch_size, process_index, process_count, what="batch_size"):
  process_count = _int("process_count", process_count, 1)
  process_index = _int("process_index", process_index, 0)
  if process_index >= process_count:
    raise ValueError(f"process_index={process_index} must be < process_count={process_count}")
  if batch_size % process_count:
    raise ValueError(f"{what}={batch_size} is not divisible by process_count={process_count}")
  return process_index, process_count


# ------------------------------------------------------------------------------------------------
# Sources.


def _preflight_digits(unused_s) -> str:
  from sklearn import datasets

  path = os.path.join(os.path.dirname(datasets.__file__), "data", "digits.csv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"scikit-learn's bundled digits file is missing: {path}")
  return f"digits: scikit-learn bundled data ({path})"


def _preflight_tfds(s: _Settings) -> str:
  if tfds_utils.tfds_is_mocked():
    return f"{s.dataset}: tfds.testing.mock_data (synthetic)"
  builder = prepare_lib.builder_for(s.target, s.data_dir)
  where = str(builder.data_dir)
  if builder.is_prepared():
    return f"{s.dataset}: prepared TFDS dataset in {where}"
  manual = (
    s.manual_dir or prepare_lib.default_manual_dir(s.data_dir) if s.source == "imagenet" else None
  )
  fix = (
    f"prepare it once with `{prepare_lib.command(s.target, builder.data_dir_root, manual)}`"
    " or set config.download=True"
  )
  if s.source == "imagenet":
    prepare_lib.check_manual_files(s.target, manual)
    if not s.download:
      raise FileNotFoundError(
        f"imagenet2012 is not prepared in {where} (no dataset_info.json there); the tar files "
        f"are in {manual}: {fix} (takes hours)."
      )
    return f"imagenet2012: will be prepared from {manual} into {where}"
  if not s.download:
    raise FileNotFoundError(
      f"{s.dataset} is not prepared in {where} (no dataset_info.json there) and "
      f"config.download is False: {fix}."
    )
  return f"{s.dataset}: will be downloaded into {where}"


_IN_MEMORY_LOADERS = {
  "digits": in_memory.load_digits,
  "tfds": in_memory.load_tfds,
  "npz": npz_lib.load,
  "folder": folder_lib.load,
}
_PREFLIGHTS = {"digits": _preflight_digits, "tfds": _preflight_tfds}


def _check_stats(stats):
  """(mean, std) given by a caller (a run's data.json): per-channel finite numbers, std > 0."""
  mean, std = (tuple(float(v) for v in values) for values in stats)
  if len(mean) != len(std):
    raise ValueError(
      f"standardisation stats mean={mean} std={std}: expected one value per channel in each"
    )
  if not all(map(np.isfinite, mean + std)) or min(std) <= 0:
    raise ValueError(
      f"standardisation stats mean={mean} std={std}: expected finite values and std > 0"
    )
  return mean, std


def _dataset(s: _Settings) -> Dataset:
  """The source of `s`, standardising with the dataset's published mean/std when it has them
  (else with those of its official training split)."""
  spec = _SPECS.get(s.dataset)
  mean, std = (spec.mean, spec.std) if spec else (None, None)
  if s.source == "imagenet":
    info = dataset_info("imagenet2012", image_size=s.image_size)
    return imagenet_lib.ImagenetDataset(s, info, _preflight_tfds)
  return in_memory.InMemoryDataset(
    s, _IN_MEMORY_LOADERS[s.source], preflight=_PREFLIGHTS.get(s.source), mean=mean, std=std
  )


class DataChanged(ValueError):
  """The data differ from those a run trained on (its data.json fingerprint)."""


_CONTINUE_FIX = (
  "set config.allow_data_change=True to continue on these data (with the run's mean/std)"
)


class RunData:
  """The data of one run (or one evaluation), built once from its config by `load(config)`.

  It holds the parsed config (`settings`) and the source (`dataset`, a `base.Dataset`), and
  answers everything the run asks of its data: the preflight, the facts (`info`,
  `split_sizes`, `steps_per_epoch`, `fingerprint`, `data_spec`), training batches from any
  step, exact evaluation passes and precise-BatchNorm batches. The data are read on first use
  and kept by this object: the official splits are loaded and checked once, the validation
  split is carved once, mean/std and the fingerprint are computed once, however many batches
  and passes the run asks for. There is no module-level cache: the next run (or
  `experiments.evaluate`) builds its own `RunData` and sees the data as they are then.
  """

  def __init__(self, settings: _Settings, dataset: Dataset):
    self.settings = settings
    self.dataset = dataset
    self._fingerprint = None

  def preflight(self) -> str:
    """See the module function `preflight`."""
    return self.dataset.preflight()

  @property
  def info(self) -> DatasetInfo:
    """Sizes, shape, classes and standardisation constants (see `dataset_info`)."""
    return self.dataset.info

  def split_sizes(self) -> dict:
    """{"train", "validation", "test"} example counts (train after the hold-out)."""
    return self.dataset.split_sizes()

  def steps_per_epoch(self) -> int:
    """Training steps per epoch: train_examples // batch_size (the remainder is dropped)."""
    s, n = self.settings, self.split_sizes()["train"]
    if n < s.batch_size:
      raise ValueError(
        f"batch_size={s.batch_size} exceeds the {n} training examples of {s.dataset}"
      )
    return n // s.batch_size

  def fingerprint(self) -> dict:
    """What identifies the data (experiments/data/fingerprint.py), computed once."""
    if self._fingerprint is None:
      self._fingerprint = fingerprint_lib.fingerprint(self.settings)
    return self._fingerprint

  def data_spec(self) -> dict:
    """The preprocessing of this config's training, as JSON (see `rknet_jax.preprocessing`).

    {"dataset", "image_shape", "num_classes", "class_names", "mean", "std", "resize",
    "pixel_range", "pixel_dtype", "fingerprint"}: the network input is (raw - mean) / std per
    channel, raw pixels as the dataset stores them, in [min, max] = pixel_range of training;
    `fingerprint` identifies the data (`data_fingerprint`). The runner saves it as
    workdir/data.json.
    """
    s, info = self.settings, self.info
    names = list(info.class_names) or [str(i) for i in range(info.num_classes)]
    spec = {
      "dataset": s.dataset,
      "image_shape": [int(d) for d in info.image_shape],
      "num_classes": int(info.num_classes),
      "class_names": names,
      "mean": [float(v) for v in info.mean],
      "std": [float(v) for v in info.std],
      "resize": s.resize,
      "fingerprint": self.fingerprint(),
    }
    if info.pixel_range:
      spec.update(pixel_range=[float(v) for v in info.pixel_range], pixel_dtype=info.pixel_dtype)
    return spec

  def bind_data_spec(
    self,
    previous: dict | None,
    *,
    allow_change: bool = False,
    what: str = "to resume",
    fix: str = _CONTINUE_FIX,
  ):
    """The data.json a run continues with, given the one it wrote before (None: a new run).

    A new run gets `data_spec()`. A continuing run keeps its own spec, mean/std above all
    (the network was trained on them; they are never recomputed from the current data), and its
    data must have the recorded fingerprint: `DataChanged`, naming what changed, unless
    `allow_change` (then the new fingerprint is recorded; new data with other classes or image
    shape are refused even then). A spec written before fingerprints
    or pixel ranges existed gains them, with a warning that the data could not be checked.

    Returns:
      (spec, change): the spec to use and save, and the description of an allowed data change
      (None when the data are the run's).
    """
    current = self.data_spec()
    if previous is None:
      return current, None
    new = current["fingerprint"]
    change = fingerprint_lib.describe_change(previous.get("fingerprint"), new)
    if change and not allow_change:
      raise DataChanged(
        f"{change}. Refusing {what} on other data than the run's: restore the original data, "
        f"use a new workdir, or {fix}."
      )
    for key in ("image_shape", "class_names"):
      if change and previous.get(key) != current[key]:
        raise DataChanged(
          f"{change}; the new data's {key} {current[key]} differ from the run's "
          f"{previous.get(key)}, so the run cannot continue on them (not even "
          "with config.allow_data_change=True): use a new workdir"
        )
    spec = dict(previous)
    if change or "fingerprint" not in previous:
      if "fingerprint" not in previous:
        from absl import logging

        logging.warning(
          "data.json has no data fingerprint (written by an older version): the "
          "data cannot be checked against the run's"
        )
      spec["fingerprint"] = new
    for key in ("pixel_range", "pixel_dtype"):
      if key not in spec and key in current:
        spec[key] = current[key]
    return spec, change

  def train_iterator(self, *, start_step: int, process_index: int, process_count: int, stats=None):
    """Yields this host's part of global training batches start_step, start_step + 1, ... forever.

    Each item is {"image": float32[B/P, H, W, C], "label": int32[B/P]} with B = config.batch_size
    and P = process_count; host p gets rows [p*B/P, (p+1)*B/P) of the global batch, and global
    batch s is a pure function of (config.seed, s), so a run resumed at `start_step` sees exactly
    the batches an uninterrupted run would. Batches are prepared by a background thread; call
    `.close()` on the returned iterator to stop it early (garbage collection also does).
    `stats` = (mean, std) standardises with those (a resumed run's data.json) instead of the
    dataset's own.
    """
    s = self.settings
    process_index, process_count = _check_hosts(s.batch_size, process_index, process_count)
    start_step = _int("start_step", start_step, 0)
    batches = self.dataset.train_batches(
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
      stats=None if stats is None else _check_stats(stats),
    )
    return prefetch_lib.Prefetcher(batches, size=s.prefetch)

  def eval_iterator(
    self,
    split: str,
    *,
    batch_size: int,
    process_index: int,
    process_count: int,
    with_index: bool = False,
    stats=None,
  ):
    """Yields padded, masked batches that cover `split` exactly once across all hosts.

    Items are {"image": float32[b, H, W, C], "label": int32[b], "mask": float32[b]} with
    b = batch_size // process_count; padding rows have zero image, label 0 and mask 0. Every host
    yields ceil(N / batch_size) batches. `split` is "validation" (held out of the official training
    split, or the source's own) or "test" (the official test split). with_index=True adds
    "index": int64[b], the example's position in the split (-1 for padding). `stats` = (mean,
    std) standardises with those (a run's data.json) instead of the dataset's own.
    """
    if split not in EVAL_SPLITS:
      raise ValueError(f"Unknown eval split {split!r}; expected one of {EVAL_SPLITS}")
    s = self.settings
    batch_size = _int("eval batch_size", batch_size, 1)
    process_index, process_count = _check_hosts(
      batch_size, process_index, process_count, what="eval batch_size"
    )
    stats = None if stats is None else _check_stats(stats)
    if split == "validation" and self.split_sizes()["validation"] == 0:
      raise ValueError(f"config.validation_size=0: {s.dataset} has no validation split to evaluate")
    batches = self.dataset.eval_batches(
      split,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
      with_index=with_index,
      stats=stats,
    )
    return prefetch_lib.Prefetcher(batches, size=s.prefetch)

  def splits(self) -> base.Splits:
    """See the module function `load_splits`."""
    if not isinstance(self.dataset, in_memory.InMemoryDataset):
      raise ValueError(f"{self.settings.dataset} is streamed with tf.data, not held in memory")
    return self.dataset.splits()


def load(config) -> RunData:
  """Reads `config` once (all checks before any data is touched) into the run's `RunData`.

  Nothing is read yet: the data are read on first use and kept by the returned object, so a
  run builds it once and asks it everything (`experiments.train`, `experiments.evaluate`).
  """
  s = _settings(config)
  return RunData(s, _dataset(s))


# ------------------------------------------------------------------------------------------------
# The same questions for a config: each call builds its own `RunData` (scripts and tests; a run
# builds one with `load` and asks it everything).


def preflight(config) -> str:
  """Checks the config and that the data can be loaded, before any training starts.

  Returns a one-line description of where the data comes from. Raises ValueError for bad
  config values or bad data (npz/folder: naming the file) and FileNotFoundError naming the
  missing dataset folder, file or ImageNet tar file. Under `tfds.testing.mock_data` only the
  config is checked for TFDS datasets.
  """
  return load(config).preflight()


def split_sizes(config) -> dict:
  """{"train", "validation", "test"} example counts for this config (train after hold-out)."""
  return load(config).split_sizes()


def steps_per_epoch(config) -> int:
  """Training steps per epoch: train_examples // batch_size (the remainder is dropped)."""
  return load(config).steps_per_epoch()


def data_fingerprint(config) -> dict:
  """What identifies the data this config reads (experiments/data/fingerprint.py)."""
  return fingerprint_lib.fingerprint(_settings(config))


def train_iterator(config, **kwargs):
  """``load(config).train_iterator(**kwargs)`` (see :meth:`RunData.train_iterator`), for
  scripts and tests that need no more of the data."""
  return load(config).train_iterator(**kwargs)


def eval_iterator(config, split: str, **kwargs):
  """``load(config).eval_iterator(split, **kwargs)`` (see :meth:`RunData.eval_iterator`)."""
  return load(config).eval_iterator(split, **kwargs)


def load_splits(config) -> base.Splits:
  """The in-memory splits as uint8 images, int32 labels and int64 ids.

  `ids` are positions in the official split each example comes from, so train and validation ids
  are disjoint. For inspection and tests; training uses `train_iterator`.
  """
  return load(config).splits()
