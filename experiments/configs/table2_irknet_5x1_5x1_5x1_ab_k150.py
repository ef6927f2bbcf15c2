"""Table 2, CIFAR-10/100: IRKNet-5x1 5x1 5x1-AB (k = 150), batch 32, no augmentation, 300 epochs.

Paper: 7.62 GFLOPs, 4.87 M params (10 classes), test error 4.60% (C10), 21.63% (C100).
Commands (the part after ':' picks the dataset, default cifar10):

  python -m experiments.main --config=experiments/configs/table2_irknet_5x1_5x1_5x1_ab_k150.py --workdir=runs/table2_irknet_5x1_5x1_5x1_ab_k150_c10
  python -m experiments.main --config=experiments/configs/table2_irknet_5x1_5x1_5x1_ab_k150.py:cifar100 --workdir=runs/table2_irknet_5x1_5x1_5x1_ab_k150_c100
"""

from experiments.configs import default


def get_config(dataset="cifar10"):
  """IRKNet-5x1 5x1 5x1-AB (k = 150) on ``dataset`` ("cifar10" or "cifar100"), section 4.1 recipe, batch 32."""
  if dataset not in ("cifar10", "cifar100"):
    raise ValueError(f"Table 2 is CIFAR-10 or CIFAR-100; got {dataset!r}")
  config = default.get_config()
  config.model = "IRKNet-5x1 5x1 5x1-AB-k150"
  config.growth_rate = 150
  config.dataset = dataset
  config.batch_size = 32
  return config
