r"""Downloads and prepares datasets into a data_dir, once, before training (several hosts: once).

  python -m experiments.prepare_data --dataset=cifar10 --data_dir=DIR
  python -m experiments.prepare_data --dataset=cifar10,cifar100,svhn_cropped --data_dir=DIR
  python -m experiments.prepare_data --dataset=imagenet2012 --data_dir=DIR --manual_dir=TARS

`--dataset` takes the runner's dataset names (cifar10, cifar100, svhn_cropped, imagenet2012) and
any TFDS image-classification name, plain or as `tfds:NAME`. `digits` needs no preparation.
Then train with `--config.data_dir=DIR --config.download=False`. On a machine without internet
access this fails within `--probe_timeout` seconds naming the server it could not reach; prepare
on a connected machine and copy `DIR/<name>/` over. A refusal is one `error: ...` line and exit
status 1 (`--verbose`: with the traceback).
"""

from absl import flags

from experiments import cli
from experiments.data import prepare as prepare_lib

_DATASET = flags.DEFINE_list("dataset", None, "dataset name(s), comma-separated", required=True)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"
)
_MANUAL_DIR = flags.DEFINE_string(
  "manual_dir",
  None,
  "folder with hand-downloaded files (ImageNet's tar files); default DATA_DIR/downloads/manual",
)
_PROBE_TIMEOUT = flags.DEFINE_float(
  "probe_timeout", prepare_lib.PROBE_TIMEOUT_S, "seconds to wait for a download server to answer"
)
NO_PREPARATION = ("digits", "npz:", "folder:")


def tfds_name(name: str) -> str:
  """The TFDS name behind a `--config.dataset` value (`tfds:NAME` -> NAME)."""
  return name[len("tfds:") :] if name.startswith("tfds:") else name


def main(argv):
  del argv
  from experiments import metrics

  metrics.console_logging()
  for name in _DATASET.value:
    if name.startswith(NO_PREPARATION):
      print(f"{name}: nothing to prepare (read directly from scikit-learn or the given path)")
      continue
    builder = prepare_lib.prepare(
      tfds_name(name),
      _DATA_DIR.value,
      manual_dir=_MANUAL_DIR.value,
      probe_timeout=_PROBE_TIMEOUT.value,
    )
    sizes = ", ".join(f"{k}: {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
    print(f"{name}: prepared in {builder.data_dir} ({sizes})")


if __name__ == "__main__":
  cli.run(main, config_flag=None)
