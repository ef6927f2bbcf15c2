"""A study: several models x several seeds on one config, summarised in a table and a plot.

  python -m experiments.study --config=experiments/configs/digits.py --workdir=runs/study \\
      --models="ERKNet-3x1 3x1,DenseNet-BC-22-k12|growth_rate=12" --seeds=3 \\
      [--config.FIELD=VALUE ...]

Every (model, seed) is an ordinary run of :func:`experiments.train.train_and_evaluate` in
``WORKDIR/runs/<model>/seed_<seed>`` with ``config.model`` and ``config.seed`` set.  An
existing run is keyed on its whole resolved config (the one its ``run.json`` recorded),
checked for every run before any training:

* the same config: a finished run (its ``results.json``) is reused, an interrupted one is
  resumed from its checkpoint;
* only the training length (``LENGTH_FIELDS``) or fields that do not change what a run
  computes (``RESULT_NEUTRAL_FIELDS``) differ: the run is handed to the runner again, which
  continues it from its newest checkpoint toward the new total (the learning-rate schedule
  follows the new total from there) or, when it already got that far, tests it again;
* any other field differs: the study refuses, naming the run directory and each differing
  field with both values.

Then it writes

* ``WORKDIR/study.json``: the base config (the fields every run shares, from the runs'
  ``run.json``), and one record per model: name, family, its config overrides, params,
  GFLOPs, per-seed test top-1 errors, their mean and standard deviation (ddof = 1), the
  epochs each run trained (from its ``results.json``), training time;
* ``WORKDIR/study.md``: the same as a Markdown table, with the base config's fields that
  differ from ``experiments/configs/default.py`` below it (``RESULT_NEUTRAL_FIELDS``
  left out);
* ``WORKDIR/study.png``: test error against parameters, mean +- std per model, one marker
  per family.

A ``--models`` entry is a model name, optionally followed by ``|field=value`` overrides of
config fields or of ``config.model_kwargs`` for that model alone (e.g.
``RK4Net-1x3 1x3|growth_rate=24|learn_coefficients=True``); entries are separated by
commas.  Every entry is checked (the model is built abstractly) before any training.
"""

import ast
from collections.abc import Sequence
import hashlib
import json
import os
import re
from typing import Any

import numpy as np

from experiments import rundir
from rknet_jax import families as rknet_families

STUDY_JSON = "study.json"
STUDY_MD = "study.md"
STUDY_PNG = "study.png"
RUNS_DIR = "runs"
RESULTS_FILE = rundir.RESULTS_FILE

# The training length: a run recorded with another value is continued toward the new total
# by the runner (or, when already past it, tested again), never retrained from scratch.
LENGTH_FIELDS = ("num_epochs", "num_train_steps")
# Fields that do not change what a run computes (logging and its warnings, checkpoint cadence
# and retention, input prefetch, the exact padded evaluation's batch, where prepared data is
# found): a run recorded with other values is handed to the runner again and records the new
# ones. Any field not listed here or in LENGTH_FIELDS must be equal for a run to be reused.
RESULT_NEUTRAL_FIELDS = (
  "log_every_steps",
  "implicit_residual_tolerance",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "prefetch",
  "eval_batch_size",
  "data_dir",
  "manual_dir",
  "download",
)
# What the study does with each (model, seed) run (see ``plan_run``).
TRAIN, RESUME, CONTINUE, REUSE = "train", "resume", "continue", "reuse"
_UNSET = "(not set)"  # a field one of two compared configs lacks

FAMILIES = rknet_families.study_labels()  # ERKNet, IRKNet, DenseNet, CliqueNet
_MARKERS = {
  "ERKNet": "o",
  "IRKNet": "s",
  "DenseNet": "^",
  "CliqueNet": "v",
  "tableau RKNet": "D",
  "RKNet": "P",
}


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_models(text: str) -> list[tuple[str, str, dict[str, Any]]]:
  """Parses ``--models``: returns ``(entry, model name, overrides)`` per entry.

  Raises:
    ValueError: for an empty list, an empty entry, a malformed ``field=value`` or a
      repeated entry, naming it.
  """
  entries = [e.strip() for e in (text or "").split(",")]
  if not text or not any(entries):
    raise ValueError(
      "--models is empty: give one or more model names separated by "
      "commas, e.g. --models='ERKNet-3x1 3x1,DenseNet-BC-22-k12'"
    )
  out, seen = [], set()
  for entry in entries:
    if not entry:
      raise ValueError(f"--models={text!r} has an empty entry (two commas in a row?)")
    if entry in seen:
      raise ValueError(f"--models lists {entry!r} twice")
    seen.add(entry)
    name, *parts = [p.strip() for p in entry.split("|")]
    overrides = {}
    for part in parts:
      key, eq, value = part.partition("=")
      if not eq or not key.strip().isidentifier():
        raise ValueError(f"--models entry {entry!r}: {part!r} is not field=value")
      overrides[key.strip()] = _literal(value.strip())
    out.append((entry, name, overrides))
  return out


