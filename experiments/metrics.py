"""Run metrics: ``metrics.jsonl``, TensorBoard event files, and the loss/error curves PNG.

The TensorBoard writer emits the standard event-file format (TFRecord-framed ``Event``
protos, ``brain.Event:2``) with TensorBoard's own protos and record framing, so it needs
the ``tensorboard`` package but not TensorFlow (importing TensorFlow costs ~8 s, more
than the whole digits quickstart spends compiling).
"""

import json
import logging as pylogging
import os
import socket
import time

METRICS_FILE = "metrics.jsonl"


class _QuietOrbax(pylogging.Filter):
  """Drops orbax's per-save INFO chatter so the console shows the run's progress."""

  def filter(self, record):
    if "/orbax/" not in record.pathname:
      return True
    # Saves without validation metrics are expected between evaluations.
    message = record.getMessage()
    return (record.levelno >= pylogging.WARNING
            and "did not provide metrics" not in message
            and "directory is read only" not in message)


def console_logging():
  """absl INFO logging on the console, without orbax's per-checkpoint INFO lines."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())


class TensorBoardWriter:
  """Scalar summaries in TensorBoard's event-file format (``tensorboard --logdir=DIR``)."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "wb")
    self._records = RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event):
    self._records.write(event.SerializeToString())

  def scalar(self, tag: str, value: float, step: int):
    summary = self._summary_pb2.Summary(
        value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self):
    self._file.flush()

  def close(self):
    if not self._file.closed:
      self._file.close()


def read_metrics(workdir: str) -> list:
  """The records of ``workdir/metrics.jsonl`` (a line cut by a kill is skipped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return out


def plot_curves(workdir: str, out_path: str):
  """PNG of the training loss and train/validation/test top-1 error against step."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
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
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
