"""Quickstart: a small ERKNet on scikit-learn's bundled 8x8 digits (offline, real data).

Trains in well under a minute on 2 CPU cores and reaches >= 95% test accuracy (the README's
quickstart). Command:

  python -m experiments.main --config=experiments/configs/digits.py --workdir=/tmp/rknet_digits

Data: 1,293 train / 144 validation (held out of train, for the "best" checkpoint) / 360
test images, a fixed seeded split (experiments/input_pipeline.py).
"""

from experiments.configs import default


def get_config():
  """ERKNet-3x1 3x1 (two periods, k = 16) on digits with the paper's SGD recipe."""
  config = default.get_config()
  config.model = "ERKNet-3x1 3x1"
  config.growth_rate = 16
  config.dataset = "digits"
  config.download = False
  config.validation_size = 144
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 15
  config.learning_rate = 0.1
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  return config
