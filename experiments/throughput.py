"""Training throughput: the full runner vs the bare jitted train step (same model, batch).

  python -m experiments.throughput --model="ERKNet-6x1 6x1 6x1" --growth_rate=36 \
      --batch_size=64 --steps=20

Bare: ``make_train_step`` on a fixed synthetic CIFAR-shaped batch, timed after warm-up.
Runner: ``train_and_evaluate`` on ``tfds.testing.mock_data`` CIFAR-10 (the real in-memory
pipeline, global-array assembly, metric fetches, logging), images/s of the windows after
the first (which holds the compilation). Checkpoints are off the measured windows.
"""

import json
import os
import tempfile
import time

from absl import app, flags
import jax
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "ERKNet-6x1 6x1 6x1", "Model name.")
flags.DEFINE_integer("growth_rate", 36, "k.")
flags.DEFINE_integer("batch_size", 64, "Global batch.")
flags.DEFINE_integer("steps", 20, "Timed steps (after warm-up).")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")


def main(argv):
  from experiments import metrics

  metrics.console_logging()
  del argv
  from experiments import optim, run_config, steps, train
  from experiments.configs import default
  from experiments.data import tfds_utils

  c = default.get_config()
  c.model, c.growth_rate, c.batch_size, c.dtype = (
    FLAGS.model,
    FLAGS.growth_rate,
    FLAGS.batch_size,
    FLAGS.dtype,
  )
  c.lr_schedule, c.validation_size, c.download, c.data_dir = "constant", 0, False, "/nonexistent"
  window = max(FLAGS.steps // 2, 1)
  c.num_train_steps, c.log_every_steps = 2 * window + window, window
  c.checkpoint_every_steps = 10**6
  c.eval_batch_size = c.batch_size

  # Bare step.
  mesh = steps.make_mesh()
  model = run_config.build_model(c, 10)
  sched = optim.learning_rate_schedule(c, 1000, 10**6)
  tx = optim.make_optimizer(c, sched)
  state = steps.create_train_state(model, tx, (32, 32, 3), 0, mesh)
  step = steps.make_train_step(model, tx, sched, mesh, state)
  rng = np.random.default_rng(0)
  batch = steps.global_batch(
    {
      "image": rng.normal(size=(c.batch_size, 32, 32, 3)).astype(np.float32),
      "label": rng.integers(0, 10, c.batch_size).astype(np.int32),
    },
    mesh,
    c.batch_size,
  )
  for _ in range(2):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, m = step(state, batch)
  jax.block_until_ready((state, m))
  bare = FLAGS.steps * c.batch_size / (time.perf_counter() - t)

  # Runner.
  tfds = tfds_utils.import_tfds()
  with (
    tempfile.TemporaryDirectory() as workdir,
    tfds.testing.mock_data(num_examples=c.batch_size * (c.num_train_steps + 1)),
  ):
    train.train_and_evaluate(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      recs = [json.loads(l) for l in f]
  ips = [r["time_images_per_sec"] for r in recs if r["split"] == "train"][1:]
  runner = float(np.mean(ips))
  print(
    json.dumps(
      {
        "model": c.model,
        "growth_rate": c.growth_rate,
        "batch": c.batch_size,
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "bare_images_per_sec": round(bare, 1),
        "runner_images_per_sec": round(runner, 1),
        "runner_over_bare": round(runner / bare, 3),
      }
    )
  )


if __name__ == "__main__":
  app.run(main)
