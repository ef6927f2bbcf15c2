"""What the command-line entry points print when they refuse: one line, no traceback.

``experiments.main``, ``experiments.evaluate``, ``experiments.study`` and
``experiments.prepare_data`` start through :func:`run` (``app.run`` with this module's flag
parser and error handling). A *refusal* -- a config or data check (``ValueError``), a
missing file, a run that stopped itself (``experiments.train.RUN_STOPPED``: non-finite
state, failed checkpoint write, busy workdir, unreadable checkpoint, no download) -- prints
``error: <message>`` (the message names the bad value and the fix) and exits 1, with the
traceback only when ``--verbose`` is given or ``RKNET_VERBOSE=1`` is set. Anything else is a
bug and keeps its traceback. A mistyped ``--config.FIELD`` gets "did you mean", and a
refused value the user typed with look-alike or other non-ASCII characters gets a second
line naming their code points (``U+2010 HYPHEN where '-' was probably meant``).
"""

from collections.abc import Callable, Iterable, Sequence
import difflib
import os
import re
import sys
import traceback
import unicodedata

VERBOSE_ENV = "RKNET_VERBOSE"

# Characters commonly typed (or pasted) in place of an ASCII one; NFKC covers the rest
# (full-width forms, ligatures, non-breaking spaces).
_LOOKALIKES = {
  "\u2010": "-",
  "\u2011": "-",
  "\u2012": "-",
  "\u2013": "-",
  "\u2014": "-",
  "\u2212": "-",
  "\u00ad": "-",
  "\u2018": "'",
  "\u2019": "'",
  "\u201c": '"',
  "\u201d": '"',
  "\u00d7": "x",
  "\u200b": "",
  "\u2044": "/",
  "\u2215": "/",
  # Cyrillic and Greek letters drawn like Latin ones.
  "\u0430": "a",
  "\u0435": "e",
  "\u043e": "o",
  "\u0440": "p",
  "\u0441": "c",
  "\u0443": "y",
  "\u0445": "x",
  "\u0456": "i",
  "\u0410": "A",
  "\u0412": "B",
  "\u0415": "E",
  "\u041a": "K",
  "\u041c": "M",
  "\u041d": "H",
  "\u041e": "O",
  "\u0420": "P",
  "\u0421": "C",
  "\u0422": "T",
  "\u0425": "X",
  "\u03bf": "o",
  "\u0391": "A",
  "\u0392": "B",
  "\u0395": "E",
  "\u0399": "I",
  "\u039a": "K",
  "\u039c": "M",
  "\u039d": "N",
  "\u039f": "O",
  "\u03a1": "P",
  "\u03a4": "T",
  "\u03a7": "X",
}


def ascii_lookalike(char: str) -> str | None:
  """The ASCII text ``char`` was probably meant as (None if there is no obvious one)."""
  if char in _LOOKALIKES:
    return _LOOKALIKES[char]
  folded = unicodedata.normalize("NFKC", char)
  return folded if folded != char and folded.isascii() else None


def fold_lookalikes(text: str) -> str:
  """``text`` with every look-alike character replaced by its ASCII counterpart."""
  return "".join(c if c.isascii() else (ascii_lookalike(c) or c) for c in text)


def describe_non_ascii(text: str) -> str:
  """``'ERKNet‐6x1' contains U+2010 HYPHEN where '-' was probably meant`` (one clause per
  distinct non-ASCII character of ``text``)."""
  parts = []
  for char in dict.fromkeys(c for c in text if not c.isascii()):
    name = f"U+{ord(char):04X} {unicodedata.name(char, 'UNNAMED CHARACTER')}"
    meant = ascii_lookalike(char)
    parts.append(
      f"{name} where {meant!r} was probably meant" if meant is not None else f"{name} (not ASCII)"
    )
  return f"{text!r} contains " + ", ".join(parts)


def non_ascii_note(message: str, argv: Sequence[str]) -> str | None:
  """A line naming the non-ASCII characters of the command-line values ``message`` quotes.

  Only characters the user typed (they occur in ``argv``) and the message shows, and not
  already named by it (``U+XXXX``): a refused value that looks like an allowed one then
  shows why it is not.
  """
  typed = [a for a in argv if not a.isascii()]
  shown = {
    c
    for c in message
    if not c.isascii() and f"U+{ord(c):04X}" not in message and any(c in a for a in typed)
  }
  if not shown:
    return None
  values = []
  for arg in typed:
    name, eq, value = arg.partition("=")
    for part in [value, name] if eq else [arg]:
      if any(c in shown for c in part) and part not in values:
        values.append(part)
        break
  return "; ".join(describe_non_ascii(v) for v in values)


def did_you_mean(name: str, allowed: Iterable[str]) -> str | None:
  """The entry of ``allowed`` closest to ``name`` (look-alikes folded first), or None."""
  allowed = list(allowed)
  folded = fold_lookalikes(name)
  if folded in allowed and folded != name:
    return folded
  close = difflib.get_close_matches(folded, allowed, n=1, cutoff=0.7)
  return close[0] if close else None


