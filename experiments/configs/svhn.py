"""SVHN (the paper's later version adds it): ERKNet-6x1 6x1 6x1, k = 36, on svhn_cropped.

The paper gives no SVHN recipe; this is Table 1's first row with its CIFAR recipe
(``paper.py``: SGD, Nesterov 0.9, weight decay 1e-4 on every parameter, dropout 0.2,
lr 0.1 /10 at 50% and 75%) with the usual SVHN budget of 40 epochs on the 73,257-image train
split (``--config.svhn_extra=True`` adds the 531,131 extra images). Command:

  python -m experiments.main --config=experiments/configs/svhn.py --workdir=runs/svhn
"""

from experiments.configs import paper


def get_config():
  """ERKNet-6x1 6x1 6x1 (k = 36) on SVHN, 40 epochs, batch 64, no augmentation."""
  config = paper.get_config("table1_erknet_6x1_6x1_6x1")
  config.dataset = "svhn_cropped"
  config.num_epochs = 40
  return config
