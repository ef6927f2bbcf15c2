"""The runner logs the final residual of implicit stage solves and warns when one is large.

Models with implicit stages (here a Gauss-Legendre tableau RKNet and an IRKNet) report
``implicit_residual_max`` in their train metrics and ``metrics.jsonl``; explicit ones compile
the same program as without reporting and log no such metric.
"""

import functools
import logging

import jax
import numpy as np
import pytest

from experiments import metrics as metrics_lib
from experiments import optim, run_config, train
from experiments import steps as steps_lib

IMPLICIT = "Gauss_Legendre2Net-1x1 1x1"  # two implicit time-steps, 4 channels at k = 4
WARNING = "did not converge"


@pytest.fixture
def short_config(tiny_config):
  """The tiny config with no hold-out, no mid-run checkpoint and no precise BN (the
  residuals logged are the train step's)."""
  return functools.partial(
    tiny_config, validation_size=0, checkpoint_every_steps=100, precise_bn_batches=0
  )


def _implicit_config(short_config, **model_kwargs):
  config = short_config(model=IMPLICIT, num_train_steps=8)
  for k, v in model_kwargs.items():
    config.model_kwargs[k] = v
  return config


def _train_records(workdir):
  return [r for r in metrics_lib.read_metrics(workdir) if r["split"] == "train"]


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]


def test_too_few_iterations_are_logged_and_warned_about_once(short_config, tmp_path, caplog):
  config = _implicit_config(short_config, implicit_iterations=1)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path))
  records = _train_records(str(tmp_path))
  assert [r["step"] for r in records] == [4, 8]
  tolerance = config.implicit_residual_tolerance
  assert all(r["implicit_residual_max"] > tolerance for r in records), records
  (message,) = _warnings(caplog)  # once per run, though every logged step is above
  assert "block period1_step1" in message or "block period2_step1" in message
  assert "config.model_kwargs.implicit_iterations" in message
  assert "config.model_kwargs.step_size" in message
  assert f"config.implicit_residual_tolerance={tolerance:g}" in message


def test_a_converging_solve_is_logged_without_a_warning(short_config, tmp_path, caplog):
  config = _implicit_config(short_config, step_size=0.1)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path))
  records = _train_records(str(tmp_path))
  assert len(records) == 2
  assert all(0 < r["implicit_residual_max"] < config.implicit_residual_tolerance for r in records)
  assert _warnings(caplog) == []


def test_a_clique_block_run_is_logged_without_a_warning(short_config, tmp_path, caplog):
  """IRKNet's alternate updates need not converge (the paper runs a fixed number): its
  residual is recorded, far above the tolerance, and no setting is blamed for it."""
  config = short_config(model="IRKNet-2x1 2x1", num_train_steps=4)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path))
  records = _train_records(str(tmp_path))
  assert records and all(
    r["implicit_residual_max"] > config.implicit_residual_tolerance for r in records
  )
  assert _warnings(caplog) == []


def test_an_explicit_run_has_no_residual_metric(short_config, tmp_path, caplog):
  config = short_config(num_train_steps=4)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path))
  records = _train_records(str(tmp_path))
  assert records and not any("implicit_residual_max" in r for r in records)
  assert _warnings(caplog) == []


def _step_and_state(config, report, num_classes=10, shape=(8, 8, 1)):
  mesh = steps_lib.make_mesh(jax.devices()[:1])
  model = run_config.build_model(config, num_classes)
  schedule = optim.learning_rate_schedule(config, 10, 100)
  tx = optim.make_optimizer(config, schedule)
  state = steps_lib.make_init_fn(model, tx, shape, mesh)(0)
  step = steps_lib.make_train_step(model, tx, schedule, mesh, state, report)
  rng = np.random.default_rng(0)
  local = {
    "image": rng.standard_normal((4,) + shape, dtype=np.float32),
    "label": rng.integers(0, num_classes, 4).astype(np.int32),
  }
  return step, state, steps_lib.global_batch(local, mesh, 4)


def test_an_explicit_model_compiles_the_same_step_with_reporting(tiny_config):
  """Reporting costs an explicit model nothing: the lowered program is the same."""
  texts = []
  for report in (True, False):
    step, state, batch = _step_and_state(tiny_config(), report)
    texts.append(step.lower(state, batch).as_text())
  assert texts[0] == texts[1]


@pytest.mark.parametrize("model", [IMPLICIT, "IRKNet-2x1 2x1"])
def test_reporting_changes_no_value_of_the_step(tiny_config, model):
  """The new state and the other metrics are bit-identical with and without reporting."""
  outs = {}
  for report in (True, False):
    step, state, batch = _step_and_state(tiny_config(model=model), report)
    outs[report] = jax.device_get(step(state, batch))
  (state_on, metrics_on), (state_off, metrics_off) = outs[True], outs[False]
  for a, b in zip(jax.tree.leaves(state_on), jax.tree.leaves(state_off), strict=True):
    np.testing.assert_array_equal(a, b)
  residuals = metrics_on.pop(steps_lib.IMPLICIT_RESIDUALS)
  largest = metrics_on.pop(steps_lib.IMPLICIT_RESIDUAL_MAX)
  assert largest == residuals.max() > 0 and len(residuals) == 2  # one solve per time-step
  assert set(metrics_on) == set(metrics_off)
  for k in metrics_off:
    np.testing.assert_array_equal(metrics_on[k], metrics_off[k])


def test_the_window_logs_its_largest_residual(tmp_path, caplog):
  log = metrics_lib.MetricsLog(str(tmp_path), 0)
  window = metrics_lib.TrainWindow(
    log, start_step=0, total_steps=4, steps_per_epoch=4, global_batch=8
  )
  for step, residual in ((1, 0.5), (2, 3.0), (3, 0.25)):
    window.add(
      step,
      {"loss": 1.0, "top1_error": 0.5, "learning_rate": 0.1, "implicit_residual_max": residual},
    )
  with caplog.at_level(logging.INFO):
    window.flush(3)
  log.close()
  (record,) = metrics_lib.read_metrics(str(tmp_path))
  assert record["implicit_residual_max"] == 3.0 and record["loss"] == 1.0
  assert any("implicit_res 3 " in r.getMessage() for r in caplog.records)
