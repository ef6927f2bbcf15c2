"""benchmarks/bench_data_setup.py: per-run counts of data reads and the setup time."""

import pytest

from benchmarks import bench_data_setup


@pytest.mark.slow
def test_each_run_in_one_process_reads_and_checks_digits_once():
  rows = bench_data_setup.measure("digits", 2)
  assert [r["run"] for r in rows] == [1, 2]
  for row in rows:  # the second run of the process reads its data again, once
    assert row["counts"] == {"load_official": 1, "check_official": 1, "holdout": 1}
    assert 0 < row["setup_s"] <= row["run_s"]


def test_bad_arguments_are_refused_in_one_line(capsys):
  with pytest.raises(SystemExit):
    bench_data_setup.main(["--data", "npz", "--images", "100"])
  assert "--images must be >= 10000 (5,000 are held out), got 100" in capsys.readouterr().err