# ------------------------------------------------------------------- config overrides
def config_override_error(argv: Sequence[str], config, flag: str = "config") -> str | None:
  """The first ``--config.PATH=...`` of ``argv`` naming no field of ``config``, explained.

  Returns e.g. ``--config.lerning_rate=0.1: the config has no field 'lerning_rate'; did
  you mean --config.learning_rate?``, or None when every override names a field.
  """
  from ml_collections import config_dict

  for arg in argv:
    m = re.match(rf"--{re.escape(flag)}\.([^=]+)", arg)
    if not m:
      continue
    keys, node = m.group(1).split("."), config
    for i, key in enumerate(keys):
      if not isinstance(node, config_dict.ConfigDict) or (not node.keys() and i):
        break  # a leaf, or an open dict (model_kwargs): ml_collections decides
      if key in node:
        node = node[key]
        continue
      field = ".".join(keys[: i + 1])
      close = did_you_mean(key, node.keys())
      hint = (
        f"did you mean --{flag}.{'.'.join(keys[:i] + [close])}?"
        if close
        else f"its fields{' under ' + '.'.join(keys[:i]) if i else ''} are: "
        f"{', '.join(sorted(node.keys()))}"
      )
      return f"{arg}: the config has no field {field!r}; {hint}"
  return None


def config_field_hint(names: Iterable[str], config) -> str:
  """`` ('lerning_rate' is no config field either: did you mean learning_rate?)`` for
  ``names`` (e.g. a study's override keys) that are no config field but close to one."""
  hints = []
  for name in names:
    if name in config:
      continue
    close = did_you_mean(name, config.keys())
    if close:
      hints.append(f"{name!r} is no config field either: did you mean {close}?")
  return f" ({'; '.join(hints)})" if hints else ""


# --------------------------------------------------------------------------- refusals
def refusal_types() -> tuple:
  """The exceptions that are clear refusals (message, no traceback), not bugs."""
  types = [ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError]
  train = sys.modules.get("experiments.train")  # imported by the entry points that train
  if train is not None:
    types.extend(train.RUN_STOPPED)
  prepare = sys.modules.get("experiments.data.prepare")
  if prepare is not None:
    types.append(prepare.DownloadUnavailableError)
  try:
    from absl import (
      app,
      flags,
    )

    types.extend([flags.Error, app.UsageError])
  except ImportError:
    pass
  return tuple(types)


def verbose(argv: Sequence[str] = ()) -> bool:
  """Whether refusals show their traceback: ``--verbose`` or ``RKNET_VERBOSE=1``."""
  if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
    return True
  if "--verbose" in argv:
    return True
  try:
    from absl import flags

    return "verbose" in flags.FLAGS and bool(flags.FLAGS["verbose"].value)
  except Exception:
    return False


def refusal_message(error: BaseException, argv: Sequence[str] = ()) -> str:
  """``error: <message>`` (plus a line on look-alike characters where there are any)."""
  message = str(error).strip() or type(error).__name__
  if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError)) and (
    error.filename is not None and error.strerror
  ):
    message = f"{error.filename}: {error.strerror}"
  note = non_ascii_note(message, argv)
  return f"error: {message}" + (f"\nerror: {note}" if note else "")


def report(error: BaseException, argv: Sequence[str] | None = None) -> int:
  """Prints ``error`` the CLI way and returns the exit code (1; 130 for Ctrl-C).

  A refusal (``refusal_types``) is one line (two with a look-alike note) on stderr, its
  traceback only with ``--verbose``; anything else is printed with its traceback.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if isinstance(error, KeyboardInterrupt):
    print("error: interrupted (Ctrl-C)", file=sys.stderr)
    return 130
  refusal = isinstance(error, refusal_types())
  if not refusal or verbose(argv):
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
  if refusal:
    print(refusal_message(error, argv), file=sys.stderr)
  sys.stderr.flush()
  return 1


def guard(main: Callable, exit_fn: Callable[[int], None] = sys.exit) -> Callable:
  """``main`` with its refusals reported by :func:`report` and ``exit_fn(1)``."""

  def guarded(argv):
    try:
      return main(argv)
    except SystemExit:
      raise
    except BaseException as e:
      exit_fn(report(e))

  guarded.__doc__ = main.__doc__
  return guarded


def _plain_text(error: BaseException) -> str:
  """``error``'s message as one line (unwrapping ``AttributeError(KeyError('...'))``)."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  return re.sub(r"\s+", " ", text).strip() or type(error).__name__


def _config_of(flag, argv: Sequence[str]) -> object | None:
  """The ConfigDict a ``DEFINE_config_file`` flag names in ``argv`` (None if unloadable)."""
  try:
    if flag.value is not None:
      return flag.value
  except Exception:
    pass
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name == f"--{flag.name}":
      path = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
      try:
        return flag.parser.parse(path)
      except Exception:
        return None
  return None


def parse_flags(argv: Sequence[str], config_flag: str | None = "config"):
  """``FLAGS(argv)`` with one-line errors; a bad ``--config.FIELD`` gets "did you mean"."""
  from absl import flags

  FLAGS = flags.FLAGS
  try:
    return FLAGS(argv)
  except Exception as e:
    explained = None
    if config_flag is not None and config_flag in FLAGS:
      config = _config_of(FLAGS[config_flag], argv[1:])
      if config is not None:
        explained = config_override_error(argv[1:], config, config_flag)
    if explained is None:
      explained = _plain_text(e)
    if verbose(argv):
      traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    note = non_ascii_note(explained, argv[1:])
    print(f"error: {explained}" + (f"\nerror: {note}" if note else ""), file=sys.stderr)
    sys.exit(1)


def run(
  main: Callable, *, exit_fn: Callable[[int], None] = sys.exit, config_flag: str | None = "config"
):
  """``absl.app.run(main)`` for an entry point: ``--verbose``, one-line refusals."""
  from absl import (
    app,
    flags,
  )

  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool(
      "verbose", False, f"Show the Python traceback of a refused command (also {VERBOSE_ENV}=1)."
    )
  app.run(guard(main, exit_fn), flags_parser=lambda argv: parse_flags(argv, config_flag))
