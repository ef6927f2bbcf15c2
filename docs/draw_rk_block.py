"""Draws docs/rk_block.png, the README's picture of the paper's idea (one RK time-step).

  python docs/draw_rk_block.py

Needs matplotlib (in the [train] extra). A block of an RKNet is one Runge-Kutta time-step:
stage slopes z_1..z_s are computed by convolutional layers (each stage sees y_n and, for an
explicit method, the earlier stages: DenseNet's dense connections), and the step adds them up,
y_{n+1} = y_n + h sum_i b_i z_i (paper section 3, equations 2-3).
"""

import pathlib

import matplotlib

matplotlib.use("Agg")
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "rk_block.png"


def _box(ax, x, y, text, color, w=1.3, h=0.7):
  ax.add_patch(
    FancyBboxPatch(
      (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05", fc=color, ec="black", lw=1
    )
  )
  ax.text(x, y, text, ha="center", va="center", fontsize=11)


def _arrow(ax, start, end, rad=0.0, color="black"):
  ax.add_patch(
    FancyArrowPatch(
      start,
      end,
      arrowstyle="-|>",
      mutation_scale=12,
      lw=1,
      color=color,
      connectionstyle=f"arc3,rad={rad}",
    )
  )


def draw(path=OUT):
  """Writes the picture to ``path``."""
  fig, ax = plt.subplots(figsize=(9, 3.0), dpi=100)
  ax.set_xlim(-0.2, 10.4)
  ax.set_ylim(-0.9, 2.6)
  ax.axis("off")
  _box(ax, 0.6, 1.0, r"$y_n$", "#dddddd", w=0.9)
  xs = [2.4, 4.2, 6.0]
  for i, x in enumerate(xs, 1):
    _box(ax, x, 1.0, "conv layers\n" + rf"$h\,b_{i} z_{i}$", "#cfe2f3")
  _box(ax, 7.9, 1.0, r"$\Sigma$", "#fce5cd", w=0.7)
  _box(ax, 9.6, 1.0, r"$y_{n+1}$", "#dddddd", w=0.9)
  _arrow(ax, (1.05, 1.0), (xs[0] - 0.7, 1.0))
  for a, b in zip(xs, xs[1:]):
    _arrow(ax, (a + 0.7, 1.0), (b - 0.7, 1.0))
  _arrow(ax, (0.6, 1.38), (xs[1] - 0.3, 1.38), rad=-0.35, color="#3d85c6")
  _arrow(ax, (0.6, 1.38), (xs[2] - 0.3, 1.38), rad=-0.35, color="#3d85c6")
  _arrow(ax, (xs[0], 1.38), (xs[2] - 0.1, 1.38), rad=-0.35, color="#3d85c6")
  for x in xs:
    _arrow(ax, (x, 0.62), (7.75, 0.72), rad=0.25, color="#e69138")
  _arrow(ax, (0.6, 0.62), (7.7, 0.68), rad=0.3, color="#999999")
  _arrow(ax, (8.25, 1.0), (9.15, 1.0))
  ax.text(
    5.2,
    -0.75,
    r"one block = one Runge-Kutta time-step:  "
    r"$y_{n+1} = y_n + h\sum_i b_i z_i$,   $z_i = f(t_n + c_i h,\ y_n + h\sum_j a_{ij} z_j)$",
    ha="center",
    fontsize=10,
  )
  ax.text(
    3.3,
    2.45,
    "explicit (ERKNet): each stage sees y_n and the earlier stages (a DenseNet dense block)",
    ha="center",
    fontsize=9,
    color="#3d85c6",
  )
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)


if __name__ == "__main__":
  draw()
  print(OUT)