def family(name: str) -> str:
  """The model family of a name, for the plot's markers."""
  for fam in FAMILIES:
    if name.startswith(fam):
      return fam
  return "RKNet" if name.startswith("RKNet") else "tableau RKNet"


def entry_config(base, name: str, overrides: dict[str, Any], seed: int):
  """``base`` with ``model``, ``seed`` and the entry's overrides set (a new ConfigDict)."""
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.model = name
    config.seed = int(seed)
    for key, value in overrides.items():
      if key in ("model", "seed"):
        raise ValueError(
          f"--models entry for {name!r}: set {key!r} with --models/--seeds, not as an override"
        )
      if key in config and not isinstance(config[key], type(config.model_kwargs)):
        try:
          config[key] = value
        except TypeError:  # ml_collections keeps a field's type (int -> float is allowed)
          raise ValueError(
            f"--models entry for {name!r}: {key}={value!r} is of type {type(value).__name__}, "
            f"but config.{key} is of type {type(config[key]).__name__} (now {config[key]!r})"
          ) from None
      else:
        config.model_kwargs[key] = value
  return config


def run_dir(workdir: str, entry: str, seed: int) -> str:
  """``WORKDIR/runs/<readable slug>-<hash of the entry>/seed_<seed>``."""
  slug = re.sub(r"[^A-Za-z0-9]+", "_", entry.replace("×", "x")).strip("_")[:60]
  digest = hashlib.sha1(entry.encode()).hexdigest()[:6]
  return os.path.join(workdir, RUNS_DIR, f"{slug}-{digest}", f"seed_{seed}")


def flat_config(config) -> dict[str, Any]:
  """A config (ConfigDict or its JSON dict) as ``{dotted field: JSON value}``."""
  if not isinstance(config, dict):
    config = json.loads(config.to_json())
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update({f"{key}.{k}": v for k, v in flat_config(value).items()})
    else:
      out[key] = value
  return out


def recorded_config(run: dict) -> dict[str, Any]:
  """The flat config a ``run.json`` recorded; fields added since then at their defaults."""
  from experiments.configs import default

  return {**flat_config(default.get_config()), **flat_config(run.get("config", {}))}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple]:
  """``{field: (old value, new value)}`` for every field of two flat configs that differs."""
  return {
    k: (old.get(k, _UNSET), new.get(k, _UNSET))
    for k in sorted(set(old) | set(new))
    if old.get(k, _UNSET) != new.get(k, _UNSET)
  }


def _describe(differences: dict[str, tuple]) -> str:
  return ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differences.items())


def plan_run(config, directory: str) -> tuple[str, dict[str, tuple], Any]:
  """What the study does with one run: ``(action, differences, results)`` (reads only).

  ``action`` is ``TRAIN`` (no run yet), ``RESUME`` (same config, not finished),
  ``CONTINUE`` (only ``LENGTH_FIELDS`` / ``RESULT_NEUTRAL_FIELDS`` differ, or the
  ``results.json`` is of a shorter total than ``run.json`` asks: the runner continues or
  tests again) or ``REUSE`` (same config, finished: ``results`` is its ``results.json``);
  ``differences`` are the fields of the recorded config that differ from ``config``.

  Raises:
    ValueError: any other field differs, or outputs exist without a ``run.json``, naming
      the directory, the fields with both values and the fix.
  """
  run = rundir.read_run_file(directory)
  results = rundir.read_json(rundir.path(directory, RESULTS_FILE), "a finished run's results")
  if run is None:
    if results is None:
      return TRAIN, {}, None
    raise ValueError(
      f"{directory} holds a {RESULTS_FILE} but no {rundir.RUN_FILE}: the config it was "
      "trained with is unknown, so it cannot be reused. Use a new --workdir, or delete "
      f"{directory} to train it again."
    )
  differences = config_differences(recorded_config(run), flat_config(config))
  blocking = {
    k: v for k, v in differences.items() if k not in LENGTH_FIELDS + RESULT_NEUTRAL_FIELDS
  }
  if blocking:
    raise ValueError(
      f"{directory} was trained with another config ({_describe(blocking)}). A study reuses "
      "a run only when its config is the same (the training length and "
      f"{', '.join(RESULT_NEUTRAL_FIELDS)} may change). Use a new --workdir for this "
      f"config, or delete {directory} to train it again."
    )
  if differences:
    return CONTINUE, differences, None
  if results is None:
    return RESUME, {}, None
  if int(results.get("steps", -1)) < int(run.get("total_steps", 0)):
    return CONTINUE, {}, None  # continued toward a longer total but stopped before its end
  return REUSE, {}, results


