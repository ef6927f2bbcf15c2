"""Configs (every paper table row, SVHN, digits), command-line overrides, config validation,
the learning-rate schedules and the weight-decay mask of the runner (experiments/optim.py)."""
import glob
import importlib
import json
import os
import re

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest

from experiments import input_pipeline
from experiments import optim
from experiments import run_config
from experiments import rundir
from experiments import train
import rknet_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
REQUIRED = ("model", "dataset", "batch_size", "num_epochs", "learning_rate", "seed",
            "checkpoint_every_steps", "growth_rate", "data_dir", "validation_size", "augment",
            "image_size", "download")

# (config file[:arg], model, dataset, batch, paper params in M) for every paper table row.
TABLE_ROWS = [
    ("table1_erknet_6x1_6x1_6x1", "ERKNet-6x1 6x1 6x1", "cifar10", 64, 0.74),
    ("table1_erknet_7x1_6x1_6x1", "ERKNet-7x1 6x1 6x1", "cifar10", 64, 0.83),
    ("table1_erknet_7x1_7x1_6x1", "ERKNet-7x1 7x1 6x1", "cifar10", 64, 0.91),
    ("table1_erknet_7x1_7x1_7x1", "ERKNet-7x1 7x1 7x1", "cifar10", 64, 0.99),
    ("table1_irknet_3x1_3x1_3x1", "IRKNet-3x1 3x1 3x1", "cifar10", 64, 0.32),
    ("table1_irknet_4x1_3x1_3x1", "IRKNet-4x1 3x1 3x1", "cifar10", 64, 0.40),
    ("table1_irknet_4x1_4x1_3x1", "IRKNet-4x1 4x1 3x1", "cifar10", 64, 0.49),
    ("table1_irknet_4x1_4x1_4x1", "IRKNet-4x1 4x1 4x1", "cifar10", 64, 0.57),
] + [
    (f"table2_{stem}{arg}", model, ds, 32, params)
    for stem, model, params in [
        ("densenet_bc_250_k24", "DenseNet-BC-250-k24", 15.3),
        ("cliquenet_t18_k80", "CliqueNet-T18-k80", 10.14),
        ("cliquenet_abc_t30_k150", "CliqueNet-ABC-T30-k150", 10.48),
        ("irknet_5x1_5x1_5x1_ab_k150", "IRKNet-5x1 5x1 5x1-AB-k150", 4.87),
        ("irknet_5x1_5x1_5x1_ab_k180", "IRKNet-5x1 5x1 5x1-AB-k180", 6.99)]
    for arg, ds in (("", "cifar10"), (":cifar100", "cifar100"))
] + [
    ("table3_erknet_3x1_3x1_3x1_1x1_b", "ERKNet-3x1 3x1 3x1 1x1-B", "imagenet2012", 256, 6.95),
    ("table3_erknet_3x1_3x1_4x1_2x1_b", "ERKNet-3x1 3x1 4x1 2x1-B", "imagenet2012", 256, 14.49),
    ("table3_erknet_3x1_3x1_6x1_2x1_b", "ERKNet-3x1 3x1 6x1 2x1-B", "imagenet2012", 256, 25.51),
]


def load(spec):
  name, _, arg = spec.partition(":")
  module = importlib.import_module(f"experiments.configs.{name}")
  return module, (module.get_config(arg) if arg else module.get_config())


def config_files():
  return sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                if not f.endswith("__init__.py"))


@pytest.mark.parametrize("name", config_files())
def test_every_config_has_the_fields_its_command_and_a_known_model(name):
  module, config = load(name)
  for field in REQUIRED:
    assert field in config, f"{name} lacks config.{field}"
  assert f"--config=experiments/configs/{name}.py" in module.__doc__
  assert "python -m experiments.main" in module.__doc__
  assert config.dataset in input_pipeline.DATASETS
  run_config.build_model(config, 10)  # the name parses and the options are accepted
  if name != "default":
    src = open(os.path.join(CONFIG_DIR, name + ".py")).read()
    # every config builds on the defaults, directly or through a recipe config (imagenet.py)
    assert re.search(r"from experiments\.configs import (default|imagenet)\b", src), name


@pytest.mark.parametrize("spec,model,dataset,batch,paper_params", TABLE_ROWS,
                         ids=[r[0] for r in TABLE_ROWS])
