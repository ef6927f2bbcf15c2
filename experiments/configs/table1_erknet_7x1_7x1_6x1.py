"""Table 1, CIFAR-10: ERKNet-7x1 7x1 6x1 (k = 36), batch 64, no augmentation, 300 epochs.

Paper: 0.87 GFLOPs, 0.91 M params, 6.67% test error. Command:

  python -m experiments.main --config=experiments/configs/table1_erknet_7x1_7x1_6x1.py --workdir=runs/table1_erknet_7x1_7x1_6x1
"""

from experiments.configs import default


def get_config():
  """ERKNet-7x1 7x1 6x1, k = 36, CIFAR-10 (section 4.1 recipe: lr 0.1, /10 at epochs 150 and 225)."""
  config = default.get_config()
  config.model = "ERKNet-7x1 7x1 6x1"
  config.growth_rate = 36
  config.dataset = "cifar10"
  config.batch_size = 64
  return config