def check_entries(base, models, seeds: int, workdir: str) -> dict[tuple[str, int], tuple]:
  """Validates every run's config, workdir and existing run before any training.

  Reads only (no arrays, no files written). Returns ``{(entry, seed): plan_run(...)}``.

  Raises:
    ValueError: a bad ``--seeds``, a bad entry (naming it), or runs made with another
      config (naming the first, with its differing fields, and how many others differ).
  """
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f"--seeds={seeds!r}: expected a positive int (runs use seeds 0 .. N-1)")
  from experiments import run_config

  plans, refused = {}, []
  for entry, name, overrides in models:
    for seed in range(seeds):
      config = entry_config(base, name, overrides, seed)
      directory = run_dir(workdir, entry, seed)
      try:
        plans[(entry, seed)] = plan_run(config, directory)
      except ValueError as e:
        refused.append(e)
        continue
      try:
        run_config.validate_config(config, directory)
      except (ValueError, TypeError, KeyError) as e:
        from experiments import cli

        raise ValueError(
          f"--models entry {entry!r}: {e}{cli.config_field_hint(overrides, base)}"
        ) from e
  if refused:
    others = (
      f" ({len(refused) - 1} other run(s) of this study differ as well: delete them "
      "too, or use a new --workdir)"
      if len(refused) > 1
      else ""
    )
    raise ValueError(f"study: {refused[0]}{others}")
  return plans


def base_and_row_configs(configs: Sequence[Sequence[dict[str, Any]]]):
  """``(base, [row overrides])`` of flat run configs grouped by row.

  ``base`` holds the fields every run has with one value (``seed`` excluded); a row's
  overrides are its other fields (shared by the row's runs; ``seed`` excluded).
  """
  everyone = [c for row in configs for c in row]
  keys = sorted(set().union(*everyone)) if everyone else []
  base = {
    k: everyone[0].get(k, _UNSET)
    for k in keys
    if k != "seed" and all(c.get(k, _UNSET) == everyone[0].get(k, _UNSET) for c in everyone)
  }
  rows = [
    {k: row[0].get(k, _UNSET) for k in keys if k != "seed" and k not in base} for row in configs
  ]
  return base, rows


def _common_overrides(records: Sequence[dict]) -> dict[str, Any]:
  """The ``field=value`` overrides every entry shares (shown once, not per row)."""
  if len(records) < 2:
    return {}
  first = records[0]["overrides"]
  return {
    k: v
    for k, v in first.items()
    if all(k in r["overrides"] and r["overrides"][k] == v for r in records[1:])
  }


def _label(rec: dict, common: dict[str, Any]) -> str:
  own = [f"{k}={v}" for k, v in rec["overrides"].items() if k not in common]
  return rec["model"] + (f" ({', '.join(own)})" if own else "")


def _epochs_text(epochs: Sequence[float]) -> str:
  """Epochs of a row's runs: one number when they agree, else one per seed."""
  return f"{epochs[0]:g}" if len(set(epochs)) == 1 else ", ".join(f"{e:g}" for e in epochs)


def summarise(records: Sequence[dict]) -> list[dict]:
  """One summary per model from its per-seed run results (see the module docstring).

  A record: ``entry``, ``model``, ``overrides`` (the entry's), optionally
  ``config_overrides`` (the row's config fields that differ from the study's base config),
  and ``runs``: per seed, the run's ``results.json`` plus ``seed`` and, optionally,
  ``continued`` (its ``run.json`` history trained toward more than one total).
  """
  out = []
  common = _common_overrides(records)
  for rec in records:
    errors = [r["test_top1_error"] for r in rec["runs"]]
    times = [r.get("train_wall_time_sec", float("nan")) for r in rec["runs"]]
    first = rec["runs"][0]
    out.append(
      {
        "name": _label(rec, common),
        "entry": rec["entry"],
        "model": rec["model"],
        "overrides": rec["overrides"],
        "config_overrides": rec.get("config_overrides", {}),
        "family": family(rec["model"]),
        "params": int(first["params"]),
        "gflops": float(first["gflops"]),
        "seeds": [r["seed"] for r in rec["runs"]],
        "test_top1_errors": errors,
        "mean_test_top1_error": float(np.mean(errors)),
        "std_test_top1_error": float(np.std(errors, ddof=1)) if len(errors) > 1 else 0.0,
        "train_time_sec_per_run": float(np.mean(times)),
        "epochs": [float(r.get("epochs", float("nan"))) for r in rec["runs"]],
        "steps": [int(r.get("steps", -1)) for r in rec["runs"]],
        "continued_runs": sum(bool(r.get("continued")) for r in rec["runs"]),
      }
    )
  return out


