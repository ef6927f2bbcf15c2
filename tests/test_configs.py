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

from experiments import input_pipeline, optim, run_config, rundir, train
import rknet_jax
from rknet_jax import paper, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
REQUIRED = (
  "model",
  "dataset",
  "batch_size",
  "num_epochs",
  "learning_rate",
  "seed",
  "checkpoint_every_steps",
  "growth_rate",
  "data_dir",
  "validation_size",
  "augment",
  "image_size",
  "download",
)

# (configs/paper.py argument, row) for every dataset of every paper table row.
TABLE_ROWS = [
  (f"{row.key}:{ds}" if ds != row.datasets[0] else row.key, row, ds)
  for row in paper.ROWS
  for ds in row.datasets
]
COMMAND = re.compile(r"python -m experiments\.main (?:[^`\n]|\\\n)*")


def load(spec):
  name, _, arg = spec.partition(":")
  module = importlib.import_module(f"experiments.configs.{name}")
  return module, (module.get_config(arg) if arg else module.get_config())


def config_files():
  return sorted(
    os.path.basename(f)[:-3]
    for f in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if not f.endswith("__init__.py")
  )


def documented_commands():
  """Every ``python -m experiments.main`` command of the README, docs/ and the config docstrings."""
  texts = [open(os.path.join(REPO, "README.md")).read()]
  texts += [open(f).read() for f in sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
  texts += [importlib.import_module(f"experiments.configs.{n}").__doc__ for n in config_files()]
  commands = {m.group(0).replace("\\\n", " ") for t in texts for m in COMMAND.finditer(t)}
  return sorted(c for c in commands if "--config=" in c)  # not prose naming the module


@pytest.mark.parametrize("command", documented_commands())
def test_every_documented_command_parses_and_builds(command):
  args = [a for a in command.split()[3:] if a.startswith("--config")]
  config = parse(*(a.replace("experiments/configs", CONFIG_DIR) for a in args))
  assert (
    config.dataset in input_pipeline.DATASETS + input_pipeline.TFDS_SHORT_NAMES
    or config.dataset.startswith(input_pipeline.PREFIXES)
  ), config.dataset
  run_config.build_model(config, 10)  # the name parses and the options are accepted


def test_documented_commands_cover_every_config_and_a_paper_row_per_table():
  commands = " ".join(documented_commands())
  for name in config_files():
    assert f"--config=experiments/configs/{name}.py" in commands, name
  for table in (1, 2, 3):
    assert re.search(rf"paper\.py:table{table}_", commands), table


@pytest.mark.parametrize("name", [n for n in config_files() if n != "paper"])
def test_every_config_has_the_fields_its_command_and_a_known_model(name):
  module, config = load(name)
  for field in REQUIRED:
    assert field in config, f"{name} lacks config.{field}"
  assert f"--config=experiments/configs/{name}.py" in module.__doc__
  assert "python -m experiments.main" in module.__doc__
  assert (
    config.dataset in input_pipeline.DATASETS + input_pipeline.TFDS_SHORT_NAMES
    or config.dataset.startswith(input_pipeline.PREFIXES)
  ), config.dataset
  run_config.build_model(config, 10)  # the name parses and the options are accepted
  if name != "default":
    src = open(os.path.join(CONFIG_DIR, name + ".py")).read()
    # every config builds on the defaults, directly or through a recipe config
    assert re.search(r"from experiments\.configs import (default|imagenet|paper)\b", src), name


@pytest.mark.parametrize("arg,row,dataset", TABLE_ROWS, ids=[r[0] for r in TABLE_ROWS])
def test_table_rows_follow_the_paper_recipe(arg, row, dataset):
  _, c = load(f"paper:{arg}")
  assert (c.model, c.dataset, c.batch_size) == (row.name, dataset, row.batch_size)
  assert c.learning_rate == 0.1 and c.momentum == 0.9 and c.nesterov
  assert c.weight_decay == 1e-4 and c.lr_schedule == "step" and c.warmup_epochs == 0
  # where the paper is silent, the authors' code: decay on every parameter, dropout 0.2
  assert c.weight_decay_params == "all"
  spe = 100
  sched = optim.learning_rate_schedule(c, spe, run_config.total_steps(c, spe))

  def lr_at(epoch):
    return float(sched(int(epoch * spe)))

  num_classes = {"imagenet2012": 1000, "cifar100": 100}.get(dataset, 10)
  spec = run_config.model_spec(c, num_classes)
  assert spec == registry.resolve(
    row.spec.replace(num_classes=num_classes, dropout_rate=c.model_kwargs.dropout_rate)
  )
  if dataset == "imagenet2012":
    assert c.num_epochs == 90 and c.augment and c.image_size == 224
    assert spec.stem == "imagenet" and spec.dropout_rate == 0.0
    assert [lr_at(e) for e in (0, 29.99, 30, 59.99, 60, 89.99)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
  else:
    assert c.num_epochs == 300 and not c.augment and spec.stem == "cifar"
    assert spec.dropout_rate == 0.2
    assert [lr_at(e) for e in (0, 149.99, 150, 224.99, 225, 299.99)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
  if float(row.params_m) < 10 and dataset == row.datasets[0]:  # large ones: paper_tables
    params = rknet_jax.count_params(run_config.build_model(c, num_classes), row.input_shape)
    decimals = len(row.params_m.split(".")[1])
    assert round(params / 1e6, decimals) == pytest.approx(float(row.params_m))


def test_paper_config_errors_name_the_rows():
  with pytest.raises(ValueError, match="table1_erknet_6x1_6x1_6x1"):
    load("paper")
  with pytest.raises(ValueError, match=r"did you mean 'table1_erknet_6x1_6x1_6x1'"):
    load("paper:table1_erknet_6x1_6x1_6x")
  with pytest.raises(ValueError, match="reports cifar10; got 'cifar100'"):
    load("paper:table1_erknet_6x1_6x1_6x1:cifar100")


def test_every_table_row_and_svhn_and_digits_have_a_config():
  covered = {(load(f"paper:{arg}")[1].model, ds) for arg, _, ds in TABLE_ROWS}
  assert covered == {(r.name, ds) for r in paper.ROWS for ds in r.datasets}
  assert len(TABLE_ROWS) == 8 + 10 + 3
  assert {load(n)[1].dataset for n in ("svhn", "digits")} == {"svhn_cropped", "digits"}


def parse(*args):
  """Parses a command line the way experiments.main does (config_flags)."""
  argv = ["prog", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def test_command_line_overrides():
  c = parse(
    f"--config={CONFIG_DIR}/digits.py",
    "--config.num_epochs=1",
    "--config.seed=7",
    "--config.model=ERKNet-2x1 2x1",
  )
  assert (c.num_epochs, c.seed, c.model) == (1, 7, "ERKNet-2x1 2x1")
  c = parse(
    f"--config={CONFIG_DIR}/digits.py",
    "--config.model_kwargs.dropout_rate=0.2",
    "--config.model_kwargs.growth_multipliers=(2,3)",
  )
  model = run_config.build_model(c, 10)
  assert model.dropout_rate == 0.2 and tuple(model.growth_multipliers) == (2, 3)
  c = parse(f"--config={CONFIG_DIR}/paper.py:table2_irknet_5x1_5x1_5x1_ab_k150:cifar100")
  assert c.dataset == "cifar100" and c.batch_size == 32
  with pytest.raises(Exception, match="num_epoch"):  # a typo'd field is refused, not ignored
    parse(f"--config={CONFIG_DIR}/digits.py", "--config.num_epoch=1")


@pytest.mark.parametrize("name", config_files())
def test_every_config_takes_a_fraction_of_an_epoch_on_the_command_line(name):
  """Before: num_epochs was an int field, so --config.num_epochs=0.5 failed with "invalid
  literal for int()" and the 0-steps refusal's own advice (num_epochs >= 0.03) could not be
  typed."""
  path = f"{CONFIG_DIR}/{name}.py" + (f":{paper.ROWS[0].key}" if name == "paper" else "")
  assert parse(f"--config={path}", "--config.num_epochs=0.5").num_epochs == 0.5


def tiny(**overrides):
  c = load("digits")[1]
  c.model, c.growth_rate = "ERKNet-1x1 1x1", 4
  c.update(overrides)
  return c


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"model": "ERKNet-7y1 6x1"}, "7y1"),
    ({"model": "ResNet-50"}, "ResNet-50"),
    ({"dataset": "mnsit"}, "Unknown dataset 'mnsit'.*cifar10.*mnist"),
    ({"batch_size": 0}, "batch_size must be a positive integer; got 0"),
    ({"batch_size": -64}, "batch_size"),
    ({"learning_rate": 0.0}, "learning_rate must be a positive number; got 0.0"),
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"batch_size": 60}, "batch_size=60 .* not divisible by the 8 devices"),
    ({"eval_batch_size": 100}, "eval_batch_size=100 .* not divisible by the 8 devices"),
    ({"lr_schedule": "poly"}, "unknown lr_schedule 'poly'"),
    ({"test_model": "best", "validation_size": 0}, "validation split"),
  ],
)
def test_bad_configs_fail_before_any_compilation_or_data(tmp_path, monkeypatch, overrides, match):
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
  monkeypatch.setattr(
    rundir, "probe_write", lambda d: (_ for _ in ()).throw(OSError(30, "Read-only file system"))
  )
  with pytest.raises(ValueError, match="readonly' is not writable: .*Read-only file system"):
    train.train_and_evaluate(tiny(), str(readonly))
  monkeypatch.undo()
  monkeypatch.setattr(jax, "jit", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
  # A workdir whose run.json records another model (as train_and_evaluate writes it).
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / rundir.RUN_FILE).write_text(
    json.dumps({"identity": run_config.identity(tiny(model="ERKNet-2x1 2x1"))})
  )
  with pytest.raises(ValueError, match=r"different model .*ERKNet-2x1 2x1.*ERKNet-1x1 1x1"):
    train.train_and_evaluate(tiny(), str(workdir))
  run_config.validate_config(tiny(model="ERKNet-2x1 2x1", num_epochs=5), str(workdir))