def test_table_rows_follow_the_paper_recipe(spec, model, dataset, batch, paper_params):
  _, c = load(spec)
  assert (c.model, c.dataset, c.batch_size) == (model, dataset, batch)
  assert c.learning_rate == 0.1 and c.momentum == 0.9 and c.nesterov
  assert c.weight_decay == 1e-4 and c.lr_schedule == "step" and c.warmup_epochs == 0
  spe = 100
  sched = optim.learning_rate_schedule(c, spe, c.num_epochs * spe)
  lr_at = lambda epoch: float(sched(int(epoch * spe)))
  if dataset == "imagenet2012":
    assert c.num_epochs == 90 and c.augment and c.stem == "imagenet" and c.image_size == 224
    assert [lr_at(e) for e in (0, 29.99, 30, 59.99, 60, 89.99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
  else:
    assert c.num_epochs == 300 and not c.augment and c.stem == "cifar"
    assert [lr_at(e) for e in (0, 149.99, 150, 224.99, 225, 299.99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
  if paper_params < 10:  # the largest baselines take long to trace; counted elsewhere
    num_classes = 1000 if dataset == "imagenet2012" else 10
    shape = (224, 224, 3) if dataset == "imagenet2012" else (32, 32, 3)
    params = rknet_jax.count_params(run_config.build_model(c, num_classes), shape)
    assert params / 1e6 == pytest.approx(paper_params, abs=0.006)


def test_every_table_row_and_svhn_and_digits_have_a_config():
  covered = set()
  for name in config_files():
    if name.startswith("table2_"):
      for ds in ("cifar10", "cifar100"):
        c = load(f"{name}:{ds}")[1]
        covered.add((c.model, c.dataset))
    else:
      c = load(name)[1]
      covered.add((c.model, c.dataset))
  assert {(m, d) for _, m, d, _, _ in TABLE_ROWS} <= covered
  assert {d for _, d in covered} >= {"svhn_cropped", "digits"}
  assert len(TABLE_ROWS) == 8 + 10 + 3


def parse(*args):
  """Parses a command line the way experiments.main does (config_flags)."""
  argv = ["prog", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_command_line_overrides():
  c = parse(f"--config={CONFIG_DIR}/digits.py", "--config.num_epochs=1", "--config.seed=7",
            "--config.model=ERKNet-2x1 2x1")
  assert (c.num_epochs, c.seed, c.model) == (1, 7, "ERKNet-2x1 2x1")
  c = parse(f"--config={CONFIG_DIR}/digits.py", "--config.model_kwargs.dropout_rate=0.2",
            "--config.model_kwargs.growth_multipliers=(2,3)")
  model = run_config.build_model(c, 10)
  assert model.dropout_rate == 0.2 and tuple(model.growth_multipliers) == (2, 3)
  c = parse(f"--config={CONFIG_DIR}/table2_irknet_5x1_5x1_5x1_ab_k150.py:cifar100")
  assert c.dataset == "cifar100" and c.batch_size == 32
  with pytest.raises(Exception, match="num_epoch"):  # a typo'd field is refused, not ignored
    parse(f"--config={CONFIG_DIR}/digits.py", "--config.num_epoch=1")


def tiny(**overrides):
  c = load("digits")[1]
  c.model, c.growth_rate = "ERKNet-1x1 1x1", 4
  c.update(overrides)
  return c


@pytest.mark.parametrize("overrides,match", [
    ({"model": "ERKNet-7y1 6x1"}, "7y1"),
    ({"model": "ResNet-50"}, "ResNet-50"),
    ({"dataset": "mnist"}, "unknown dataset 'mnist'.*cifar10"),
    ({"batch_size": 0}, "batch_size must be a positive integer; got 0"),
    ({"batch_size": -64}, "batch_size"),
    ({"learning_rate": 0.0}, "learning_rate must be a positive number; got 0.0"),
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"batch_size": 60}, "batch_size=60 .* not divisible by the 8 devices"),
    ({"eval_batch_size": 100}, "eval_batch_size=100 .* not divisible by the 8 devices"),
    ({"lr_schedule": "poly"}, "unknown lr_schedule 'poly'"),
    ({"test_model": "best", "validation_size": 0}, "validation split"),
])
def test_bad_configs_fail_before_any_compilation_or_data(tmp_path, monkeypatch, overrides,
                                                         match):
  def forbidden(*a, **k):
    raise AssertionError("compiled or loaded data before validating the config")
  monkeypatch.setattr(jax, "jit", forbidden)
  monkeypatch.setattr(input_pipeline, "train_iterator", forbidden)
  monkeypatch.setattr(input_pipeline, "steps_per_epoch", forbidden)
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny(**overrides), str(tmp_path / "w"))


def test_unwritable_workdir_and_workdir_of_another_model(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "jit", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="cannot be created"):
    train.train_and_evaluate(tiny(), str(blocker / "run"))
  with pytest.raises(ValueError, match="a_file' cannot be created"):
    run_config.validate_config(tiny(), str(blocker))
  # validate_config only checks: it creates nothing.
  run_config.validate_config(tiny(), str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()
  # The probe write catches what permission bits would not tell root.
  readonly = tmp_path / "readonly"
  readonly.mkdir()
  monkeypatch.setattr(rundir, "probe_write", lambda d: (_ for _ in ()).throw(
      OSError(30, "Read-only file system")))
  with pytest.raises(ValueError, match="readonly' is not writable: .*Read-only file system"):
    train.train_and_evaluate(tiny(), str(readonly))
  monkeypatch.undo()
  monkeypatch.setattr(jax, "jit", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
  # A workdir whose run.json records another model (as train_and_evaluate writes it).
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / rundir.RUN_FILE).write_text(json.dumps(
      {"identity": run_config.identity(tiny(model="ERKNet-2x1 2x1"))}))
  with pytest.raises(ValueError, match=r"different model .*ERKNet-2x1 2x1.*ERKNet-1x1 1x1"):
    train.train_and_evaluate(tiny(), str(workdir))
  run_config.validate_config(tiny(model="ERKNet-2x1 2x1", num_epochs=5), str(workdir))


def test_step_schedule_warmup_and_cosine():
  c = tiny(learning_rate=0.1)
  s = optim.learning_rate_schedule(c, 10, 100)  # decays at steps 50 and 75
  assert [float(s(i)) for i in (0, 49, 50, 74, 75, 99)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
  c.lr_decay_fractions = (0.3,)
  assert float(optim.learning_rate_schedule(c, 10, 100)(30)) == pytest.approx(0.01)
  c = tiny(warmup_epochs=1.0)
  s = optim.learning_rate_schedule(c, 10, 100)
  assert [float(s(i)) for i in (0, 5, 10, 60)] == pytest.approx([0.0, 0.05, 0.1, 0.01])
  c = tiny(lr_schedule="cosine", warmup_epochs=1.0)
  s = optim.learning_rate_schedule(c, 10, 100)
  assert float(s(5)) == pytest.approx(0.05)
  assert float(s(10)) == pytest.approx(0.1)
  assert float(s(55)) == pytest.approx(0.05, abs=1e-3)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-6)
  c = tiny(lr_decay_every_epochs=3)
  s = optim.learning_rate_schedule(c, 10, 100)
  assert [float(s(i)) for i in (29, 30, 60, 90)] == pytest.approx([0.1, 0.01, 1e-3, 1e-4])


def test_weight_decay_applies_to_conv_and_dense_kernels_only():
  c = tiny()
  model = run_config.build_model(c, 10)
  params = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0)}, np.zeros((1, 8, 8, 1)), train=False))["params"]
  flat = jax.tree_util.tree_flatten_with_path(optim.weight_decay_mask(params, "kernels"))[0]
  decayed = {jax.tree_util.keystr(p) for p, v in flat if v}
  kept = {jax.tree_util.keystr(p) for p, v in flat if not v}
  assert decayed and all(p.endswith("['kernel']") for p in decayed)
  assert any("scale" in p for p in kept) and any("bias" in p for p in kept)
  assert all(jax.tree.leaves(optim.weight_decay_mask(params, "all")))
  # The decay itself: zero gradient, lr 0.1, wd 0.5 -> kernel moves by -0.1*0.5*w; BN not.
  tx = optim.make_optimizer(tiny(weight_decay=0.5, momentum=0.0, nesterov=False), 0.1)
  p = {"conv": {"kernel": np.ones(3, np.float32)}, "bn": {"scale": np.ones(2, np.float32)}}
  updates, _ = tx.update(jax.tree.map(np.zeros_like, p), tx.init(p), p)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.05)
  np.testing.assert_allclose(updates["bn"]["scale"], 0.0)
