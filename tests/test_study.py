"""Tests for experiments/study.py: models x seeds as ordinary runs, reused on rerun."""

import json
import os

import numpy as np
import pytest

from experiments import study, train
from experiments.configs import digits

MODELS = "ERKNet-2x1 2x1|growth_rate=8,DenseNet-BC-16-k8|growth_rate=8"


def test_rows_name_only_the_overrides_that_differ():
  recs = [
    {
      "model": "A",
      "entry": "A|k=1|m=2",
      "overrides": {"k": 1, "m": 2},
      "runs": [{"test_top1_error": 0.1, "params": 10, "gflops": 1.0, "seed": 0}],
    },
    {
      "model": "A",
      "entry": "A|k=1|m=3",
      "overrides": {"k": 1, "m": 3},
      "runs": [
        {"test_top1_error": 0.3, "params": 10, "gflops": 1.0, "seed": 0},
        {"test_top1_error": 0.5, "params": 10, "gflops": 1.0, "seed": 1},
      ],
    },
  ]
  s = study.summarise(recs)
  assert [r["name"] for r in s] == ["A (m=2)", "A (m=3)"]
  assert s[0]["std_test_top1_error"] == 0.0
  assert s[1]["mean_test_top1_error"] == pytest.approx(0.4)
  assert s[1]["std_test_top1_error"] == pytest.approx(0.1414, abs=1e-4)


def _tiny_config():
  config = digits.get_config()
  config.num_train_steps = 4
  config.validation_size = 0
  config.log_every_steps = 2
  config.checkpoint_every_steps = 100
  return config


def test_parse_models_entries_and_overrides():
  parsed = study.parse_models(
    "ERKNet-2x1 2x1 | growth_rate=8 | dropout_rate=0.2, RK4Net-1x2 1x2|learn_coefficients=True"
  )
  assert parsed[0] == (
    "ERKNet-2x1 2x1 | growth_rate=8 | dropout_rate=0.2",
    "ERKNet-2x1 2x1",
    {"growth_rate": 8, "dropout_rate": 0.2},
  )
  assert parsed[1][1:] == ("RK4Net-1x2 1x2", {"learn_coefficients": True})


@pytest.mark.parametrize(
  "text, match",
  [
    ("", "--models is empty"),
    ("ERKNet-2x1,,DenseNet-BC-16-k8", "empty entry"),
    ("ERKNet-2x1|growth_rate", "not field=value"),
    ("ERKNet-2x1,ERKNet-2x1", "twice"),
  ],
)
def test_parse_models_errors(text, match):
  with pytest.raises(ValueError, match=match):
    study.parse_models(text)


def test_bad_entry_or_seed_count_fails_before_any_training(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: calls.append(a))
  with pytest.raises(ValueError, match=r"--models entry 'DenseNet-BC-16-k8': .*contradicts"):
    study.run_study(
      _tiny_config(), str(tmp_path), "ERKNet-2x1 2x1|growth_rate=8,DenseNet-BC-16-k8", 2
    )  # digits' growth_rate 16 contradicts k8
  with pytest.raises(ValueError, match="--seeds=0"):
    study.run_study(_tiny_config(), str(tmp_path), MODELS, 0)
  with pytest.raises(ValueError, match="NoSuchNet-1"):
    study.run_study(_tiny_config(), str(tmp_path), "ERKNet-2x1 2x1,NoSuchNet-1", 1)
  # An override of another type than its field (was: an ml_collections TypeError traceback).
  with pytest.raises(
    ValueError,
    match=r"--models entry for 'ERKNet-2x1 2x1': batch_size=1.5 is of type float, but "
    r"config.batch_size is of type int \(now 64\)",
  ):
    study.run_study(_tiny_config(), str(tmp_path), "ERKNet-2x1 2x1|batch_size=1.5", 1)
  assert not calls
  assert not os.path.exists(os.path.join(tmp_path, study.RUNS_DIR))


def test_run_dirs_are_distinct_and_readable():
  a = study.run_dir("/w", "ERKNet-3×1 3×1", 0)
  b = study.run_dir("/w", "ERKNet-3x1 3x1", 0)
  assert a != b and "ERKNet_3x1_3x1" in a and a.endswith("seed_0")


