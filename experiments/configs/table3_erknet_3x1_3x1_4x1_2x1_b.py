"""Table 3, ImageNet: ERKNet-3x1 3x1 4x1 2x1-B (k = 32, m = 2, 4, 8, 20, bottleneck width 4k).

Paper: 6.35 GFLOPs, 14.49 M params, single 224 centre crop: 24.12% top-1, 7.17% top-5 error. The ImageNet recipe
(batch 256, 90 epochs, lr /10 every 30 epochs, augmentation) comes from imagenet.py. Command:

  python -m experiments.main --config=experiments/configs/table3_erknet_3x1_3x1_4x1_2x1_b.py --workdir=runs/table3_erknet_3x1_3x1_4x1_2x1_b \
      --config.data_dir=/path/to/tensorflow_datasets
"""

from experiments.configs import imagenet


def get_config():
  """ERKNet-3x1 3x1 4x1 2x1-B on ImageNet (section 4.1 ImageNet recipe)."""
  config = imagenet.get_config()
  config.model = "ERKNet-3x1 3x1 4x1 2x1-B"
  config.model_kwargs.growth_multipliers = (2, 4, 8, 20)
  return config
