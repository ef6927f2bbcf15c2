"""The README's library example runs as written and computes what it says."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title):
  text = README.read_text()
  section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert blocks, f"no python block under '## {title}'"
  return blocks[0]


def test_readme_library_example_runs():
  namespace = {}
  exec(compile(_section_code("Using the library from JAX code"), str(README), "exec"), namespace)  # pylint: disable=exec-used
  # dy/dt = -y cos t, y(0) = 1  =>  y(t) = exp(-sin t)
  np.testing.assert_allclose(namespace["y1"]["x"], np.exp(-np.sin(0.1)), rtol=1e-5)
  np.testing.assert_allclose(namespace["yT"]["x"], np.exp(-np.sin(1.0)), rtol=1e-5)
  assert namespace["logits"].shape == (8, 10)
  assert np.all(np.isfinite(namespace["logits"]))


def test_readme_table_of_paper_rows_is_the_paper_module_table():
  from experiments import paper_tables  # pylint: disable=g-import-not-at-top
  assert paper_tables.markdown() in README.read_text()