def markdown_table(summary: Sequence[dict], caption: str = "", notes: Sequence[str] = ()) -> str:
  """``study.md``: one row per model, errors in percent, under an optional caption and
  followed by ``notes`` (one paragraph each)."""
  lines = ([caption, ""] if caption else []) + [
    "| model | family | params | GFLOPs | test error % (mean ± std) | per seed % | epochs "
    "| train time / run |",
    "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
  ]
  for s in summary:
    per_seed = ", ".join(f"{100 * e:.2f}" for e in s["test_top1_errors"])
    lines.append(
      f"| {s['name']} | {s['family']} | {s['params']:,} | {s['gflops']:.4f} | "
      f"{100 * s['mean_test_top1_error']:.2f} ± {100 * s['std_test_top1_error']:.2f} | "
      f"{per_seed} | {_epochs_text(s['epochs'])} | {s['train_time_sec_per_run']:.0f} s |"
    )
  for note in notes:
    lines += ["", note]
  return "\n".join(lines) + "\n"


def y_axis(summary: Sequence[dict]) -> tuple[str, float]:
  """The plot's error axis (%): ("linear", top) when every seed is within 5x the typical
  error, else ("symlog", linear threshold) so one diverged seed does not flatten the rest."""
  errors = [100 * e for s in summary for e in s["test_top1_errors"]]
  typical = max(float(np.median([100 * s["mean_test_top1_error"] for s in summary])), 0.1)
  if max(errors) > 5 * typical:
    return "symlog", typical
  return "linear", 1.15 * max(errors)


def plot(summary: Sequence[dict], path: str, title: str = ""):
  """``study.png``: test error (%) against parameters, mean +- std, a marker per family."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=100)
  for s in summary:
    bar = ax.errorbar(
      s["params"],
      100 * s["mean_test_top1_error"],
      yerr=100 * s["std_test_top1_error"],
      marker=_MARKERS[s["family"]],
      capsize=3,
      linestyle="none",
      label=s["name"],
    )
    ax.scatter(
      [s["params"]] * len(s["test_top1_errors"]),
      [100 * e for e in s["test_top1_errors"]],
      s=10,
      alpha=0.4,
      color=bar[0].get_color(),
      marker=_MARKERS[s["family"]],
    )
  scale, value = y_axis(summary)
  if scale == "symlog":
    ax.set_yscale("symlog", linthresh=value)
    ax.set_ylim(bottom=0)
  else:
    ax.set_ylim(0, value)
  ax.set_xlabel("parameters")
  ax.set_ylabel("test top-1 error (%): mean ± std, and each seed")
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _non_default(flat: dict[str, Any]) -> dict[str, Any]:
  """The fields of a flat config whose values differ from ``configs/default.py``'s."""
  from experiments.configs import default

  defaults = flat_config(default.get_config())
  return {k: v for k, v in flat.items() if defaults.get(k, _UNSET) != v}


def _fields_text(fields: dict[str, Any]) -> str:
  return ", ".join(f"{k}={v}" for k, v in fields.items())


def _is_continued(run: dict) -> bool:
  """Whether a run's ``run.json`` history trained toward more than one total."""
  return len({h.get("total_steps") for h in run.get("history", [])}) > 1


def run_study(base, workdir: str, models_text: str, seeds: int) -> list[dict]:
  """Trains, continues or reuses every (model, seed) run and writes study.json/.md/.png.

  Every run is checked first (``check_entries``): a run made with another config stops the
  study before any training. Returns the per-model summaries, or an empty list when a run
  was preempted (SIGTERM: rerun the same command to go on).
  """
  models = parse_models(models_text)
  plans = check_entries(base, models, seeds, workdir)
  records, configs = [], []
  for entry, name, overrides in models:
    runs, row_configs = [], []
    for seed in range(seeds):
      config = entry_config(base, name, overrides, seed)
      directory = run_dir(workdir, entry, seed)
      results = _train_or_reuse(config, directory, entry, seed, plans[(entry, seed)])
      if results is None:
        return []
      run = rundir.read_run_file(directory) or {}
      runs.append(dict(results, seed=seed, workdir=directory, continued=_is_continued(run)))
      row_configs.append(recorded_config(run) if run else flat_config(config))
    records.append({"entry": entry, "model": name, "overrides": overrides, "runs": runs})
    configs.append(row_configs)
  base_config, row_overrides = base_and_row_configs(configs)
  for rec, row in zip(records, row_overrides):
    rec["config_overrides"] = row
  summary = summarise(records)
  _write_study(workdir, base, base_config, records, summary, seeds)
  return summary


