"""The command line's refusals (experiments/cli.py): one ``error: ...`` line, no traceback
unless asked, "did you mean" for config typos, look-alike characters named.

Mostly in-process (the helpers every entry point uses); a few real subprocesses check that
main, evaluate and study print no traceback for a clear refusal.
"""

import pytest

from experiments import cli, study, train
from experiments.configs import digits


def test_config_typos_get_did_you_mean():
  config = digits.get_config()
  assert cli.config_override_error(["--config.lerning_rate=0.1"], config) == (
    "--config.lerning_rate=0.1: the config has no field 'lerning_rate'; did you mean "
    "--config.learning_rate?"
  )
  # A Cyrillic 'е' (U+0435) in place of 'e': same suggestion, and the character is named.
  typed = "--config.l\u0435arning_rate=0.1"
  message = cli.config_override_error([typed], config)
  assert message.endswith("did you mean --config.learning_rate?")
  assert cli.non_ascii_note(message, [typed]) == (
    "'--config.l\u0435arning_rate' contains U+0435 CYRILLIC SMALL LETTER IE where 'e' was "
    "probably meant"
  )
  assert cli.config_override_error(["--config.modle_kwargs.dropout_rate=0.1"], config) == (
    "--config.modle_kwargs.dropout_rate=0.1: the config has no field 'modle_kwargs'; did "
    "you mean --config.model_kwargs?"
  )
  # Known fields (and the open model_kwargs dict) are left to ml_collections.
  assert (
    cli.config_override_error(
      ["--config.learning_rate=0.1", "--workdir=x", "--config.model_kwargs.dropout_rate=0.1"],
      config,
    )
    is None
  )
  far = cli.config_override_error(["--config.zzz=1"], config)
  assert "no field 'zzz'; its fields are: " in far and "learning_rate" in far


def test_look_alike_characters_are_named_with_their_code_points():
  assert cli.describe_non_ascii("ERKNet\u20106x1") == (
    "'ERKNet\u20106x1' contains U+2010 HYPHEN where '-' was probably meant"
  )
  assert cli.describe_non_ascii("run\uff11 caf\u00e9") == (
    "'run\uff11 caf\u00e9' contains U+FF11 FULLWIDTH DIGIT ONE where '1' was probably "
    "meant, U+00E9 LATIN SMALL LETTER E WITH ACUTE (not ASCII)"
  )
  argv = ["--workdir=/runs/a\u2010b", "--split=test"]
  assert cli.non_ascii_note("/runs/a\u2010b/run.json not found", argv) == (
    "'/runs/a\u2010b' contains U+2010 HYPHEN where '-' was probably meant"
  )
  # Not when the message shows no character the user typed, or names it already.
  assert cli.non_ascii_note("bad value 'x'", argv) is None
  assert cli.non_ascii_note("'a\u2010b': U+2010 HYPHEN is not ASCII", argv) is None
  assert cli.did_you_mean("learning\u2010rate", ["learning-rate"]) == "learning-rate"


def test_a_refusal_is_one_line_and_a_bug_keeps_its_traceback(capsys, monkeypatch):
  monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
  for error in (
    ValueError("config.momentum must be in [0, 1); got 1.5"),
    train.NonFiniteError("non-finite training state at step 3"),
    FileNotFoundError(2, "No such file or directory", "/data/x.npz"),
  ):
    try:
      raise error
    except Exception as e:
      assert cli.report(e, argv=[]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
      f"error: {error}"
      if not isinstance(error, OSError)
      else "error: /data/x.npz: No such file or directory"
    ]
  try:
    raise ValueError("bad")
  except ValueError as e:
    assert cli.report(e, argv=["--verbose"]) == 1
  err = capsys.readouterr().err
  assert "Traceback" in err and err.rstrip().endswith("error: bad")
  try:
    {}["missing"]  # a bug, not a refusal
  except KeyError as e:
    assert cli.report(e, argv=[]) == 1
  assert "Traceback" in capsys.readouterr().err
  codes = []
  cli.guard(lambda argv: (_ for _ in ()).throw(ValueError("no")), codes.append)(["prog"])
  assert codes == [1] and capsys.readouterr().err == "error: no\n"


def test_study_override_typos_get_did_you_mean(tmp_path):
  with pytest.raises(
    ValueError,
    match=r"unknown option\(s\) 'lerning_rate'.*\('lerning_rate' "
    r"is no config field either: did you mean learning_rate\?\)",
  ):
    study.check_entries(
      digits.get_config(), study.parse_models("ERKNet-1x1 1x1|lerning_rate=1"), 1, str(tmp_path)
    )


@pytest.fixture
def run_cli(run_python):
  """``python -m module *args`` on one CPU device, without a verbose switch from outside."""
  return lambda module, *args: run_python("-m", module, *args, unset=("XLA_FLAGS", cli.VERBOSE_ENV))


def error_lines(proc):
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return [l for l in proc.stderr.splitlines() if l.startswith("error: ")]


def test_the_entry_points_refuse_in_one_line_without_a_traceback(run_cli, tmp_path):
  config = "--config=experiments/configs/digits.py"
  # A config typo (was: an ml_collections traceback).
  lines = error_lines(
    run_cli("experiments.main", config, f"--workdir={tmp_path / 'a'}", "--config.lerning_rate=0.1")
  )
  assert lines == [
    "error: --config.lerning_rate=0.1: the config has no field "
    "'lerning_rate'; did you mean --config.learning_rate?"
  ]
  # A refusal from the checks (was: the message, then a ~60-line traceback).
  lines = error_lines(
    run_cli("experiments.main", config, f"--workdir={tmp_path / 'b'}", "--config.batch_size=0")
  )
  assert lines == [
    "error: config.batch_size must be a positive integer; got 0 (global training batch)"
  ]
  # --verbose shows the traceback too.
  proc = run_cli(
    "experiments.main", config, f"--workdir={tmp_path / 'b'}", "--config.batch_size=0", "--verbose"
  )
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  # evaluate on a folder that is no workdir, typed with a look-alike hyphen (was: only a
  # traceback).
  lines = error_lines(run_cli("experiments.evaluate", f"--workdir={tmp_path}/run\u20101"))
  assert lines == [
    f"error: {tmp_path}/run\u20101/run.json not found: not a training workdir",
    f"error: '{tmp_path}/run\u20101' contains U+2010 HYPHEN where '-' was probably meant",
  ]
  # study: an unknown override key.
  lines = error_lines(
    run_cli(
      "experiments.study",
      config,
      f"--workdir={tmp_path / 's'}",
      "--models=ERKNet-1x1 1x1|lerning_rate=0.1",
      "--seeds=1",
    )
  )
  assert len(lines) == 1 and "did you mean learning_rate?" in lines[0]
