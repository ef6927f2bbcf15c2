"""benchmarks/bench_compile.py: the compile tables, one subprocess per case."""

import json

import pytest


@pytest.fixture
def bench_compile(run_python):
  """``python -m benchmarks.bench_compile *args``, which must exit 0."""
  return lambda *args: run_python("-m", "benchmarks.bench_compile", *args, check=True)


@pytest.mark.slow
def test_compile_table_row_and_json(bench_compile, tmp_path):
  out = tmp_path / "r.json"
  done = bench_compile(
    "--tables", "compile", "--models", "DenseNet-BC-16-k8", "--batch", "2", "--json_out", str(out)
  )
  rows = [l for l in done.stdout.splitlines() if l.startswith("| DenseNet-BC-16-k8 |")]
  assert len(rows) == 1, done.stdout
  (result,) = json.loads(out.read_text())
  assert result["table"] == "compile" and result["batch"] == 2
  assert result["train_compile_s"] > 0 and result["infer_compile_s"] > 0
  assert result["train_hlo"] > 100
  assert f"{result['train_compile_s']:.1f}" in rows[0]


def test_a_case_over_its_time_limit_is_reported_not_waited_for(bench_compile):
  done = bench_compile("--tables", "compile", "--models", "DenseNet-BC-16-k8", "--timeout", "0.5")
  assert "| DenseNet-BC-16-k8 | > 0 s, stopped |  |  |  |" in done.stdout, done.stdout


def test_a_failing_case_is_one_error_cell(bench_compile):
  done = bench_compile("--tables", "compile", "--models", "ERKNet-2x1 2x1")
  row = [l for l in done.stdout.splitlines() if l.startswith("| ERKNet-2x1 2x1 |")][0]
  assert "error: ValueError: ERKNet-2x1 2x1: growth_rate is required" in row
  assert row.count("growth_rate is required") == 1
