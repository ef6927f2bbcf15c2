"""What identifies the data a run trained on: its fingerprint, kept in the run's data.json.

A resumed run and `experiments.evaluate` compare the fingerprint of the data they are given
with the run's and refuse a difference, naming what changed (`describe_change`), unless the
user asks to continue on new data (`config.allow_data_change=True`).

| source | fingerprint (compared fields) |
| --- | --- |
| `npz:FILE` | size in bytes and SHA-256 of the file |
| `folder:PATH` | the sorted list of image files (relative path, size, modification time), as a count, total bytes and SHA-256 of the list |
| TFDS (`cifar10`, `tfds:NAME`, ImageNet, ...) | name, version, split sizes (`svhn_extra` included) |
| `digits` | scikit-learn's digits with the fixed test split (fixed forever) |

Only contents count: the same file under another path has the same fingerprint.
"""

import hashlib
import os

from experiments.data import folder as folder_lib
from experiments.data import in_memory, prepare, tfds_utils

_CHUNK = 1 << 20
# The fields that identify the data's contents, per kind (others, such as the path, inform).
_COMPARED = {
  "npz": ("size", "sha256"),
  "folder": ("files", "bytes", "sha256"),
  "tfds": ("name", "version", "splits", "svhn_extra"),
  "digits": ("test_size", "split_seed"),
}


def _sha256_of_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


def _folder_listing(root: str):
  """(relative path, size, mtime_ns) of every image file the folder source reads, sorted."""
  out = []
  for rel in folder_lib.image_paths(root):
    st = os.stat(os.path.join(root, rel))
    out.append((rel, st.st_size, st.st_mtime_ns))
  return out


def fingerprint(settings) -> dict:
  """The fingerprint (module docstring) of the data `settings` (a parsed config) reads."""
  s = settings
  if s.source == "npz":
    return {
      "kind": "npz",
      "path": s.target,
      "size": os.path.getsize(s.target),
      "sha256": _sha256_of_file(s.target),
    }
  if s.source == "folder":
    listing = _folder_listing(s.target)
    digest = hashlib.sha256("".join(f"{p}\t{n}\t{t}\n" for p, n, t in listing).encode())
    return {
      "kind": "folder",
      "path": s.target,
      "files": len(listing),
      "bytes": sum(n for _, n, _ in listing),
      "sha256": digest.hexdigest(),
    }
  if s.source == "digits":
    return {
      "kind": "digits",
      "source": "scikit-learn load_digits",
      "test_size": in_memory.DIGITS_TEST_SIZE,
      "split_seed": in_memory._DIGITS_SPLIT_SEED,
    }
  if tfds_utils.tfds_is_mocked():
    builder = tfds_utils.import_tfds().builder(s.target, data_dir=s.data_dir)
  else:
    builder = prepare.builder_for(s.target, s.data_dir)
  return {
    "kind": "tfds",
    "name": builder.name,
    "version": str(builder.info.version),
    "splits": {k: int(v.num_examples) for k, v in sorted(builder.info.splits.items())},
    "svhn_extra": bool(s.svhn_extra),
  }


def describe_change(old: dict | None, new: dict) -> str | None:
  """How the data of fingerprint `new` differs from the run's `old`, or None if it does not
  (also None when `old` is None: a run written before fingerprints, nothing to compare)."""
  if not old:
    return None
  kind = old.get("kind")
  if kind != new.get("kind"):
    return f"the data source changed since this run started: {kind} -> {new.get('kind')}"
  fields = _COMPARED.get(kind, tuple(sorted(set(old) | set(new))))
  changed = [f for f in fields if old.get(f) != new.get(f)]
  if not changed:
    return None

  def show(value):
    return value[:12] + "..." if isinstance(value, str) and len(value) == 64 else value

  what = {
    "npz": f"the npz file {new.get('path')}",
    "folder": f"the image files of {new.get('path')}",
    "tfds": f"TFDS dataset {new.get('name')}",
  }.get(kind, "the data")
  units = {"size": " bytes", "bytes": " bytes"}
  labels = {"bytes": "total size"}  # not "bytes 11200 bytes -> ..."
  diffs = ", ".join(
    f"{labels.get(f, f)} {show(old.get(f))}{units.get(f, '')} -> "
    f"{show(new.get(f))}{units.get(f, '')}"
    for f in changed
  )
  return f"{what} changed since this run started: {diffs}"
