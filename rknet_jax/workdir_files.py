"""JSON files of a workdir (``model.json``, ``data.json``, ``run.json``, ...) on any file system.

Every path goes through ``etils.epath``, so a workdir may be a local folder or any path orbax
supports (``gs://bucket/run``, ...). Writes are atomic (a temporary file, then a rename);
reads name the file when it is cut or edited into something that is not a JSON object.
"""

import json
import os

from etils import epath

__all__ = ["path", "is_local", "read_json", "write_json"]


def is_local(workdir) -> bool:
  """True for a plain file-system path (no ``scheme://``)."""
  return "://" not in os.fspath(workdir)


def path(workdir, *parts) -> epath.Path:
  """``workdir/parts...`` as an ``epath.Path`` (local paths made absolute)."""
  p = epath.Path(workdir)
  if is_local(workdir):
    p = epath.Path(os.path.abspath(os.fspath(workdir)))
  return p.joinpath(*parts)


def read_json(file: epath.Path, what: str) -> dict | None:
  """The JSON object in ``file``, None if absent; ``ValueError`` naming it if unreadable."""
  try:
    text = epath.Path(file).read_text()
  except (FileNotFoundError, NotADirectoryError):
    return None
  try:
    out = json.loads(text)
  except ValueError as e:
    raise ValueError(
      f"{os.fspath(file)} ({what}) is not valid JSON ({e}); it was cut or edited. Restore "
      "it from a copy, or delete it: a run rewrites it once its checkpoint restores."
    ) from e
  if not isinstance(out, dict):
    raise ValueError(f"{os.fspath(file)} ({what}) holds {type(out).__name__}, not an object")
  return out


def write_json(file: epath.Path, value: dict):
  """Writes ``value`` to ``file`` atomically (temporary file, then rename)."""
  file = epath.Path(file)
  tmp = file.parent / (file.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
  tmp.replace(file)
