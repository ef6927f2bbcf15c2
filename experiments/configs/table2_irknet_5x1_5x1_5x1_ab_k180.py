"""Table 2, CIFAR-10/100: IRKNet-5x1 5x1 5x1-AB (k = 180), batch 32, no augmentation, 300 epochs.

Paper: 10.98 GFLOPs, 6.99 M params (10 classes), test error 4.56% (C10), 21.09% (C100).
Commands (the part after ':' picks the dataset, default cifar10):

  python -m experiments.main --config=experiments/configs/table2_irknet_5x1_5x1_5x1_ab_k180.py --workdir=runs/table2_irknet_5x1_5x1_5x1_ab_k180_c10
  python -m experiments.main --config=experiments/configs/table2_irknet_5x1_5x1_5x1_ab_k180.py:cifar100 --workdir=runs/table2_irknet_5x1_5x1_5x1_ab_k180_c100
"""

from experiments.configs import default


def get_config(dataset="cifar10"):
  """IRKNet-5x1 5x1 5x1-AB (k = 180) on ``dataset`` ("cifar10" or "cifar100"), section 4.1 recipe, batch 32."""
  if dataset not in ("cifar10", "cifar100"):
    raise ValueError(f"Table 2 is CIFAR-10 or CIFAR-100; got {dataset!r}")
  config = default.get_config()
  config.model = "IRKNet-5x1 5x1 5x1-AB-k180"
  config.growth_rate = 180
  config.dataset = dataset
  config.batch_size = 32
  return config
