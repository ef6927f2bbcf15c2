"""Converts a copy of MNIST you already have into the npz that ``--config.dataset=npz:FILE`` reads.

For machines without dataset downloads (TFDS's ``--config.dataset=mnist`` downloads MNIST on
first use). Input: a folder holding the four IDX files of the official distribution, as
downloaded from the MNIST site, gzipped or not::

  train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
  t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

Output: ``train_images`` uint8 (60000, 28, 28, 1), ``train_labels`` int64 (60000,),
``test_images`` (10000, 28, 28, 1), ``test_labels`` (10000,): the official split.

  python -m experiments.tools.mnist_to_npz --idx_dir=DIR --out=mnist.npz
  python -m experiments.main --config=experiments/configs/default.py --workdir=runs/mnist \\
      --config.dataset=npz:mnist.npz --config.download=False

An existing ``--out`` file is never overwritten.
"""

import argparse
import gzip
import os
import sys

import numpy as np

FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX magic numbers: 0x00000801 (unsigned bytes, 1 dimension), 0x00000803 (3 dimensions).
_MAGIC = {1: 0x801, 3: 0x803}


def read_idx(path: str, ndim: int) -> np.ndarray:
  """The uint8 array of one IDX file (gzipped or not), checked against its header."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
  if magic != _MAGIC[ndim]:
    raise ValueError(
      f"{path}: not an IDX file of {ndim}-dimensional uint8 data "
      f"(magic {magic!r}, expected {_MAGIC[ndim]:#x})"
    )
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  body = data[4 + 4 * ndim :]
  if len(body) != int(np.prod(shape)):
    raise ValueError(
      f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes), the file "
      f"holds {len(body)} bytes (cut or damaged)"
    )
  return np.frombuffer(body, np.uint8).reshape(shape)


def _find(idx_dir: str, stem: str) -> str:
  dotted = stem.replace("-idx", ".idx")
  for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
    path = os.path.join(idx_dir, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
    f"{idx_dir}: no {stem} or {stem}.gz (the four MNIST IDX files "
    f"{', '.join(FILES.values())} are needed)"
  )


def convert(idx_dir: str, out: str) -> dict:
  """Reads the four IDX files in ``idx_dir`` and writes ``out``; returns the arrays."""
  if os.path.exists(out):
    raise FileExistsError(f"{out} exists; not overwriting it (remove it or choose another --out)")
  arrays = {}
  for key, stem in FILES.items():
    arrays[key] = read_idx(_find(idx_dir, stem), 1 if key.endswith("labels") else 3)
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if len(images) != len(labels):
      raise ValueError(f"{idx_dir}: {len(images)} {split} images but {len(labels)} labels")
    arrays[f"{split}_images"] = images[..., None]
    arrays[f"{split}_labels"] = labels.astype(np.int64)
  tmp = out + ".partial.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, out)
  return arrays


def main(argv=None):
  """``python -m experiments.tools.mnist_to_npz --idx_dir=DIR --out=FILE``."""
  parser = argparse.ArgumentParser(
    prog="python -m experiments.tools.mnist_to_npz", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--idx_dir", required=True, help="folder with the four MNIST IDX files")
  parser.add_argument("--out", required=True, help="npz file to write (must not exist)")
  args = parser.parse_args(argv)
  try:
    arrays = convert(args.idx_dir, args.out)
  except (OSError, ValueError) as e:
    print(f"mnist_to_npz: {e}", file=sys.stderr)
    return 1
  print(
    f"{args.out}: {len(arrays['train_labels'])} train / {len(arrays['test_labels'])} test "
    f"images of shape {arrays['train_images'].shape[1:]}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
