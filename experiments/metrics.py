"""Run metrics: ``metrics.jsonl``, TensorBoard event files, and the loss/error curves PNG.

``MetricsLog`` writes ``metrics.jsonl`` (one JSON record per line) and TensorBoard summaries on
process 0; ``TrainWindow`` gathers the train-step metrics of one logging window, fetches them
once, hands them to the run's checks and logs their means with images/s and the ETA.

The TensorBoard writer emits the standard event-file format (TFRecord-framed ``Event``
protos, ``brain.Event:2``) with TensorBoard's own protos and record framing, so it needs
the ``tensorboard`` package but not TensorFlow (importing TensorFlow takes longer than the
whole digits quickstart spends compiling).
"""

from collections.abc import Callable
import io
import json
import logging as pylogging
import os
import socket
import time

from absl import logging
from etils import epath
import jax
import numpy as np

from experiments import rundir
from experiments import steps as steps_lib

METRICS_FILE = rundir.METRICS_FILE
IMPLICIT_RESIDUAL_MAX = steps_lib.IMPLICIT_RESIDUAL_MAX  # logged as the window's largest


class _QuietOrbax(pylogging.Filter):
  """Drops orbax's per-save INFO chatter so the console shows the run's progress."""

  def filter(self, record):
    if "/orbax/" not in record.pathname:
      return True
    # Saves without validation metrics are expected between evaluations. (The read-only
    # notices of a manager opened for reading are dropped where it is built:
    # rknet_jax.checkpoint.checkpoint_manager.)
    message = record.getMessage()
    return record.levelno >= pylogging.WARNING and "did not provide metrics" not in message


def console_logging():
  """absl INFO logging on the console (every CLI entry point), without orbax's per-checkpoint
  INFO lines or the other libraries' records that ask nothing of the user
  (``progress.THIRD_PARTY_NOISE``)."""
  from experiments import progress  # imports this module

  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())
  progress.quiet_third_party_logs()


class TensorBoardWriter:
  """Scalar summaries in TensorBoard's event-file format (``tensorboard --logdir=DIR``)."""

  def __init__(self, logdir):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = logdir / name
    self._file = self.path.open("wb")
    self._records = RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event):
    self._records.write(event.SerializeToString())

  def scalar(self, tag: str, value: float, step: int):
    summary = self._summary_pb2.Summary(
      value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))]
    )
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self):
    self._file.flush()

  def close(self):
    if not self._file.closed:
      self._file.close()


def read_metrics(workdir: str) -> list:
  """The records of ``workdir/metrics.jsonl`` (a line cut by a kill is skipped)."""
  try:
    text = rundir.path(workdir, METRICS_FILE).read_text()
  except FileNotFoundError:
    return []
  out = []
  for line in text.splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return out


class MetricsLog:
  """``metrics.jsonl`` + TensorBoard on process 0. Timing fields are kept under ``time_*``.

  Records are appended to a local file as they come; on other file systems (no append) the
  file is rewritten at each ``flush``.
  """

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.file = rundir.path(workdir, METRICS_FILE)
    self.local = rundir.is_local(workdir)
    self.writer = None
    self._lines, self._unwritten = [], []
    if not self.enabled:
      return
    # A resumed run redoes the steps after its checkpoint: drop their records so the
    # file reads as one uninterrupted run.
    self._lines = [json.dumps(r) for r in read_metrics(workdir) if r.get("step", 0) <= resume_step]
    if self.file.exists():
      tmp = self.file.parent / (self.file.name + ".tmp")
      tmp.write_text("".join(l + "\n" for l in self._lines))
      tmp.replace(self.file)
    try:
      self.writer = TensorBoardWriter(rundir.path(workdir, rundir.TENSORBOARD_SUBDIR))
    except Exception as e:
      logging.warning("TensorBoard summaries disabled (%s); metrics.jsonl is still written", e)

  def write(self, step: int, split: str, values: dict):
    """Records ``values`` of ``split`` at ``step`` (floats; ints kept as ints)."""
    if not self.enabled:
      return
    rec = {"step": int(step), "split": split}
    rec.update({k: (float(v) if not isinstance(v, int) else v) for k, v in values.items()})
    line = json.dumps(rec)
    self._lines.append(line)
    if self.local:
      with open(os.fspath(self.file), "a") as f:
        f.write(line + "\n")
    else:
      self._unwritten.append(line)
    if self.writer is not None:
      for k, v in values.items():
        if not k.startswith("time_"):
          self.writer.scalar(f"{split}/{k}", float(v), int(step))
        elif k == "time_images_per_sec":
          self.writer.scalar("perf/images_per_sec", float(v), int(step))

  def flush(self):
    """Makes every record so far durable (rewrites the file where appending is impossible)."""
    if self._unwritten:
      self.file.write_text("".join(l + "\n" for l in self._lines))
      self._unwritten = []
    if self.writer is not None:
      self.writer.flush()

  def close(self):
    """Flushes and closes the TensorBoard file."""
    self.flush()
    if self.writer is not None:
      self.writer.close()


