"""The README quickstart, run exactly as written: a real RKNet on digits, >= 95% accuracy."""

import json
import os
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_quickstart_reaches_95_percent_on_digits(run_python, tmp_path):
  workdir = str(tmp_path / "rknet_digits")
  start = time.time()
  proc = run_python(
    "-m",
    "experiments.main",
    "--config=experiments/configs/digits.py",
    f"--workdir={workdir}",
    unset=("XLA_FLAGS",),  # one CPU device
    timeout=600,
  )
  elapsed = time.time() - start
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["dataset"] == "digits" and results["devices"] == 1
  assert results["test_examples"] == 360
  assert 1 - results["test_top1_error"] >= 0.95, results
  assert results["params"] > 10_000  # a real (small) ERKNet, not a toy
  assert "img/s" in proc.stderr and "ETA" in proc.stderr  # console progress
  # A start summary and phase messages instead of a config dump (the config is in run.json).
  assert "Run: ERKNet-3x1 3x1 on digits, from scratch" in proc.stderr
  assert "Compiling the train step: done in" in proc.stderr
  assert "Testing the final model (step 300) on the test split" in proc.stderr
  # Precise BatchNorm (the digits default) is announced, with the running averages' test pass.
  assert "Re-estimating BatchNorm statistics over 20 training batches: done in" in proc.stderr
  assert "Compiling the BatchNorm statistics step: done in" in proc.stderr
  assert "Testing the running-average BatchNorm statistics too: done in" in proc.stderr
  assert "Config:" not in proc.stderr and "weight_decay_params" not in proc.stderr
  with open(os.path.join(workdir, "run.json")) as f:
    assert json.load(f)["config"]["weight_decay_params"] == "kernels"
  assert elapsed < 180, f"quickstart took {elapsed:.0f} s"
