"""The run directory (``--workdir``): its lock, its metadata and its results.

Every path goes through ``etils.epath``, so a workdir may be any path orbax supports
(local, ``gs://``, ...). Files:

* ``run.lock``: held while a run uses the workdir (host, pid, start time). A second run is
  refused naming the holder; a lock whose holder is gone (same host, pid not running) is
  taken over, atomically on a local file system (see ``WorkdirLock``).
* ``run.json``: the config of the newest session, its identity (which model the workdir
  holds), ``history``, one entry per start (time, host, start step, total steps, and that
  session's recipe and data-stream values), and ``changes``: every field a resume changed,
  with the step from which the new value applies (so the top-level config never stands for
  the whole run when it does not). Written only after the checkpoint restore succeeded, so a
  refused or failed start never rewrites it.
* ``results.json``, ``metrics.jsonl``, ``curves.png``, ``tensorboard/``: outputs. A run that
  starts from scratch next to such outputs (checkpoints deleted, or another run's files)
  moves them to ``previous_outputs/<time>/`` first: nothing finished is overwritten.
"""

import contextlib
import json
import os
import socket
import time

from absl import logging
from etils import epath

from rknet_jax.workdir_files import is_local, path, read_json, write_json

RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
LOCK_FILE = "run.lock"
LOCK_GUARD_FILE = "run.lock.guard"  # flock'ed while the lock is taken (local file systems)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
PREVIOUS_OUTPUTS_SUBDIR = "previous_outputs"
OUTPUTS = (RESULTS_FILE, METRICS_FILE, CURVES_FILE, TENSORBOARD_SUBDIR)


def check_path(workdir: str):
  """Pure check: ``workdir`` is not an existing file (reads only)."""
  if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
    raise ValueError(f"workdir must be a non-empty path; got {workdir!r}")
  p = path(workdir)
  while not p.exists() and p.parent != p:
    p = p.parent  # the nearest existing folder must be a folder
  if p.exists() and not p.is_dir():
    raise ValueError(
      f"workdir {os.fspath(workdir)!r} cannot be created: "
      f"{os.fspath(p)!r} is an existing file, not a directory"
    )


def probe_write(directory: epath.Path):
  """Creates and removes a file: the only reliable writability test (root, read-only mounts)."""
  probe = directory / f".write_probe.{socket.gethostname()}.{os.getpid()}"
  probe.write_text("ok")
  probe.unlink()


def prepare(workdir: str, subdirs=()):
  """Creates ``workdir`` (and ``subdirs``) and proves each writable; ``ValueError`` if not."""
  for d in [path(workdir)] + [path(workdir, s) for s in subdirs]:
    try:
      d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ValueError(f"{os.fspath(d)!r} cannot be created: {e}") from e
    if not d.is_dir():
      raise ValueError(f"{os.fspath(d)!r} is not a writable directory")
    try:
      probe_write(d)
    except OSError as e:
      raise ValueError(f"{os.fspath(d)!r} is not writable: {e}") from e


# ------------------------------------------------------------------------------- lock
class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir's lock."""


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