def test_step_schedule_warmup_and_cosine():
  c = tiny(learning_rate=0.1)
  s = optim.learning_rate_schedule(c, 10, 100)  # decays at steps 50 and 75
  assert [float(s(i)) for i in (0, 49, 50, 74, 75, 99)] == pytest.approx(
    [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
  )
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
  params = jax.eval_shape(
    lambda: model.init({"params": jax.random.PRNGKey(0)}, np.zeros((1, 8, 8, 1)), train=False)
  )["params"]
  flat = jax.tree_util.tree_flatten_with_path(optim.weight_decay_mask(params, "kernels"))[0]
  decayed = {jax.tree_util.keystr(p) for p, v in flat if v}
  kept = {jax.tree_util.keystr(p) for p, v in flat if not v}
  assert decayed and all(p.endswith("['kernel']") for p in decayed)
  assert any("scale" in p for p in kept) and any("bias" in p for p in kept)
  assert all(jax.tree.leaves(optim.weight_decay_mask(params, "all")))
  # The decay itself: zero gradient, lr 0.1, wd 0.5 -> kernel moves by -0.1*0.5*w; BN not.
  tx = optim.make_optimizer(tiny(weight_decay=0.5, momentum=0.0, nesterov=False), 0.1)
  p = {"conv": {"kernel": np.ones((1, 3), np.float32)}, "bn": {"scale": np.ones(2, np.float32)}}
  updates, _ = tx.update(jax.tree.map(np.zeros_like, p), tx.init(p), p)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.05)
  np.testing.assert_allclose(updates["bn"]["scale"], 0.0)
