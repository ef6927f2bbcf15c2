"""What the log shows: progress lines, the bar, the learning rate at the logged step, phases,
the start summary and the third-party records that are filtered (experiments/progress.py and
metrics.TrainWindow)."""

import ast
import io
import json
import logging as pylogging
import os

from absl import logging
import ml_collections
import numpy as np
import pytest

from experiments import metrics, progress


class _Tty(io.StringIO):
  def isatty(self):
    return True


def _window(tmp_path, bar=None):
  log = metrics.MetricsLog(str(tmp_path), 0)
  return log, metrics.TrainWindow(
    log, start_step=0, total_steps=6, steps_per_epoch=3, global_batch=4, bar=bar
  )


def _step_metrics(lr, loss=1.0):
  return {
    "loss": np.float32(loss),
    "top1_error": np.float32(0.5),
    "learning_rate": np.float32(lr),
    "finite": np.ones(2, bool),
  }


def test_logged_learning_rate_is_the_value_at_the_step_not_a_window_mean(tmp_path, caplog):
  log, window = _window(tmp_path)
  for step, lr in ((1, 0.1), (2, 0.1), (3, 0.01)):  # the schedule drops inside the window
    window.add(step, _step_metrics(lr, loss=step))
  with caplog.at_level(logging.INFO):
    window.flush(3)
  log.close()
  record = json.loads((tmp_path / metrics.METRICS_FILE).read_text().splitlines()[-1])
  assert record["learning_rate"] == np.float32(0.01)  # the mean would be 0.07
  assert record["loss"] == 2.0  # other metrics stay window means
  assert "step 3/6 (epoch 1.00)  loss 2.0000  top1_err 0.5000  lr 0.01  " in caplog.text


def test_not_a_terminal_plain_log_lines_and_no_bar(tmp_path, caplog):
  stream = io.StringIO()  # e.g. a scheduler's log file
  bar = progress.ProgressBar(6, stream=stream)
  assert not bar.enabled
  log, window = _window(tmp_path, bar)
  with caplog.at_level(logging.INFO):
    for step in range(1, 7):
      window.add(step, _step_metrics(0.1))
      if step % 3 == 0:
        window.flush(step)
  log.close()
  bar.close()
  assert stream.getvalue() == ""
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert [l.split()[1] for l in lines] == ["3/6", "6/6"]
  assert all("\r" not in l and "ETA 0:00:00" in lines[-1] for l in lines)


def test_bar_on_a_terminal_draws_eta_and_clears_before_log_lines(tmp_path):
  stream = _Tty()
  bar = progress.ProgressBar(10, stream=stream, width=10, min_interval=0.0)
  assert bar.enabled
  bar.update(0)  # the ETA's reference (after compilation)
  bar.t_start -= 4.0  # 4 s for the first 2 steps -> 16 s left for the other 8
  bar.update(2)
  first, second = stream.getvalue().split("\r\033[K")[1:]
  assert first == "[..........] 0/10   0%  ETA ?"  # no estimate before a step was timed
  assert second == "[##........] 2/10  20%  ETA 0:00:16"
  log, window = _window(tmp_path, bar)
  window.add(1, _step_metrics(0.1))
  stream.truncate(0)
  stream.seek(0)
  window.flush(1)  # the bar line is erased before the log line, then shows the loss
  assert stream.getvalue() == "\r\033[K"
  assert bar.status == "loss 1.0000"
  bar.update(3, force=True)
  assert " 3/10  30%  ETA " in stream.getvalue()
  assert stream.getvalue().endswith("  loss 1.0000")
  log.close()


def test_first_call_is_announced_with_its_time_once(caplog):
  calls = []
  fn = progress.announce_first_call(lambda x: calls.append(x) or x + 1, "compiling the step")
  with caplog.at_level(logging.INFO):
    assert fn(1) == 2 and fn(2) == 3
  messages = [r.getMessage() for r in caplog.records]
  assert messages[0] == "Compiling the step..."
  assert messages[1].startswith("Compiling the step: done in ") and messages[1].endswith(" s")
  assert len(messages) == 2 and calls == [1, 2]


def test_start_summary_names_model_data_schedule_devices_and_workdir():
  config = ml_collections.ConfigDict(
    dict(
      model="ERKNet-3x1 3x1",
      dataset="digits",
      growth_rate=16,
      batch_size=64,
      learning_rate=0.1,
      lr_schedule="step",
    )
  )
  text = progress.start_summary(
    config=config,
    workdir="/tmp/w",
    start_step=0,
    total_steps=300,
    steps_per_epoch=20,
    split_sizes={"train": 1293, "validation": 144, "test": 360},
    input_shape=(8, 8, 1),
    params=28858,
    gflops=0.002264,
    num_devices=1,
  )
  assert text.splitlines() == [
    "Run: ERKNet-3x1 3x1 on digits, from scratch",
    "  model     ERKNet-3x1 3x1 (k = 16): 28,858 parameters, 0.002264 GFLOPs per 8x8x1 image",
    "  data      digits: 1,293 train / 144 validation / 360 test examples; batch 64",
    "  schedule  300 steps = 15 epochs of 20 steps; learning rate 0.1 (step)",
    text.splitlines()[4],
    "  workdir   /tmp/w (full config: run.json)",
  ]
  assert text.splitlines()[4].startswith("  devices   1 x cpu (cpu), 1 process")


def test_third_party_noise_is_dropped_by_logger_message_and_level_only():
  noise = progress.ThirdPartyNoise()

  def record(name, level, message):
    return pylogging.LogRecord(name, level, "x.py", 1, message, None, None)

  tpu = "Unable to initialize backend 'tpu': NOT_FOUND: TPU initialization failed"
  assert not noise.filter(record("jax._src.xla_bridge", pylogging.INFO, tpu))
  assert noise.filter(record("jax._src.xla_bridge", pylogging.WARNING, tpu))  # more severe
  assert noise.filter(record("experiments.train", pylogging.INFO, tpu))  # another logger
  assert noise.filter(record("jax._src.xla_bridge", pylogging.INFO, "Other message"))


@pytest.mark.parametrize("module", ["main", "evaluate", "study", "prepare_data", "throughput"])
def test_every_entry_point_sets_up_the_console_through_one_function(module):
  """The console set-up (orbax chatter and third-party noise dropped) is metrics.console_logging,
  and every command-line entry point calls it."""
  handler = logging.get_absl_handler()
  saved = list(handler.filters)
  try:
    metrics.console_logging()
    assert any(isinstance(f, progress.ThirdPartyNoise) for f in handler.filters)
  finally:
    handler.filters[:] = saved
  # Read, not imported: the entry points define absl flags of the same names.
  path = os.path.join(os.path.dirname(metrics.__file__), f"{module}.py")
  with open(path) as f:
    tree = ast.parse(f.read())
  (main,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
  assert "metrics.console_logging()" in ast.unparse(main)
