"""Table 1, CIFAR-10: IRKNet-4x1 4x1 4x1 (k = 36), batch 64, no augmentation, 300 epochs.

Paper: 0.69 GFLOPs, 0.57 M params, 6.50% test error. Command:

  python -m experiments.main --config=experiments/configs/table1_irknet_4x1_4x1_4x1.py --workdir=runs/table1_irknet_4x1_4x1_4x1
"""

from experiments.configs import default


def get_config():
  """IRKNet-4x1 4x1 4x1, k = 36, CIFAR-10 (section 4.1 recipe: lr 0.1, /10 at epochs 150 and 225)."""
  config = default.get_config()
  config.model = "IRKNet-4x1 4x1 4x1"
  config.growth_rate = 36
  config.dataset = "cifar10"
  config.batch_size = 64
  return config
