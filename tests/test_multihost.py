"""Multi-host data parallelism: two processes on 127.0.0.1 (CPU, gloo collectives).

Each process runs ``python -m experiments.main --distributed`` with 2 local CPU devices, so
the job has a 4-device global mesh and each host feeds half of every global batch. The
per-step training losses must equal those of one process driving 4 devices with the same
global batch.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import steps, train
from experiments.configs import digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
OVERRIDES = {
  "model": "ERKNet-1x1 1x1",
  "growth_rate": 4,
  "num_train_steps": STEPS,
  "log_every_steps": 1,
  "checkpoint_every_steps": 3,
  "validation_size": 0,
  "eval_batch_size": 64,
  "prefetch": 1,
}


def free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(l) for l in f]
  return [r["loss"] for r in recs if r["split"] == "train"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
  workdir = str(tmp_path / "two_hosts")
  port = free_port()
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
  )
  cmd = [
    sys.executable,
    "-m",
    "experiments.main",
    "--config=experiments/configs/digits.py",
    f"--workdir={workdir}",
    "--distributed",
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
    "--initialization_timeout=120",
  ]
  cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  procs, logs = [], [tmp_path / f"process_{i}.log" for i in range(2)]
  try:
    for i in range(2):
      # Each process logs to a file: a pipe read only after the other process ends could fill
      # up and block its writer, while the other process waits for it in a collective.
      with open(logs[i], "w") as log:
        procs.append(
          subprocess.Popen(
            cmd + [f"--process_id={i}"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
          )
        )
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:  # never leave a child behind, whatever failed
      if p.poll() is None:
        p.kill()
        p.wait(30)
  outs = [log.read_text() for log in logs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert "process 1 of 2, 2 local / 4 global devices" in outs[1]
  two = train_losses(workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["processes"] == 2 and results["devices"] == 4
  assert results["test_examples"] == 360

  # Reference: this process (8 virtual devices), a 4-device mesh, same global batch.
  config = digits.get_config()
  config.update(OVERRIDES)
  ref_dir = str(tmp_path / "one_host")
  ref = train.train_and_evaluate(config, ref_dir, mesh=steps.make_mesh(jax.devices()[:4]))
  one = train_losses(ref_dir)
  assert len(one) == len(two) == STEPS
  np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)
  assert one[0] != one[-1]
  # Final weights agree to ~1e-6, so at most a borderline example may flip.
  assert abs(results["test_top1_error"] - ref["test_top1_error"]) <= 1 / 360 + 1e-12
