"""Default hyper-parameters: the paper's CIFAR recipe (section 4.1) for ERKNet-6x1 6x1 6x1.

Every other config in this folder imports this one and overrides a few fields, so the
full list of fields, with what each means, lives here.  The paper's rows, with the authors'
code's settings where the paper is silent, are ``paper.py``'s.  Train with

  python -m experiments.main --config=experiments/configs/default.py --workdir=/tmp/rknet_default

and override any field on the command line, e.g. ``--config.num_epochs=1 --config.seed=7``.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  """Returns the default configuration (Table 1 row 1: ERKNet-6x1 6x1 6x1, k=36, CIFAR-10)."""
  config = ml_collections.ConfigDict()
  _model_fields(config)
  _data_fields(config)
  _optimisation_fields(config)
  _evaluation_fields(config)
  return config


def _model_fields(config):
  """The model: its name and the options of ``rknet_jax.create_model``."""
  # ---- model: rknet_jax.create_model(model, growth_rate=..., stem=..., dtype=..., remat=...,
  # **model_kwargs). A ready-made name (rknet_jax.list_models(): the paper's rows) brings its
  # row's k, m, bottleneck widths, stem and multiscale; unset (None) fields keep the name's
  # values, or the model's defaults (rknet_jax.models names the source of each).
  config.model = "ERKNet-6x1 6x1 6x1"
  config.growth_rate = config_dict.placeholder(int)  # k; None = the name's (k = 36 here)
  # "cifar": 3x3 conv preprocessor (also SVHN, digits); "imagenet": 7x7/2 conv + BN + max-pool.
  config.stem = config_dict.placeholder(str)  # None = the name's ("cifar" but for Table 3)
  # E.g. --config.model_kwargs.dropout_rate=0.2 or --config.model_kwargs.num_updates=2.
  config.model_kwargs = ml_collections.ConfigDict(
    {
      "growth_multipliers": config_dict.placeholder(tuple),  # m per period (Table 3)
      "bottleneck_width": config_dict.placeholder(int),  # "B" names; default 4k / k
      "attention": config_dict.placeholder(bool),  # default: the name has "A"
      "multiscale": config_dict.placeholder(bool),  # default: True (CIFAR)
      "num_updates": config_dict.placeholder(int),  # IRK alternate updates (paper: 1)
      "update_order": config_dict.placeholder(str),  # IRK: "gauss_seidel" (paper) or "jacobi"
      "share_weights": config_dict.placeholder(bool),  # IRK weight sharing (paper: True)
      "dropout_rate": config_dict.placeholder(float),  # after every conv; model default 0
      "bn_momentum": config_dict.placeholder(float),  # flax convention; model default
      "bn_epsilon": config_dict.placeholder(float),  # model default
    }
  )
  config.dtype = "float32"  # compute dtype: float32, bfloat16 or float16 (logits stay float32)
  config.remat = False  # recompute the memory-heavy segments in the backward pass (docs/models.md)


def _data_fields(config):
  """The data: dataset, splits, input pipeline, batch sizes and seed."""
  # ---- data (read by experiments/input_pipeline.py; see its docstring)
  # cifar10 | cifar100 | svhn_cropped | imagenet2012 | digits | mnist | fashion_mnist | kmnist
  # | tfds:NAME | npz:FILE | folder:PATH  (experiments/input_pipeline.py)
  config.dataset = "cifar10"
  config.data_dir = ""  # tfds data_dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.manual_dir = ""  # ImageNet tar files; "" = <data_dir>/downloads/manual
  config.download = True  # let tfds download and prepare CIFAR/SVHN when missing
  # Examples held out of the official training split for model selection ("best"
  # checkpoint). 0 = train on the whole training split as the paper does: no selection,
  # the reported test error is of the final model.
  config.validation_size = 0
  config.split_seed = 0  # seed of the validation hold-out
  config.augment = False  # the paper uses no augmentation on CIFAR; True = pad-4 crop + flip
  config.image_size = 224  # ImageNet crop size (the other datasets keep their native size)
  config.shuffle_buffer = 10_000  # ImageNet shuffle buffer (examples)
  config.svhn_extra = False  # SVHN: train on train + extra
  config.prefetch = 2  # host batches prepared ahead by a background thread
  config.resize = 0  # folder:PATH only: 0 = all images one size; N = resize others to N x N
  # Resuming on data whose fingerprint differs from the run's (data.json) is refused unless
  # True: then training continues on the new data with the run's mean/std (run.json says so).
  config.allow_data_change = False
  config.batch_size = 64  # GLOBAL batch, split over all devices of all hosts
  config.eval_batch_size = 256  # global; the last batch is padded and masked
  config.seed = 0  # seeds parameter init, dropout and the order of the training data


def _optimisation_fields(config):
  """The optimiser and its learning-rate schedule (section 4.1)."""
  # ---- optimisation (section 4.1): SGD, Nesterov momentum 0.9, weight decay 1e-4
  config.num_epochs = 300.0  # a float, so the command line takes fractions (=0.5)
  config.num_train_steps = -1  # > 0 overrides num_epochs * steps_per_epoch (for tests)
  config.learning_rate = 0.1
  # "step": lr x lr_decay_factor at each of lr_decay_fractions of training (CIFAR: 50%, 75%),
  #         or every lr_decay_every_epochs epochs when that is > 0 (ImageNet: 30);
  # "cosine": cosine decay to 0; "constant".
  config.lr_schedule = "step"
  config.lr_decay_fractions = (0.5, 0.75)
  config.lr_decay_every_epochs = 0
  config.lr_decay_factor = 0.1
  config.warmup_epochs = 0.0  # linear warm-up from 0 over this many epochs (any schedule)
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  # Which parameters weight decay applies to: "kernels" = every conv and dense weight of
  # every family, clique filters and tableau vector fields included (by role, see
  # rknet_jax/optim.py; not BN scale/bias, biases or learned Butcher coefficients; the paper
  # does not say, this is the usual JAX practice); "all" = every trainable parameter, as
  # PyTorch's SGD(weight_decay=...) in the authors' code does (the paper configs, paper.py).
  config.weight_decay_params = "kernels"


def _evaluation_fields(config):
  """Evaluation, logging and checkpoints."""
  # ---- evaluation, logging, checkpoints
  # Precise BatchNorm (Wu & Johnson 2021): before each validation and the test, and in the
  # final checkpoint, the BN statistics are re-estimated for the current weights as the exact
  # mean over this many training batches (at most one epoch) of their batch statistics
  # (train-mode forward, no update, no dropout). 0 = evaluate the running averages, which
  # lag the weights in short runs (momentum 0.99 weighs the initial values > 1% for 459
  # steps). results.json reports the test error with both.
  config.precise_bn_batches = 50
  config.eval_every_epochs = 1  # validation (if validation_size > 0) every N epochs
  config.log_every_steps = 100
  # Models with implicit stages (IRKNet, CliqueNet, implicit tableaus) log the largest final
  # residual of their stage solves (implicit_residual_max); above this, a tableau RKNet warns
  # once per run (clique blocks are logged only: their updates need not converge).
  config.implicit_residual_tolerance = 1e-2
  config.checkpoint_every_steps = 1000  # plus one at the end of every epoch
  config.keep_checkpoints = 3  # keep the last K checkpoints, plus the validation-best one
  config.test_model = "final"  # report test error of the "final" or validation-"best" model
