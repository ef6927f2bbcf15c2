"""TensorFlow / TFDS plumbing shared by the input pipelines.

TensorFlow is only used for tf.data and image decoding. It is imported lazily, and the first
import hides every GPU/TPU from it, so that it never allocates accelerator memory that JAX needs.
"""

import os
import threading

_TF_LOCK = threading.Lock()
_TF_READY = False
# `builder.as_dataset` is serialised: under `tfds.testing.mock_data` every call enters and
# leaves a `MockFs` that patches the file-system functions process-wide. Two threads (say the
# train prefetcher and the evaluator) interleaving those patches would restore them out of
# order and leave a dead mock installed for the rest of the process.
_AS_DATASET_LOCK = threading.RLock()


def import_tf():
  """Imports TensorFlow, hiding accelerators from it before any op runs; returns the module."""
  global _TF_READY
  with _TF_LOCK:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if not _TF_READY:
      for kind in ("GPU", "TPU"):
        try:
          tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):
          # RuntimeError: TF was initialised before us (then it must already see no devices of
          # this kind, checked below); ValueError: no such device type in this build.
          pass
      visible = [d for d in tf.config.get_visible_devices() if d.device_type != "CPU"]
      if visible:
        raise RuntimeError(
          f"TensorFlow was initialised before the input pipeline and can see {visible}; "
          "it would compete with JAX for accelerator memory. Import experiments.input_pipeline "
          "(or call tf.config.set_visible_devices([], 'GPU')) before any TensorFlow use."
        )
      _TF_READY = True
    return tf


def import_tfds():
  """Imports tensorflow_datasets after TensorFlow has been kept off the accelerators."""
  import_tf()
  import tensorflow_datasets as tfds

  return tfds


def tfds_is_mocked() -> bool:
  """True inside `tfds.testing.mock_data` (synthetic data: nothing on disk to check or cache)."""
  tfds = import_tfds()
  as_dataset = tfds.core.dataset_builder.DatasetBuilder.as_dataset
  return getattr(as_dataset, "__module__", "").startswith("tensorflow_datasets.testing")


def default_data_dir() -> str:
  """TFDS's default data directory (`$TFDS_DATA_DIR`, else ~/tensorflow_datasets)."""
  return import_tfds().core.constants.DATA_DIR


def as_dataset(builder, **kwargs):
  """`builder.as_dataset(**kwargs)`, one call at a time in this process (see `_AS_DATASET_LOCK`).

  Under `tfds.testing.mock_data`, the public `as_dataset` wraps the mocked reader in a `MockFs`,
  which redirects *every* thread's file-system calls (etils.epath, tf.io.gfile) into a temporary
  folder while it is entered. Orbax's checkpoint threads writing at the same moment would then
  write into, or fail to find, the wrong folder. The mocked reader (`_as_dataset`) needs no file
  system, so it is called directly there.
  """
  with _AS_DATASET_LOCK:
    if tfds_is_mocked():
      return builder._as_dataset(
        split=kwargs["split"],
        decoders=kwargs.get("decoders"),
        read_config=kwargs.get("read_config"),
        shuffle_files=kwargs.get("shuffle_files", False),
      )
    return builder.as_dataset(**kwargs)