class WorkdirLock:
  """``run.lock``: one run per workdir. Use as a context manager or ``acquire``/``release``.

  The lock file records ``host``, ``pid`` and ``started``. On a local file system the whole
  take (create, or check the holder and take over a stale lock) runs under an exclusive
  ``fcntl.flock`` of ``run.lock.guard``, and the lock file is created with ``O_EXCL``: of
  several runs taking over the same stale lock at once, exactly one wins (the others then
  see it held by a live run). Elsewhere (``gs://``: no exclusive create, no locks) it is
  written and read back: best effort, two runs started within moments of each other may
  both proceed, so start one run per workdir at a time there.
  """

  def __init__(self, workdir: str):
    self.file = path(workdir, LOCK_FILE)
    self.record = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    self.held = False

  def _holder(self) -> dict | None:
    try:
      return json.loads(self.file.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}  # unreadable or half-written: treated as held by an unknown run

  @contextlib.contextmanager
  def _guard(self):
    """Serialises takes of this workdir's lock between processes (local file systems)."""
    if not is_local(self.file):
      yield
      return
    import fcntl

    fd = os.open(os.fspath(self.file.parent / LOCK_GUARD_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      yield
    finally:
      os.close(fd)  # releases the flock

  def _create(self) -> bool:
    text = json.dumps(self.record)
    if is_local(self.file):
      try:
        fd = os.open(os.fspath(self.file), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return True
    if self.file.exists():
      return False
    self.file.write_text(text)
    return self._holder() == self.record

  def acquire(self):
    """Takes the lock, taking over a stale one; raises ``WorkdirBusy`` naming the holder."""
    with self._guard():
      for _ in range(3):
        if self._create():
          self.held = True
          return self
        holder = self._holder()
        if holder is None:
          continue  # released meanwhile
        same_host = holder.get("host") == self.record["host"]
        pid = holder.get("pid")
        if same_host and isinstance(pid, int) and pid != os.getpid() and not _pid_running(pid):
          logging.warning(
            "Taking over the stale lock %s of pid %d (no longer running): %s",
            self.file,
            pid,
            holder,
          )
          self.file.unlink(missing_ok=True)
          continue
        raise WorkdirBusy(
          f"workdir {os.fspath(self.file.parent)!r} is in use by another run (host "
          f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
          f"{holder.get('started', '?')}; lock file {os.fspath(self.file)}). Wait for it "
          "to end or use another --workdir; if that run is gone (e.g. its machine died), "
          "delete the lock file."
        )
    raise WorkdirBusy(f"could not take the lock {os.fspath(self.file)}")

  def release(self):
    """Removes the lock file if this run holds it."""
    if self.held and self._holder() == self.record:
      self.file.unlink(missing_ok=True)
    self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# ----------------------------------------------------------------------- metadata
def read_run_file(workdir: str) -> dict | None:
  """``run.json`` of ``workdir`` (None when there is none)."""
  return read_json(path(workdir, RUN_FILE), "the run's config and history")


def write_run_file(
  workdir: str, run: dict, *, start_step: int, total_steps: int, session: dict | None = None
):
  """Writes ``run.json``: ``run`` plus the previous ``history`` and this start appended.

  ``session`` holds this session's values of the fields a resume may change (recipe, data
  stream); it goes into the history entry, and on a resume (``start_step > 0``) each value
  that differs from the previous session's (or, for a ``run.json`` from before sessions were
  recorded, from its ``config``) is appended to ``changes`` as ``{"step", "field", "from",
  "to"}``. A start from scratch begins a new list.
  """
  previous = read_run_file(workdir) or {}
  history = list(previous.get("history", []))
  changes = list(previous.get("changes", [])) if start_step > 0 else []
  if session is not None and start_step > 0 and previous:
    before = (history[-1].get("session") if history else None) or {}
    for field, value in session.items():
      old = before.get(field, previous.get("config", {}).get(field, value))
      if old != value:
        changes.append({"step": int(start_step), "field": field, "from": old, "to": value})
  entry = {
    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "start_step": int(start_step),
    "total_steps": int(total_steps),
  }
  if session is not None:
    entry["session"] = session
  history.append(entry)
  write_json(path(workdir, RUN_FILE), dict(run, history=history, changes=changes))


def read_results(workdir: str) -> dict | None:
  """``results.json`` of ``workdir`` (None when there is none)."""
  return read_json(path(workdir, RESULTS_FILE), "the finished run's results")


def write_results(workdir: str, results: dict):
  """Writes ``results.json`` atomically."""
  write_json(path(workdir, RESULTS_FILE), results)


def move_aside_outputs(workdir: str) -> epath.Path | None:
  """Moves existing outputs (``OUTPUTS``) to ``previous_outputs/<time>/``; returns it or None.

  Called when a run starts from scratch: outputs already there belong to a run whose
  checkpoints are gone (or to someone else), and are kept rather than overwritten.
  """
  found = [path(workdir, name) for name in OUTPUTS if path(workdir, name).exists()]
  if not found:
    return None
  dest = path(workdir, PREVIOUS_OUTPUTS_SUBDIR, time.strftime("%Y%m%dT%H%M%S"))
  n = 0
  while dest.exists():
    n += 1
    dest = dest.parent / f"{dest.name.split('.')[0]}.{n}"
  dest.mkdir(parents=True)
  for src in found:
    src.rename(dest / src.name)
  logging.warning(
    "%s holds outputs (%s) but no checkpoint to resume from: they were moved to "
    "%s (not deleted) and the run starts from scratch.",
    workdir,
    ", ".join(p.name for p in found),
    dest,
  )
  return dest
