"""What a person reads while a run trains: the start summary, phase messages, the progress bar.

* :func:`start_summary` -- one block at the start: model (params, GFLOPs), data (examples per
  split), schedule (steps, epochs), devices and the workdir (the full config is in the
  workdir's ``run.json``, not in the log).
* :func:`phase` -- "compiling the train step..." / "... done in 4.1 s" around a slow phase
  that would otherwise be a silent gap (compilation, the final test pass).
* :class:`ProgressBar` -- on an interactive terminal, one self-updating line with the step,
  the percentage and the ETA; when stderr is not a terminal (a file, a scheduler's log) it
  draws nothing and the runner's periodic log lines are the progress.
* :func:`quiet_third_party_logs` -- drops log records of other libraries that ask nothing of
  the user, each matched by logger and message (never a whole library or level).
"""

import contextlib
import logging as pylogging
import sys
import time
from typing import Optional, TextIO

from absl import logging
import jax

from experiments.metrics import fmt_time

# --------------------------------------------------------------------------- noise filter
# (logger name prefix, start of the message, highest level dropped): records of other
# libraries that carry no action for the user. Anything else, and anything more severe
# than the level given, still reaches the console.
THIRD_PARTY_NOISE = (
  # jax probing for a TPU on a machine without one (libtpu installed, no TPU attached).
  ("jax._src.xla_bridge", "Unable to initialize backend 'tpu'", pylogging.INFO),
  ("jax._src.xla_bridge", "Unable to initialize backend 'cuda'", pylogging.INFO),
  ("jax._src.xla_bridge", "Unable to initialize backend 'rocm'", pylogging.INFO),
  # TFDS announcing where it reads a prepared dataset from, on every run.
  ("absl", "Load dataset info from", pylogging.INFO),
  ("absl", "Reusing dataset", pylogging.INFO),
  ("absl", "Constructing tf.data.Dataset", pylogging.INFO),
  ("absl", "Fields info.[", pylogging.INFO),
)


class ThirdPartyNoise(pylogging.Filter):
  """Drops the records :data:`THIRD_PARTY_NOISE` lists (by logger, message start and level)."""

  def filter(self, record):
    message = None
    for logger, start, max_level in THIRD_PARTY_NOISE:
      if record.levelno > max_level or not record.name.startswith(logger):
        continue
      if message is None:
        message = record.getMessage()
      if message.startswith(start):
        return False
    return True


def quiet_third_party_logs():
  """Installs :class:`ThirdPartyNoise` on the absl handler (the console) once."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, ThirdPartyNoise) for f in handler.filters):
    handler.addFilter(ThirdPartyNoise())


# --------------------------------------------------------------------------- start summary
def start_summary(
  *,
  config,
  workdir: str,
  start_step: int,
  total_steps: int,
  steps_per_epoch: int,
  split_sizes: dict,
  input_shape,
  params: int,
  gflops: float,
  num_devices: int,
) -> str:
  """Logs (and returns) the block that opens a run's log."""
  where = "from scratch" if start_step == 0 else f"resuming at step {start_step:,}"
  k = config.get("growth_rate")
  sizes = " / ".join(
    f"{split_sizes.get(s, 0):,} {s}"
    for s in ("train", "validation", "test")
    if split_sizes.get(s, 0) or s != "validation"
  )
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  lines = [
    f"Run: {config.model} on {config.dataset}, {where}",
    f"  model     {config.model}{f' (k = {k})' if k else ''}: {params:,} parameters, "
    f"{gflops:.4g} GFLOPs per {'x'.join(map(str, input_shape))} image",
    f"  data      {config.dataset}: {sizes} examples; batch {config.batch_size}",
    f"  schedule  {total_steps:,} steps = {total_steps / steps_per_epoch:g} epochs of "
    f"{steps_per_epoch:,} steps; learning rate {config.learning_rate:g} "
    f"({config.lr_schedule})",
    f"  devices   {num_devices} x {', '.join(kinds)} ({jax.default_backend()}), "
    f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}",
    f"  workdir   {workdir} (full config: run.json)",
  ]
  text = "\n".join(lines)
  logging.info("%s", text)
  return text


# --------------------------------------------------------------------------- phases
@contextlib.contextmanager
def phase(what: str, bar: Optional["ProgressBar"] = None):
  """Logs ``what...`` before a slow phase and ``what: done in N s`` after it."""
  if bar is not None:
    bar.clear()
  logging.info("%s...", what[:1].upper() + what[1:])
  start = time.perf_counter()
  yield
  logging.info("%s: done in %.1f s", what[:1].upper() + what[1:], time.perf_counter() - start)


def announce_first_call(fn, what: str, bar: Optional["ProgressBar"] = None):
  """``fn`` (a jitted function) whose first call, when it compiles, is a :func:`phase`.

  The first call of a ``jax.jit`` function traces and compiles before it dispatches, which is
  the silent gap at the start of training; a function already compiled in this process (the
  runner reuses them across runs) is called without a message.
  """
  state = {"first": True}

  def wrapped(*args, **kwargs):
    if not state["first"]:
      return fn(*args, **kwargs)
    state["first"] = False
    cache_size = getattr(fn, "_cache_size", None)
    if cache_size is not None and cache_size() > 0:
      return fn(*args, **kwargs)
    with phase(what, bar):
      return fn(*args, **kwargs)

  return wrapped


# --------------------------------------------------------------------------- progress bar
class ProgressBar:
  """A one-line progress bar with ETA on an interactive terminal; nothing otherwise.

  ``update(step)`` costs a clock read (redraws at most every ``min_interval`` seconds and
  never waits for the device); ``clear()`` erases the line so that a log line can be
  printed, and the next ``update`` draws it again.
  """

  def __init__(
    self,
    total_steps: int,
    start_step: int = 0,
    *,
    stream: TextIO | None = None,
    width: int = 30,
    min_interval: float = 0.2,
    enabled: bool | None = None,
  ):
    self.stream = sys.stderr if stream is None else stream
    if enabled is None:
      enabled = jax.process_index() == 0 and _is_tty(self.stream)
    self.enabled = enabled
    self.total, self.start_step, self.width = total_steps, start_step, width
    self.min_interval = min_interval
    # The ETA's reference point: the first update (after the first step, i.e. after the train
    # step compiled), so that compilation does not inflate the estimate.
    self.t_start, self._started = time.time(), False
    self._drawn, self._last_draw, self.status = False, 0.0, ""

  def line(self, step: int, now: float) -> str:
    """The bar's text at ``step``."""
    frac = min(max(step / max(self.total, 1), 0.0), 1.0)
    filled = int(round(frac * self.width))
    done = step - self.start_step
    eta = (self.total - step) * (now - self.t_start) / done if done > 0 else None
    return (
      f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{self.total} "
      f"{100 * frac:3.0f}%  ETA {fmt_time(eta) if eta is not None else '?'}"
      f"{'  ' + self.status if self.status else ''}"
    )

  def update(self, step: int, force: bool = False):
    if not self.enabled:
      return
    now = time.time()
    if not self._started:
      self.t_start, self.start_step, self._started = now, step, True
    if not force and now - self._last_draw < self.min_interval and step < self.total:
      return
    self._last_draw = now
    self.stream.write("\r\033[K" + self.line(step, now))
    self.stream.flush()
    self._drawn = True

  def clear(self):
    if self.enabled and self._drawn:
      self.stream.write("\r\033[K")
      self.stream.flush()
      self._drawn = False

  def close(self):
    self.clear()


def _is_tty(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False
