"""Table 2, CIFAR-10/100: CliqueNet-ABC (T = 30, k = 150), batch 32, no augmentation, 300 epochs.

Paper: 10.56 GFLOPs, 10.48 M params (10 classes), test error 5.06% (C10), 21.83% (C100).
Commands (the part after ':' picks the dataset, default cifar10):

  python -m experiments.main --config=experiments/configs/table2_cliquenet_abc_t30_k150.py --workdir=runs/table2_cliquenet_abc_t30_k150_c10
  python -m experiments.main --config=experiments/configs/table2_cliquenet_abc_t30_k150.py:cifar100 --workdir=runs/table2_cliquenet_abc_t30_k150_c100
"""

from experiments.configs import default


def get_config(dataset="cifar10"):
  """CliqueNet-ABC (T = 30, k = 150) on ``dataset`` ("cifar10" or "cifar100"), section 4.1 recipe, batch 32."""
  if dataset not in ("cifar10", "cifar100"):
    raise ValueError(f"Table 2 is CIFAR-10 or CIFAR-100; got {dataset!r}")
  config = default.get_config()
  config.model = "CliqueNet-ABC-T30-k150"
  config.growth_rate = 150
  config.dataset = dataset
  config.batch_size = 32
  return config
