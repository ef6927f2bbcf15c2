"""A row of the paper's Tables 1-3 (``rknet_jax.paper.ROWS``), one command per row.

The argument after ``paper.py:`` is the row's key; Table 2 rows take ``:cifar100`` after it
for CIFAR-100 (default: the row's first dataset). Commands:

  python -m experiments.main --config=experiments/configs/paper.py:table1_erknet_6x1_6x1_6x1 --workdir=runs/table1_erknet_6x1_6x1_6x1
  python -m experiments.main --config=experiments/configs/paper.py:table2_irknet_5x1_5x1_5x1_ab_k150:cifar100 --workdir=runs/table2_irknet_k150_c100
  python -m experiments.main --config=experiments/configs/paper.py:table3_erknet_3x1_3x1_3x1_1x1_b --workdir=runs/table3_erknet_3x1_3x1_3x1_1x1_b --config.data_dir=/path/to/tensorflow_datasets

``python -m experiments.paper_tables --keys`` lists every key. The recipe (docs/reproducing.md,
"The training recipe"): the paper's section 4.1 (``default.py`` for CIFAR, ``imagenet.py`` for
ImageNet), the row's batch size, and where the paper is silent the authors' code
(ZhuMai/RKCNN, ``train_cifar.py``): weight decay on every parameter and dropout 0.2 after
every convolution on CIFAR (ImageNet: none, as DenseNet's ImageNet recipe that section 4.1
follows; the authors' code trains CIFAR only). BatchNorm settings are the models' defaults, and
the running averages are evaluated as in the authors' code (``precise_bn_batches=0``; a run too
short for its BN momentum warns at start).
"""

from experiments.configs import default, imagenet
from rknet_jax import paper

AUTHORS_WEIGHT_DECAY_PARAMS = "all"
"""``SGD(model.parameters(), weight_decay=1e-4)`` in the authors' train_cifar.py."""
AUTHORS_DROPOUT = {"cifar10": 0.2, "cifar100": 0.2, "imagenet2012": 0.0}
"""The authors' ``keep_prob=0.8`` on CIFAR; DenseNet's ImageNet recipe uses none."""


def get_config(row_and_dataset=None):
  """The config of a paper row: ``"<row key>"`` or ``"<row key>:<dataset>"``."""
  if not row_and_dataset:
    raise ValueError(
      "experiments/configs/paper.py needs a row: --config=experiments/configs/"
      "paper.py:<row key>, one of " + ", ".join(r.key for r in paper.ROWS)
    )
  key, _, dataset = row_and_dataset.partition(":")
  row = paper.row(key)
  dataset = dataset or row.datasets[0]
  if dataset not in row.datasets:
    raise ValueError(f"paper row {key} reports {', '.join(row.datasets)}; got {dataset!r}")
  config = imagenet.get_config() if dataset == "imagenet2012" else default.get_config()
  config.model = row.name
  config.dataset = dataset
  config.batch_size = row.batch_size
  config.weight_decay_params = AUTHORS_WEIGHT_DECAY_PARAMS
  config.model_kwargs.dropout_rate = AUTHORS_DROPOUT[dataset]
  config.precise_bn_batches = 0  # the authors evaluate the running averages
  return config