def _train_or_reuse(config, directory: str, entry: str, seed: int, plan) -> dict | None:
  """The results of one (model, seed) run as ``plan`` (``plan_run``) says: reused, or from
  ``train_and_evaluate`` (trained, resumed or continued); None when it was preempted."""
  from absl import logging

  from experiments import train

  action, differences, results = plan
  if action == REUSE:
    logging.info("study: reusing %s, seed %d (%s)", entry, seed, directory)
    return results
  why = {TRAIN: "training", RESUME: "resuming", CONTINUE: "continuing (or testing again)"}
  logging.info(
    "study: %s %s, seed %d in %s%s",
    why[action],
    entry,
    seed,
    directory,
    f" ({_describe(differences)})" if differences else "",
  )
  results = train.train_and_evaluate(config, directory)
  if results.get("preempted"):
    logging.warning("study: preempted during %s seed %d; rerun to resume", entry, seed)
    return None
  return results


def _write_study(workdir: str, base, base_config: dict, records, summary, seeds: int):
  """Writes study.json, study.md (table, caption, notes) and study.png of ``summary``."""
  common = _common_overrides(records)
  epochs = {e for s in summary for e in s["epochs"]}
  epochs = epochs.pop() if len(epochs) == 1 else None
  dataset = base_config.get("dataset", base.dataset)
  batch = base_config.get("batch_size", base.batch_size)
  caption = (
    f"{dataset}, {seeds} seeds, "
    + (f"{epochs:g} epochs" if epochs is not None else "epochs per row")
    + f", batch {batch}"
    + (", all models: " + _fields_text(common) if common else "")
  )
  with open(os.path.join(workdir, STUDY_JSON), "w") as f:
    json.dump(
      {
        "dataset": dataset,
        "seeds": seeds,
        "epochs": epochs,
        "batch_size": batch,
        "common_overrides": common,
        "config": base_config,
        "models": summary,
      },
      f,
      indent=2,
    )
  with open(os.path.join(workdir, STUDY_MD), "w") as f:
    f.write(markdown_table(summary, caption, _notes(base_config, summary)))
  plot(summary, os.path.join(workdir, STUDY_PNG), title=f"{dataset}, {seeds} seeds")


def _notes(base_config: dict, summary) -> list[str]:
  """The notes under study.md's table: the shared config's non-default fields, and how many
  runs were continued toward another total."""
  shown = {k: v for k, v in _non_default(base_config).items() if k not in RESULT_NEUTRAL_FIELDS}
  notes = [
    f"Config of every run, where it differs from experiments/configs/default.py: "
    f"{_fields_text(shown)}."
  ]
  continued = sum(s["continued_runs"] for s in summary)
  if continued:
    notes.append(
      f"{continued} of {sum(len(s['seeds']) for s in summary)} runs were trained "
      "toward another total first and then continued from their checkpoint (the "
      "learning-rate schedule follows the new total from there): not the same as "
      "runs of this length from scratch."
    )
  return notes


def main(argv):
  """absl entry point (see the module docstring for the command)."""
  from absl import (
    app,
    flags,
  )

  from experiments import metrics

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.console_logging()
  FLAGS = flags.FLAGS
  summary = run_study(FLAGS.config, FLAGS.workdir, FLAGS.models, FLAGS.seeds)  # cli.run
  if summary:
    with open(os.path.join(FLAGS.workdir, STUDY_MD)) as f:
      print(f.read())


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", None, "Study directory (runs/, study.json/.md/.png).")
  flags.DEFINE_string("models", None, "Comma-separated model entries (module docstring).")
  flags.DEFINE_integer("seeds", 3, "Seeds per model: 0 .. N-1.")
  config_flags.DEFINE_config_file("config", None, "Base training configuration.", lock_config=True)
  flags.mark_flags_as_required(["config", "workdir", "models"])


if __name__ == "__main__":
  from experiments import huge_pages

  huge_pages.reexec_with_huge_pages()
  _define_flags()
  from experiments import cli

  cli.run(main)
