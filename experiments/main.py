"""Trains and evaluates an RKNet: the command line of ``train.train_and_evaluate``.

  python -m experiments.main --config=experiments/configs/digits.py --workdir=/tmp/rknet_digits

Any config field can be overridden, e.g. ``--config.num_epochs=1 --config.seed=7``.
Rerunning the same command with the same ``--workdir`` resumes from the newest intact
checkpoint. SIGTERM (preemption) checkpoints and exits 0; SIGINT exits 130 after the cleanup.
A refused config or workdir, and a run that stops itself (non-finite state, failed checkpoint
write, workdir held by another run, unreadable checkpoint), print one ``error: ...`` line
naming the cause and exit 1 (``--verbose``: with the traceback; see ``experiments/cli.py``).

Multi-host (one process per host, every process runs the same command):
``--distributed`` calls ``jax.distributed.initialize`` -- with ``--coordinator_address``,
``--num_processes`` and ``--process_id`` when given, else from the cluster environment
(SLURM, TPU pods, Kubernetes...). Setting ``RKNET_DISTRIBUTED=1`` is the same as passing
``--distributed``.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize (multi-host). Also RKNET_DISTRIBUTED=1."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_integer(
  "initialization_timeout", 300, "Seconds to wait for all processes in jax.distributed.initialize."
)
config_flags.DEFINE_config_file(
  "config", None, "Training configuration (a file in experiments/configs).", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed():
  """``jax.distributed.initialize`` when ``--distributed`` or ``RKNET_DISTRIBUTED=1``."""
  if not (FLAGS.distributed or os.environ.get("RKNET_DISTRIBUTED", "") in ("1", "true")):
    return
  import jax

  kwargs = {}
  if FLAGS.coordinator_address:
    kwargs["coordinator_address"] = FLAGS.coordinator_address
  if FLAGS.num_processes is not None:
    kwargs["num_processes"] = FLAGS.num_processes
  if FLAGS.process_id is not None:
    kwargs["process_id"] = FLAGS.process_id
  jax.distributed.initialize(initialization_timeout=FLAGS.initialization_timeout, **kwargs)
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def load_config():
  """``FLAGS.config``; a ``--config`` file that does not exist exits 1 with one line."""
  path = config_flags.get_config_filename(FLAGS["config"])
  file = path.split(":", 1)[0]
  if not os.path.isfile(file):
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    sys.exit(
      f"error: --config={path}: no such file {os.path.abspath(file)!r}. The configs are the "
      f"files in {here} (e.g. --config=experiments/configs/digits.py)."
    )
  return FLAGS.config


def exit_now(code: int):
  """Exits with ``code`` even if orbax threads of a failed checkpoint write still wait.

  By now ``train_and_evaluate`` has run its cleanup (checkpoint manager closed, metrics
  flushed, workdir lock released); a failed write can leave orbax threads waiting forever for
  signals that will not come, and a normal exit would join them and hang.
  """
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = load_config()
  # TensorFlow (tf.data only) must never take accelerator memory.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from experiments import metrics

  metrics.console_logging()
  initialize_distributed()
  from experiments import (
    cli,
    train,
  )

  # The full config goes to the workdir's run.json; the log opens with a short summary.
  try:
    result = train.train_and_evaluate(config, FLAGS.workdir)
  except BaseException as e:
    exit_now(cli.report(e))  # a refusal: one line; anything else: its traceback
  if result.get("preempted"):
    logging.warning("Stopped by SIGTERM at step %d (checkpointed).", result["step"])
    sys.exit(0)


if __name__ == "__main__":
  from experiments import huge_pages

  huge_pages.reexec_with_huge_pages()
  from experiments import cli

  cli.run(main)
