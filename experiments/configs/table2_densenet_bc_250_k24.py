"""Table 2, CIFAR-10/100: DenseNet-BC (depth 250, k = 24), batch 32, no augmentation, 300 epochs.

Paper: 10.83 GFLOPs, 15.3 M params (10 classes), test error 5.19% (C10), 19.64% (C100).
Commands (the part after ':' picks the dataset, default cifar10):

  python -m experiments.main --config=experiments/configs/table2_densenet_bc_250_k24.py --workdir=runs/table2_densenet_bc_250_k24_c10
  python -m experiments.main --config=experiments/configs/table2_densenet_bc_250_k24.py:cifar100 --workdir=runs/table2_densenet_bc_250_k24_c100
"""

from experiments.configs import default


def get_config(dataset="cifar10"):
  """DenseNet-BC (depth 250, k = 24) on ``dataset`` ("cifar10" or "cifar100"), section 4.1 recipe, batch 32."""
  if dataset not in ("cifar10", "cifar100"):
    raise ValueError(f"Table 2 is CIFAR-10 or CIFAR-100; got {dataset!r}")
  config = default.get_config()
  config.model = "DenseNet-BC-250-k24"
  config.growth_rate = 24
  config.dataset = dataset
  config.batch_size = 32
  return config
