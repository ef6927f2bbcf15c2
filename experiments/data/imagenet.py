"""ImageNet (ILSVRC2012) through tfds + tf.data, with a deterministic, resumable global order.

Paper, section 4.1: scale + aspect-ratio augmentation, standard colour (PCA lighting)
augmentation and photometric distortions for training; a single 224 centre crop for evaluation.
This follows fb.resnet.torch (which DenseNet, the paper's baseline, used):
RandomSizedCrop -> ColorJitter(brightness, contrast, saturation 0.4) -> Lighting(0.1, AlexNet
PCA) -> normalise -> horizontal flip; evaluation resizes the shorter side to 256 and centre-crops
224 (sizes scale with `image_size`).

Order. The global stream of epoch e is: the training split read with its files shuffled by
seed(e), then a seeded `shuffle(shuffle_buffer)`, then the first steps_per_epoch*B examples.
Example i of the whole run (i = step*B + position) is kept by the host that owns `position`, and
only then decoded and augmented, with stateless random ops seeded by (seed, i). So global batch s
is a pure function of (seed, s), whatever the host count. Every host reads the (encoded) records
of the whole stream but decodes only its own 1/P of them. Resuming at step s inside epoch e
replays the records of the first (s mod steps_per_epoch)*B examples of epoch e through the
shuffle buffer without decoding them: at most one epoch of reading (~140 GB of JPEG bytes), a few
minutes on local SSD, and zero cost when resuming at an epoch boundary. On many hosts, where
reading everything everywhere costs too much I/O, `host_shards=True` makes each host read only
its `tfds.even_splits` shard (global batches then depend on the host count).
"""

import dataclasses

import numpy as np

from experiments.data import base, prepare, tfds_utils

# AlexNet's PCA of ImageNet RGB pixels in [0, 1] (as in fb.resnet.torch).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
LIGHTING_STD = 0.1
JITTER = 0.4  # brightness, contrast and saturation factors drawn from U(1 - 0.4, 1 + 0.4)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_TAG_EPOCH = 0x1A9E_0001
_TAG_AUGMENT = 0x1A9E_0002


def _seed_word(*words: int) -> int:
  """A 31-bit integer seed derived from `words` (for tf.data / tf.random ops)."""
  state = np.random.SeedSequence([int(w) % (1 << 64) for w in words]).generate_state(1)[0]
  return int(state) & 0x7FFFFFFF


def splits(validation_size: int):
  """TFDS split strings (train, validation, test): validation is train's first records.

  TFDS shuffles ImageNet's examples when it prepares the dataset, so the first
  `validation_size` records are a random sample, the same for every seed.
  """
  if validation_size:
    return f"train[{validation_size}:]", f"train[:{validation_size}]", "validation"
  return "train", None, "validation"


def split_size(builder, split: str) -> int:
  """Number of examples in a (possibly sliced) TFDS split, without reading it."""
  tfds = tfds_utils.import_tfds()
  ds = tfds_utils.as_dataset(builder, split=split, decoders={"image": tfds.decode.SkipDecoding()})
  n = int(ds.cardinality())
  if n < 0:  # unknown / infinite cardinality: fall back on the metadata
    n = builder.info.splits[split].num_examples
  return n


def _standardise(tf, image, mean, std):
  mean = tf.constant(np.asarray(mean, np.float32) / 255.0)
  std = tf.constant(np.asarray(std, np.float32) / 255.0)
  return (image - mean) / std


def _grayscale(tf, image):
  return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def train_preprocess(tf, image_bytes, seed, *, image_size: int, mean, std):
  """Random resized crop, colour jitter, PCA lighting, flip, standardise; seed: int64[2]."""
  seeds = tf.random.experimental.stateless_split(seed, num=7)
  shape = tf.image.extract_jpeg_shape(image_bytes)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    seed=seeds[0],
    min_object_covered=0.0,
    aspect_ratio_range=CROP_RATIO,
    area_range=CROP_SCALE,
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  oy, ox, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(size)
  image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([oy, ox, h, w]), channels=3)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
  image = tf.clip_by_value(image / 255.0, 0.0, 1.0)

  # Photometric distortions (fb.resnet.torch ColorJitter, fixed order): blend with black,
  # with the mean grey level, and with the grey image.
  def u(s):
    return tf.random.stateless_uniform([], s, 1.0 - JITTER, 1.0 + JITTER)

  image = image * u(seeds[1])
  a = u(seeds[2])
  image = image * a + tf.reduce_mean(_grayscale(tf, image)) * (1.0 - a)
  a = u(seeds[3])
  image = image * a + _grayscale(tf, image) * (1.0 - a)
  image = tf.clip_by_value(image, 0.0, 1.0)
  # AlexNet PCA lighting noise.
  alpha = tf.random.stateless_normal([3], seeds[4], stddev=LIGHTING_STD)
  rgb = tf.linalg.matvec(tf.constant(PCA_EIGVEC), alpha * tf.constant(PCA_EIGVAL))
  image = image + rgb
  flip = tf.random.stateless_uniform([], seeds[5]) < 0.5
  image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
  image = _standardise(tf, image, mean, std)
  image.set_shape([image_size, image_size, 3])
  return image


