"""Table 1, CIFAR-10: IRKNet-3x1 3x1 3x1 (k = 36), batch 64, no augmentation, 300 epochs.

Paper: 0.38 GFLOPs, 0.32 M params, 7.18% test error. Command:

  python -m experiments.main --config=experiments/configs/table1_irknet_3x1_3x1_3x1.py --workdir=runs/table1_irknet_3x1_3x1_3x1
"""

from experiments.configs import default


def get_config():
  """IRKNet-3x1 3x1 3x1, k = 36, CIFAR-10 (section 4.1 recipe: lr 0.1, /10 at epochs 150 and 225)."""
  config = default.get_config()
  config.model = "IRKNet-3x1 3x1 3x1"
  config.growth_rate = 36
  config.dataset = "cifar10"
  config.batch_size = 64
  return config