@pytest.mark.slow
def test_tiny_study_trains_then_reuses_runs(tmp_path, monkeypatch):
  workdir = str(tmp_path / "study")
  calls = []
  real = train.train_and_evaluate

  def counting(config, directory, **kwargs):
    calls.append((config.model, config.seed))
    return real(config, directory, **kwargs)

  monkeypatch.setattr(train, "train_and_evaluate", counting)
  summary = study.run_study(_tiny_config(), workdir, MODELS, 2)
  assert sorted(calls) == [
    ("DenseNet-BC-16-k8", 0),
    ("DenseNet-BC-16-k8", 1),
    ("ERKNet-2x1 2x1", 0),
    ("ERKNet-2x1 2x1", 1),
  ]
  with open(os.path.join(workdir, study.STUDY_JSON)) as f:
    saved = json.load(f)
  assert saved["seeds"] == 2 and [m["model"] for m in saved["models"]] == [
    "ERKNet-2x1 2x1",
    "DenseNet-BC-16-k8",
  ]
  for rec in saved["models"]:
    assert len(rec["test_top1_errors"]) == 2 and rec["params"] > 1000
    assert rec["mean_test_top1_error"] == pytest.approx(sum(rec["test_top1_errors"]) / 2)
  erk, dense = saved["models"]
  assert erk["family"] == "ERKNet" and dense["family"] == "DenseNet"
  assert erk["params"] != dense["params"]
  # Different seeds are different runs (init and data order differ).
  assert (
    erk["test_top1_errors"][0] != erk["test_top1_errors"][1]
    or dense["test_top1_errors"][0] != dense["test_top1_errors"][1]
  )
  assert saved["common_overrides"] == {"growth_rate": 8} and saved["epochs"] > 0
  md = open(os.path.join(workdir, study.STUDY_MD)).read()
  assert md.startswith("digits, 2 seeds, ") and "all models: growth_rate=8" in md
  assert md.count("\n") == 8 and "| ERKNet-2x1 2x1 | ERKNet |" in md
  # The base config (from the runs' run.json) and each row's own fields are recorded.
  assert saved["config"]["dataset"] == "digits" and saved["config"]["num_train_steps"] == 4
  assert "model" not in saved["config"] and "seed" not in saved["config"]
  assert erk["config_overrides"] == {"model": "ERKNet-2x1 2x1"}
  assert dense["config_overrides"] == {"model": "DenseNet-BC-16-k8"}
  assert erk["steps"] == [4, 4] and erk["epochs"] == [saved["epochs"]] * 2
  assert "num_train_steps=4" in md and "dataset=digits" in md
  with open(os.path.join(workdir, study.STUDY_PNG), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # Rerun: every finished run is reused, nothing is trained, the summary is the same.
  calls.clear()
  again = study.run_study(_tiny_config(), workdir, MODELS, 2)
  assert calls == [] and again == summary

  # An interrupted run (no results.json yet) is resumed; the others are reused.
  os.remove(
    os.path.join(study.run_dir(workdir, "DenseNet-BC-16-k8|growth_rate=8", 1), study.RESULTS_FILE)
  )
  third = study.run_study(_tiny_config(), workdir, MODELS, 2)
  assert calls == [("DenseNet-BC-16-k8", 1)]
  assert third[1]["test_top1_errors"] == summary[1]["test_top1_errors"]


def _snapshot(directory):
  """{relative path: bytes} of every file under ``directory``."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


@pytest.mark.slow
def test_rerun_continues_longer_runs_and_refuses_another_config(tmp_path, monkeypatch):
  """A rerun with more epochs reports the longer runs; another learning rate is refused."""
  workdir = str(tmp_path / "study")
  models = "ERKNet-1x1 1x1|growth_rate=4"
  calls = []
  real = train.train_and_evaluate

  def counting(config, directory, **kwargs):
    calls.append(config.num_epochs)
    return real(config, directory, **kwargs)

  monkeypatch.setattr(train, "train_and_evaluate", counting)

  def config(**fields):  # 1,293 train images / batch 256: 5 steps per epoch
    c = _tiny_config()
    c.num_train_steps, c.batch_size, c.num_epochs = -1, 256, 1
    for k, v in fields.items():
      c[k] = v
    return c

  first = study.run_study(config(), workdir, models, 1)
  assert calls == [1] and first[0]["steps"] == [5] and first[0]["epochs"] == [1.0]

  # More epochs: the run is continued to the new total, and the table says so.
  second = study.run_study(config(num_epochs=2), workdir, models, 1)
  assert calls == [1, 2] and second[0]["steps"] == [10] and second[0]["epochs"] == [2.0]
  assert second[0]["continued_runs"] == 1
  with open(os.path.join(workdir, study.STUDY_JSON)) as f:
    saved = json.load(f)
  assert saved["epochs"] == 2.0 and saved["config"]["num_epochs"] == 2
  md = open(os.path.join(workdir, study.STUDY_MD)).read()
  assert md.startswith("digits, 1 seeds, 2 epochs, batch 256")
  assert "| 2 |" in md and "1 of 1 runs were trained toward another total first" in md

  # The same command again: reused, nothing trained.
  assert study.run_study(config(num_epochs=2), workdir, models, 1) == second
  assert calls == [1, 2]

  # Only a field that does not change results differs: handed to the runner, which tests
  # the finished model again (same steps, same test error) and records the new value.
  third = study.run_study(config(num_epochs=2, log_every_steps=3), workdir, models, 1)
  assert calls == [1, 2, 2] and third[0]["steps"] == [10]
  assert third[0]["test_top1_errors"] == second[0]["test_top1_errors"]

  # Another learning rate: refused before any training, naming the run and the field;
  # nothing in the study's directory changes.
  before = _snapshot(workdir)
  directory = study.run_dir(workdir, models, 0)
  with pytest.raises(
    ValueError,
    match=(
      rf"^study: {directory} was trained with another config \(learning_rate: 0\.1 there, "
      r"0\.05 now\).*new --workdir.*delete"
    ),
  ):
    study.run_study(config(num_epochs=2, log_every_steps=3, learning_rate=0.05), workdir, models, 1)
  assert calls == [1, 2, 2] and _snapshot(workdir) == before


def test_plan_run_from_the_recorded_config_and_results(tmp_path):
  """Which runs are reused, continued or refused: from run.json and results.json alone."""
  config = _tiny_config()
  directory = tmp_path / "run"
  directory.mkdir()
  recorded = json.loads(config.to_json())
  del recorded["model_kwargs"]["bn_momentum"]  # a field added since: taken at its default
  (directory / "run.json").write_text(json.dumps({"config": recorded, "total_steps": 4}))
  assert study.plan_run(config, str(directory)) == (study.RESUME, {}, None)
  results = {"steps": 4, "test_top1_error": 0.25}
  (directory / study.RESULTS_FILE).write_text(json.dumps(results))
  assert study.plan_run(config, str(directory)) == (study.REUSE, {}, results)
  # results.json of a shorter total than run.json's (a continuation that stopped early).
  (directory / "run.json").write_text(json.dumps({"config": recorded, "total_steps": 8}))
  assert study.plan_run(config, str(directory))[0] == study.CONTINUE
  config.num_train_steps, config.prefetch = 8, 3
  assert study.plan_run(config, str(directory)) == (
    study.CONTINUE,
    {"num_train_steps": (4, 8), "prefetch": (2, 3)},
    None,
  )
  config.batch_size, config.model_kwargs.dropout_rate = 32, 0.1
  with pytest.raises(
    ValueError,
    match=r"run was trained with another config \(batch_size: 64 "
    r"there, 32 now, model_kwargs.dropout_rate: None there, 0.1 now\)",
  ):
    study.plan_run(config, str(directory))


def test_outputs_without_a_run_file_are_not_reused(tmp_path):
  directory = tmp_path / "run"
  directory.mkdir()
  (directory / study.RESULTS_FILE).write_text(json.dumps({"test_top1_error": 0.1}))
  with pytest.raises(
    ValueError,
    match=r"results.json but no run.json: the config it was "
    "trained with is unknown",
  ):
    study.plan_run(_tiny_config(), str(directory))
  assert study.plan_run(_tiny_config(), str(tmp_path / "new")) == (study.TRAIN, {}, None)


def test_the_plot_axis_is_linear_unless_a_seed_diverged():
  def row(*errors):
    return {"test_top1_errors": errors, "mean_test_top1_error": float(np.mean(errors))}

  # Every error under 1% (a symlog axis with threshold 1 showed a single tick here).
  assert study.y_axis([row(0.0086), row(0.0069, 0.0071)]) == ("linear", pytest.approx(0.989))
  scale, threshold = study.y_axis([row(0.0086), row(0.0069), row(0.3, 0.02)])
  assert scale == "symlog" and threshold == pytest.approx(0.86)