def eval_preprocess(tf, image_bytes, *, image_size: int, mean, std):
  """Resize the shorter side to image_size*256/224, take the centre image_size crop."""
  image = tf.io.decode_jpeg(image_bytes, channels=3)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  resize_to = float(round(image_size * 256 / 224))
  scale = resize_to / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  oy = (new[0] - image_size) // 2
  ox = (new[1] - image_size) // 2
  image = image[oy : oy + image_size, ox : ox + image_size, :]
  image = tf.clip_by_value(image / 255.0, 0.0, 1.0)
  image = _standardise(tf, image, mean, std)
  image.set_shape([image_size, image_size, 3])
  return image


def _read(builder, split, *, shuffle_seed=None):
  tfds = tfds_utils.import_tfds()
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
  return tfds_utils.as_dataset(
    builder,
    split=split,
    shuffle_files=shuffle_seed is not None,
    decoders={"image": tfds.decode.SkipDecoding()},
    read_config=read_config,
  )


def _host_filter(tf, batch_size, start, local):
  def keep(i, unused_example):
    pos = i % batch_size
    return tf.logical_and(pos >= start, pos < start + local)

  return keep


@dataclasses.dataclass(frozen=True)
class TrainStream:
  """What one host's stream of training batches is made of (see :func:`train_batches`)."""

  split: str
  num_examples: int
  batch_size: int
  seed: int
  start_step: int
  process_index: int
  process_count: int
  augment: bool
  image_size: int
  shuffle_buffer: int
  mean: tuple
  std: tuple


def train_batches(builder, stream: TrainStream, *, host_shards: bool = False):
  """Yields this host's slice of global batch s, s = stream.start_step, ... forever (see
  module doc).

  host_shards=True (for many hosts): host p reads only `tfds.even_splits(split, P)[p]`, shuffled
  with seed (seed, epoch, p), and its b = B/P rows of batch s are its records
  [(s - e*S)*b, (s - e*S + 1)*b) of epoch e. I/O per host drops P-fold; steps per epoch stay
  N // B; each batch is still a pure function of (seed, s) for a fixed P, but the global batches
  depend on P (so a run must be resumed with the same host count).
  """
  if stream.num_examples // stream.batch_size == 0:
    raise ValueError(
      f"batch_size={stream.batch_size} exceeds the {stream.num_examples} training examples"
    )
  if host_shards and stream.process_count > 1:
    return _sharded_train_batches(builder, stream)
  return _global_train_batches(builder, stream)


def _train_map_fn(tf, t: TrainStream):
  """(global example number i, record) -> {"image", "label"}; augmentation seeded by (seed, i)."""
  aug_seed = _seed_word(t.seed, _TAG_AUGMENT)

  def preprocess(i, example):
    if t.augment:
      seed = tf.stack([tf.constant(aug_seed, tf.int64), i])
      image = train_preprocess(
        tf, example["image"], seed, image_size=t.image_size, mean=t.mean, std=t.std
      )
    else:
      image = eval_preprocess(tf, example["image"], image_size=t.image_size, mean=t.mean, std=t.std)
    return {"image": image, "label": tf.cast(example["label"], tf.int32)}

  return preprocess


