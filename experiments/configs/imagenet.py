"""The paper's ImageNet recipe (section 4.1, Table 3) on top of the defaults.

Batch 256, 90 epochs, lr 0.1 divided by 10 every 30 epochs; random resized crop, PCA lighting,
photometric distortions and flips for training, single 224 centre crop for evaluation
(experiments/input_pipeline.py). ImageNet must be downloaded by hand first (docs/data.md, "Data
preparation"; the runner's preflight names what is missing). The model is Table 3's first
row, whose ready-made name brings k, m, the bottleneck width, the stem and the classifier;
``paper.py:table3_...`` adds the authors' weight decay to each Table 3 row. Command:

  python -m experiments.main --config=experiments/configs/imagenet.py --workdir=runs/imagenet \
      --config.data_dir=/path/to/tensorflow_datasets
"""

from experiments.configs import default


def get_config():
  """ERKNet-3x1 3x1 3x1 1x1-B (Table 3 row 1) with the ImageNet recipe."""
  config = default.get_config()
  config.model = "ERKNet-3x1 3x1 3x1 1x1-B"
  config.dataset = "imagenet2012"
  config.download = False  # ImageNet is prepared from the manual download
  config.augment = True
  config.batch_size = 256
  config.eval_batch_size = 512
  config.num_epochs = 90
  config.lr_decay_every_epochs = 30
  config.log_every_steps = 200
  config.checkpoint_every_steps = 2000
  return config
