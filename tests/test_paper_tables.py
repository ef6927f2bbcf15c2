"""experiments.paper_tables: every row of the paper's Tables 1-3 matches.

Counting all 16 models traces each once (``eval_shape`` of init, ``make_jaxpr`` of apply);
no array of their size is allocated.
"""

import dataclasses

import pytest

from experiments import paper_tables
from rknet_jax import registry


@pytest.fixture(scope="module")
def results():
  return [paper_tables.measure(row) for row in paper_tables.ROWS]


def test_rows_are_the_paper_tables():
  per_table = [sum(r.table == t for r in paper_tables.ROWS) for t in (1, 2, 3)]
  assert per_table == [8, 5, 3]
  names = registry.list_models()
  assert all(r.name in names for r in paper_tables.ROWS)
  # every ready-made RKNet is a row of the tables
  rknets = [n for n in names if n.startswith(("ERKNet", "IRKNet"))]
  assert len(rknets) == 13
  assert set(rknets) <= {r.name for r in paper_tables.ROWS}


def test_agrees_to_printed_precision():
  assert paper_tables.agrees(0.7444, "0.74")
  assert paper_tables.agrees(0.7499, "0.74")
  assert paper_tables.agrees(0.7300, "0.74")
  assert not paper_tables.agrees(0.7510, "0.74")
  assert not paper_tables.agrees(0.7290, "0.74")
  assert paper_tables.agrees(15.39, "15.3")
  assert not paper_tables.agrees(15.41, "15.3")
  assert paper_tables.agrees(5.209, "5.20")


def test_all_rows_match_the_paper(results):
  table = paper_tables.format_results(results)
  bad = [r.row.label for r in results if not r.match]
  assert not bad, f"rows not matching the paper: {bad}\n{table}"


def test_main_prints_table_and_exit_status(results, monkeypatch, capsys):
  by_name = {(res.row.name, res.row.input_shape): res for res in results}

  def cached(row):
    res = by_name[(row.name, row.input_shape)]
    return dataclasses.replace(res, row=row)

  monkeypatch.setattr(paper_tables, "measure", cached)
  assert paper_tables.main(["--table", "3"]) == 0
  out = capsys.readouterr().out
  assert "ERKNet-3×1 3×1 6×1 2×1-B" in out and "3/3 rows match" in out
  # a paper value our count does not reach makes the script fail
  first = paper_tables.ROWS[0]
  wrong = dataclasses.replace(first, params_m="0.80")
  monkeypatch.setattr(paper_tables, "ROWS", (wrong,) + paper_tables.ROWS[1:])
  assert paper_tables.main(["--table", "1"]) == 1
  out = capsys.readouterr().out
  assert "0/1" not in out and "7/8 rows match" in out and "NO" in out
