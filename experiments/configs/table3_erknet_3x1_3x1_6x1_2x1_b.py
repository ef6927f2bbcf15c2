"""Table 3, ImageNet: ERKNet-3x1 3x1 6x1 2x1-B (k = 32, m = 2, 4, 8, 28, bottleneck width 4k).

Paper: 8.50 GFLOPs, 25.51 M params, single 224 centre crop: 23.14% top-1, 6.66% top-5 error.
Batch 256, 90 epochs, lr 0.1 divided by 10 every 30 epochs; random resized crop, PCA
lighting, photometric distortions, flip (experiments/input_pipeline.py). ImageNet must be
downloaded by hand first (see the input pipeline's docstring; preflight names what is
missing). Command:

  python -m experiments.main --config=experiments/configs/table3_erknet_3x1_3x1_6x1_2x1_b.py --workdir=runs/table3_erknet_3x1_3x1_6x1_2x1_b \
      --config.data_dir=/path/to/tensorflow_datasets
"""

from experiments.configs import default


def get_config():
  """ERKNet-3x1 3x1 6x1 2x1-B on ImageNet (section 4.1 ImageNet recipe)."""
  config = default.get_config()
  config.model = "ERKNet-3x1 3x1 6x1 2x1-B"
  config.growth_rate = 32
  config.stem = "imagenet"
  config.model_kwargs.growth_multipliers = (2, 4, 8, 28)
  config.model_kwargs.bottleneck_width = 128
  config.model_kwargs.multiscale = False
  config.dataset = "imagenet2012"
  config.download = False  # ImageNet is prepared from the manual download
  config.augment = True
  config.image_size = 224
  config.batch_size = 256
  config.eval_batch_size = 512
  config.num_epochs = 90
  config.lr_decay_every_epochs = 30
  config.log_every_steps = 200
  config.checkpoint_every_steps = 2000
  return config