def _global_train_batches(builder, t: TrainStream):
  tf = tfds_utils.import_tf()
  steps = t.num_examples // t.batch_size
  local = t.batch_size // t.process_count
  start = t.process_index * local
  per_epoch = steps * t.batch_size
  epoch, k = divmod(t.start_step, steps)
  preprocess = _train_map_fn(tf, t)
  while True:
    epoch_seed = _seed_word(t.seed, _TAG_EPOCH, epoch)
    ds = _read(builder, t.split, shuffle_seed=epoch_seed)
    ds = ds.shuffle(t.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.take(per_epoch).enumerate(start=epoch * per_epoch)  # i = step * B + position
    if k:
      ds = ds.skip(k * t.batch_size)
    ds = ds.filter(_host_filter(tf, t.batch_size, start, local))
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from ds.as_numpy_iterator()
    epoch, k = epoch + 1, 0


def _sharded_train_batches(builder, t: TrainStream):
  tf = tfds_utils.import_tf()
  tfds = tfds_utils.import_tfds()
  steps = t.num_examples // t.batch_size
  local = t.batch_size // t.process_count
  shard = tfds.even_splits(t.split, n=t.process_count)[t.process_index]
  per_epoch = steps * local  # <= the shard's floor(N/P) examples
  epoch, k = divmod(t.start_step, steps)
  preprocess = _train_map_fn(tf, t)

  def number(j, example):  # host record j -> global example number step * B + row
    step, row = j // local, j % local
    return step * t.batch_size + t.process_index * local + row, example

  while True:
    epoch_seed = _seed_word(t.seed, _TAG_EPOCH, epoch, t.process_index)
    ds = _read(builder, shard, shuffle_seed=epoch_seed)
    ds = ds.shuffle(t.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.take(per_epoch).enumerate(start=epoch * per_epoch)
    if k:
      ds = ds.skip(k * local)
    ds = ds.map(number).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from ds.as_numpy_iterator()
    epoch, k = epoch + 1, 0


def eval_batches(
  builder,
  *,
  split: str,
  num_examples: int,
  batch_size: int,
  process_index: int,
  process_count: int,
  image_size: int,
  mean,
  std,
  with_index: bool,
):
  """Yields padded, masked batches covering `split` exactly once across all hosts."""
  tf = tfds_utils.import_tf()
  local = batch_size // process_count
  start = process_index * local
  num_batches = -(-num_examples // batch_size)
  full, rest = divmod(num_examples, batch_size)
  mine = full * local + min(max(rest - start, 0), local)
  pad = num_batches * local - mine

  def preprocess(i, example):
    out = {
      "image": eval_preprocess(tf, example["image"], image_size=image_size, mean=mean, std=std),
      "label": tf.cast(example["label"], tf.int32),
      "mask": tf.constant(1.0, tf.float32),
    }
    if with_index:
      out["index"] = i
    return out

  ds = _read(builder, split).take(num_examples).enumerate()
  ds = ds.filter(_host_filter(tf, batch_size, start, local))
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = {
    "image": tf.zeros([image_size, image_size, 3], tf.float32),
    "label": tf.constant(0, tf.int32),
    "mask": tf.constant(0.0, tf.float32),
  }
  if with_index:
    padding["index"] = tf.constant(-1, tf.int64)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(pad))
  ds = ds.batch(local).prefetch(tf.data.AUTOTUNE)
  yield from ds.as_numpy_iterator()


class ImagenetDataset(base.Dataset):
  """ILSVRC2012 streamed from its prepared TFDS records (module docstring for the order).

  Args:
    settings: the parsed config (`experiments.input_pipeline`).
    info: the static `DatasetInfo` (sizes with the default hold-out, mean/std).
    preflight: settings -> str, the availability check.

  The TFDS builder (preparing the dataset when `config.download` asks) and the split sizes are
  made on first use and kept by this object.
  """

  def __init__(self, settings, info: base.DatasetInfo, preflight):
    self._s = settings
    self._info = info
    self._preflight = preflight
    self._builder_made = None
    self._sizes = {}

  def _builder(self):
    if self._builder_made is None:
      s = self._s
      self._builder_made = prepare.get_builder(
        s.target,
        s.data_dir,
        download=s.download,
        manual_dir=s.manual_dir or prepare.default_manual_dir(s.data_dir),
      )
    return self._builder_made

  def _split_size(self, split: str) -> int:
    if split not in self._sizes:
      self._sizes[split] = split_size(self._builder(), split)
    return self._sizes[split]

  @property
  def info(self) -> base.DatasetInfo:
    return self._info

  def preflight(self) -> str:
    return self._preflight(self._s)

  def split_sizes(self) -> dict:
    train, validation, test = splits(self._s.validation_size)
    return {
      "train": self._split_size(train),
      "validation": self._split_size(validation) if validation else 0,
      "test": self._split_size(test),
    }

  def train_batches(self, *, start_step, process_index, process_count, stats=None):
    s = self._s
    split = splits(s.validation_size)[0]
    mean, std = stats or (self._info.mean, self._info.std)
    stream = TrainStream(
      split=split,
      num_examples=self._split_size(split),
      batch_size=s.batch_size,
      seed=s.seed,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
      augment=s.augment,
      image_size=s.image_size,
      shuffle_buffer=s.shuffle_buffer,
      mean=tuple(mean),
      std=tuple(std),
    )
    return train_batches(self._builder(), stream, host_shards=s.host_shards)

  def eval_batches(
    self, split, *, batch_size, process_index, process_count, with_index, stats=None
  ):
    s = self._s
    name = dict(zip(("validation", "test"), splits(s.validation_size)[1:]))[split]
    mean, std = stats or (self._info.mean, self._info.std)
    return eval_batches(
      self._builder(),
      split=name,
      num_examples=self._split_size(name),
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
      image_size=s.image_size,
      mean=mean,
      std=std,
      with_index=with_index,
    )
