"""Table 2, CIFAR-10/100: CliqueNet (T = 18, k = 80), batch 32, no augmentation, 300 epochs.

Paper: 9.45 GFLOPs, 10.14 M params (10 classes), test error 5.06% (C10), 23.14% (C100).
Commands (the part after ':' picks the dataset, default cifar10):

  python -m experiments.main --config=experiments/configs/table2_cliquenet_t18_k80.py --workdir=runs/table2_cliquenet_t18_k80_c10
  python -m experiments.main --config=experiments/configs/table2_cliquenet_t18_k80.py:cifar100 --workdir=runs/table2_cliquenet_t18_k80_c100
"""

from experiments.configs import default


def get_config(dataset="cifar10"):
  """CliqueNet (T = 18, k = 80) on ``dataset`` ("cifar10" or "cifar100"), section 4.1 recipe, batch 32."""
  if dataset not in ("cifar10", "cifar100"):
    raise ValueError(f"Table 2 is CIFAR-10 or CIFAR-100; got {dataset!r}")
  config = default.get_config()
  config.model = "CliqueNet-T18-k80"
  config.growth_rate = 80
  config.dataset = dataset
  config.batch_size = 32
  return config