def fmt_time(seconds: float) -> str:
  """``h:mm:ss`` of a duration."""
  seconds = max(0, int(seconds))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TrainWindow:
  """The train-step metrics of one logging window: fetched once, checked, logged as means.

  ``add`` keeps the device arrays (no host sync); ``flush`` fetches them, passes each step's
  host values to ``check(step, values)`` (which may raise), writes the window's means with
  images/s and the elapsed time, and logs a progress line with the ETA. The learning rate
  written and logged is the one of the flushed step (a schedule's value at that step, not a
  mean over the window); ``implicit_residual_max`` (models with implicit stages) is the
  window's largest. ``bar`` (a ``progress.ProgressBar``) is advanced by ``add`` and
  cleared before each log line.
  """

  def __init__(
    self,
    log: MetricsLog,
    *,
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
    global_batch: int,
    check: Callable[[int, dict], None] | None = None,
    bar=None,
  ):
    self.log, self.check, self.bar = log, check, bar
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self.global_batch = global_batch
    self.pending = []
    self.t_start = self.t_last = time.time()
    self.step_last = start_step

  def add(self, step: int, device_metrics: dict):
    """Keeps the metrics of ``step`` (device arrays) until the next ``flush``."""
    self.pending.append((step, device_metrics))
    if self.bar is not None:
      self.bar.update(step)

  def flush(self, step: int):
    """Fetches, checks and logs the pending steps (nothing to do when none are pending)."""
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending = []
    if self.check is not None:
      for s, m in zip(steps, fetched):
        self.check(s, m)
    now = time.time()
    dt = max(now - self.t_last, 1e-9)
    ips = (step - self.step_last) * self.global_batch / dt
    self.t_last, self.step_last = now, step
    mean = {
      k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if np.ndim(fetched[0][k]) == 0
    }
    if "learning_rate" in mean:  # the rate at the logged step, not the window's mean
      mean["learning_rate"] = float(fetched[-1]["learning_rate"])
    if IMPLICIT_RESIDUAL_MAX in mean:  # the worst solve of the window, not a mean
      mean[IMPLICIT_RESIDUAL_MAX] = float(max(m[IMPLICIT_RESIDUAL_MAX] for m in fetched))
    eta = (self.total_steps - step) * dt / max(len(fetched), 1)
    mean.update(time_images_per_sec=ips, time_elapsed_sec=now - self.t_start)
    self.log.write(step, "train", mean)
    if self.bar is not None:
      self.bar.clear()
      self.bar.status = f"loss {mean['loss']:.4f}"
    implicit = (
      f"  implicit_res {mean[IMPLICIT_RESIDUAL_MAX]:.3g}" if IMPLICIT_RESIDUAL_MAX in mean else ""
    )
    logging.info(
      "step %d/%d (epoch %.2f)  loss %.4f  top1_err %.4f  lr %.4g%s  %.1f img/s  ETA %s",
      step,
      self.total_steps,
      step / self.steps_per_epoch,
      mean["loss"],
      mean["top1_error"],
      mean["learning_rate"],
      implicit,
      ips,
      fmt_time(eta),
    )


def plot_curves(workdir: str, out_path):
  """PNG of the training loss and train/validation/test top-1 error against step."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  recs = read_metrics(workdir)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for split, style in (("train", "-"), ("validation", "o-"), ("test", "s")):
    rs = [r for r in recs if r["split"] == split]
    if not rs:
      continue
    steps = [r["step"] for r in rs]
    ax1.plot(steps, [r["loss"] for r in rs], style, label=split)
    ax2.plot(steps, [100 * r["top1_error"] for r in rs], style, label=split)
  ax1.set(xlabel="step", ylabel="cross-entropy loss", title="loss")
  ax2.set(xlabel="step", ylabel="top-1 error (%)", title="top-1 error")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  epath.Path(out_path).write_bytes(buf.getvalue())
