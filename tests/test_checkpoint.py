"""Never lose work: SIGTERM, SIGKILL, SIGINT at an arbitrary step, a damaged newest checkpoint, and
never hang: a checkpoint write that fails mid-run stops the process.

Real subprocesses of ``python -m experiments.main`` on digits with a tiny ERKNet. One run
goes through every kind of interruption in turn and must end with exactly (bit for bit)
the parameters, metrics and results of an uninterrupted run of the same command.
"""

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import rknet_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60  # 3 epochs of digits at batch 64 (20 steps each)
TIMEOUT = 240  # seconds any one child may take


def command(workdir):
  return [
    sys.executable,
    "-m",
    "experiments.main",
    "--config=experiments/configs/digits.py",
    f"--workdir={workdir}",
    "--config.model=ERKNet-1x1 1x1",
    "--config.growth_rate=4",
    f"--config.num_train_steps={STEPS}",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=4",
    "--config.keep_checkpoints=2",
    "--config.eval_batch_size=72",
    "--config.prefetch=1",
  ]


class Child:
  """A training subprocess whose log lines are read by a thread (bounded waits)."""

  def __init__(self, workdir, extra=()):
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      PYTHONUNBUFFERED="1",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    self.proc = subprocess.Popen(
      command(workdir) + list(extra),
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    self.lines, self.log = queue.Queue(), []
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self.log.append(line)
      self.lines.put(line)
    self.lines.put(None)

  def wait_for(self, pattern, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
      try:
        line = self.lines.get(timeout=1)
      except queue.Empty:
        continue
      if line is None:
        break
      m = re.search(pattern, line)
      if m:
        return m
    self.kill()
    raise AssertionError(f"child never logged {pattern!r}; log tail:\n{self.text()[-3000:]}")

  def wait(self, timeout=TIMEOUT):
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(30)

  def text(self):
    return "".join(self.log)


@pytest.fixture
def children():
  started = []

  def start(workdir, *extra):
    c = Child(workdir, extra)
    started.append(c)
    return c

  yield start
  for c in started:  # never leave a child running, whatever failed
    c.kill()


def finished_run(workdir):
  """Final params (load_checkpoint), metrics without timings, results without timings."""
  _, variables, _ = rknet_jax.load_checkpoint(workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = [{k: v for k, v in json.loads(l).items() if not k.startswith("time_")} for l in f]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  results.pop("train_wall_time_sec")
  return jax.device_get(variables), metrics, results


def assert_same_run(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a[0]), jax.tree.leaves(b[0])
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)  # bit for bit
  assert a[1] == b[1]
  assert a[2] == b[2]


def checkpoint_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


@pytest.mark.slow
def test_sigterm_sigkill_and_damaged_checkpoint_end_like_an_uninterrupted_run(
  run_python, tmp_path, children
):
  ref_dir, work = str(tmp_path / "reference"), str(tmp_path / "interrupted")
  ref_child = children(ref_dir)

  # 1. SIGTERM (preemption): checkpoint the current step and exit 0.
  c = children(work)
  c.wait_for(r"step 6/")
  c.proc.send_signal(signal.SIGTERM)
  assert c.wait() == 0, c.text()[-3000:]
  stopped = int(re.search(r"Stopped by SIGTERM at step (\d+)", c.text()).group(1))
  assert 6 <= stopped < STEPS
  assert checkpoint_steps(work)[-1] == stopped

  # 2. Resume, then SIGKILL at whatever step it has reached. By the log line of step
  #    stopped+13 at least three saves (every 4 steps) were started, and orbax starts a
  #    save only after the previous one committed, so one newer checkpoint is on disk.
  c = children(work)
  assert int(c.wait_for(r"Resumed from checkpoint step (\d+)").group(1)) == stopped
  c.wait_for(rf"step {stopped + 13}/")
  c.proc.kill()
  assert c.wait() == -signal.SIGKILL

  # 3. Resume, then SIGINT (Ctrl-C): the in-flight save commits, the lock is released and
  #    the process exits 130.
  c = children(work)
  interrupted = int(c.wait_for(r"Resumed from checkpoint step (\d+)").group(1))
  assert stopped < interrupted < STEPS
  c.wait_for(rf"step {interrupted + 3}/")
  c.proc.send_signal(signal.SIGINT)
  assert c.wait() == 130, c.text()[-3000:]
  assert not os.path.exists(os.path.join(work, "run.lock"))

  # 4. Resume from the newest checkpoint and finish.
  c = children(work)
  resumed = int(c.wait_for(r"Resumed from checkpoint step (\d+)").group(1))
  assert interrupted <= resumed < STEPS
  assert c.wait() == 0, c.text()[-3000:]

  assert ref_child.wait() == 0, ref_child.text()[-3000:]
  reference = finished_run(ref_dir)
  assert reference[2]["steps"] == STEPS and reference[2]["test_examples"] == 360
  assert_same_run(finished_run(work), reference)

  # 5. Damage the newest checkpoint (truncate its array files): the rerun warns, moves it
  #    aside (kept, not deleted), resumes from the previous one, and ends the same.
  steps = checkpoint_steps(work)
  newest, previous = steps[-1], steps[-2]
  damaged_dir = os.path.join(work, "checkpoints", str(newest))
  truncated = 0
  for root, _, files in os.walk(os.path.join(damaged_dir, "model")):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 16 and not name.startswith("_"):
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
        truncated += 1
  assert truncated
  os.remove(os.path.join(work, "results.json"))
  c = children(work)
  assert c.wait() == 0, c.text()[-3000:]
  assert re.search(rf"Checkpoint step {newest} .* is damaged", c.text())
  assert f"Resumed from checkpoint step {previous}" in c.text()
  kept = os.listdir(os.path.join(work, "damaged_checkpoints"))
  assert any(k.startswith(f"{newest}-") for k in kept)
  assert_same_run(finished_run(work), reference)

  # The evaluation CLI reproduces the run's exact test numbers from its final checkpoint.
  two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  out = run_python(
    "-m",
    "experiments.evaluate",
    f"--workdir={ref_dir}",
    env=two_devices,
    timeout=TIMEOUT,
    check=True,
  ).stdout
  evaluated = json.loads(out.strip().splitlines()[-1])
  assert evaluated["step"] == STEPS and evaluated["examples"] == 360
  assert evaluated["top1_error"] == reference[2]["test_top1_error"]

  # 6. A committed step with a whole item missing is damaged too: load_checkpoint skips it
  #    (with a warning) and gives the previous step; asked for it by number, it raises.
  steps = checkpoint_steps(ref_dir)
  shutil.rmtree(os.path.join(ref_dir, "checkpoints", str(steps[-1]), "model"))
  _, fallback, _ = rknet_jax.load_checkpoint(ref_dir)
  _, previous_vars, _ = rknet_jax.load_checkpoint(ref_dir, step=steps[-2])
  for x, y in zip(jax.tree.leaves(fallback), jax.tree.leaves(previous_vars)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match=f"checkpoint step {steps[-1]} .* cannot be restored"):
    rknet_jax.load_checkpoint(ref_dir, step=steps[-1])


def make_read_only(folder):
  """Makes ``folder`` read-only for this user (root: ``chattr +i``); returns the undo.

  Where neither works, the folder is replaced by a file, which fails every write as well.
  """
  if os.geteuid() != 0:
    os.chmod(folder, 0o555)
    return lambda: os.chmod(folder, 0o755)
  if subprocess.run(["chattr", "+i", folder], capture_output=True).returncode == 0:
    return lambda: subprocess.run(["chattr", "-i", folder], check=True)
  os.rename(folder, folder + ".kept")
  with open(folder, "w") as f:
    f.write("a file where the checkpoints folder was")
  return lambda: (os.remove(folder), os.rename(folder + ".kept", folder))


@pytest.mark.slow
def test_a_checkpoint_folder_turning_read_only_mid_run_stops_the_process_within_seconds(
  tmp_path, children
):
  """Writable at start (checked), read-only from the first save on: every write fails in
  orbax's thread, and orbax's waiting threads would block a normal exit forever. The run must
  exit non-zero naming the failed write; the workdir lock is released."""
  work = str(tmp_path / "run")
  c = children(work, "--config.num_train_steps=100000")
  c.wait_for(r"from scratch")  # checks passed, compiling: no checkpoint yet
  undo = make_read_only(os.path.join(work, "checkpoints"))
  try:
    failed_at = time.time()
    code = c.wait(timeout=120)
    took = time.time() - failed_at
  finally:
    undo()
  assert code == 1, c.text()[-3000:]
  assert took < 60
  assert re.search(r"error: writing step \d+ .* failed", c.text())
  assert not os.path.exists(os.path.join(work, "run.lock"))
  assert not os.path.exists(os.path.join(work, "results.json"))
