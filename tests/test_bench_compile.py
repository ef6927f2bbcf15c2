"""benchmarks/bench_compile.py: the compile tables, one subprocess per case."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "benchmarks.bench_compile", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=True,
  )


@pytest.mark.slow
def test_compile_table_row_and_json(tmp_path):
  out = tmp_path / "r.json"
  done = _run(
    "--tables", "compile", "--models", "DenseNet-BC-16-k8", "--batch", "2", "--json_out", str(out)
  )
  rows = [l for l in done.stdout.splitlines() if l.startswith("| DenseNet-BC-16-k8 |")]
  assert len(rows) == 1, done.stdout
  (result,) = json.loads(out.read_text())
  assert result["table"] == "compile" and result["batch"] == 2
  assert result["train_compile_s"] > 0 and result["infer_compile_s"] > 0
  assert result["train_hlo"] > 100
  assert f"{result['train_compile_s']:.1f}" in rows[0]


def test_a_case_over_its_time_limit_is_reported_not_waited_for():
  done = _run("--tables", "compile", "--models", "DenseNet-BC-16-k8", "--timeout", "0.5")
  assert "| DenseNet-BC-16-k8 | > 0 s, stopped |  |  |  |" in done.stdout, done.stdout


def test_a_failing_case_is_one_error_cell():
  done = _run("--tables", "compile", "--models", "ERKNet-2x1 2x1")
  row = [l for l in done.stdout.splitlines() if l.startswith("| ERKNet-2x1 2x1 |")][0]
  assert "error: ValueError: ERKNet-2x1 2x1: growth_rate is required" in row
  assert row.count("growth_rate is required") == 1
