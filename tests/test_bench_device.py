"""benchmarks/bench_device.py: the device check runs end to end.

On these CPU-only machines it runs its ``--smoke`` cases (tiny models); the real cases are
the same code with other models and shapes, run on a GPU.
"""

import os

import pytest

from benchmarks import bench_device

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_run_prints_a_row_per_case_with_numbers(run_python, tmp_path):
  out_json = tmp_path / "records.json"
  proc = run_python(
    "-m",
    "benchmarks.bench_device",
    *"--smoke --steps 2 --warmup 1 --dtypes float32 bfloat16".split(),
    f"--json={out_json}",
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| ERKNet")]
  assert len(rows) == 4  # train + infer, two dtypes
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    compile_s, images_per_s, mfu = float(cells[5]), float(cells[6]), float(cells[8])
    assert compile_s > 0 and images_per_s > 0 and mfu >= 0
  assert out_json.exists()


def test_table_reports_errors_and_mfu():
  ok = {
    "model": "M",
    "shape": [8, 8, 3],
    "mode": "train",
    "batch": 4,
    "dtype": "float32",
    "compile_s": 1.5,
    "images_per_s": 100.0,
    "peak_bytes": 2e9,
    "achieved_tflops": 10.0,
  }
  bad = dict(ok, error="timed out after 240 s")
  text = bench_device.table([ok, bad], peak_tflops=100.0)
  assert "| M | 8x8x3 | train | 4 | float32 | 1.5 | 100 | 2.00 | 10.00 |" in text
  assert "timed out after 240 s" in text


def test_model_flops_per_case_follow_the_paper_convention():
  """The MFU numerator: the CIFAR case's forward FLOPs equal rknet_jax.count_flops."""
  import rknet_jax

  name, kwargs, shape, _, _ = bench_device.CASES[0]
  model = rknet_jax.create_model(name, **kwargs)
  assert rknet_jax.count_params(model, shape) == 302_446  # benchmarks/README.md's network
  assert 0.2e9 < rknet_jax.count_flops(model, shape) < 0.3e9
