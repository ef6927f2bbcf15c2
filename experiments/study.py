"""A study: several models x several seeds on one config, summarised in a table and a plot.

  python -m experiments.study --config=experiments/configs/digits.py --workdir=runs/study \\
      --models="ERKNet-3x1 3x1,DenseNet-BC-22-k12|growth_rate=12" --seeds=3 \\
      [--config.FIELD=VALUE ...]

Every (model, seed) is an ordinary run of :func:`experiments.train.train_and_evaluate` in
``WORKDIR/runs/<model>/seed_<seed>`` with ``config.model`` and ``config.seed`` set, so a
rerun of the same command reuses the finished runs (their ``results.json``) and resumes
interrupted ones from their checkpoints.  Then it writes

* ``WORKDIR/study.json``: one record per model: name, family, params, GFLOPs, per-seed
  test top-1 errors, their mean and standard deviation (ddof = 1), training time;
* ``WORKDIR/study.md``: the same as a Markdown table;
* ``WORKDIR/study.png``: test error against parameters, mean +- std per model, one marker
  per family.

A ``--models`` entry is a model name, optionally followed by ``|field=value`` overrides of
config fields or of ``config.model_kwargs`` for that model alone (e.g.
``RK4Net-1x3 1x3|growth_rate=24|learn_coefficients=True``); entries are separated by
commas.  Every entry is checked (the model is built abstractly) before any training.
"""

import ast
import hashlib
import json
import os
import re
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from experiments import rundir

STUDY_JSON = "study.json"
STUDY_MD = "study.md"
STUDY_PNG = "study.png"
RUNS_DIR = "runs"
RESULTS_FILE = rundir.RESULTS_FILE

FAMILIES = ("ERKNet", "IRKNet", "DenseNet", "CliqueNet")
_MARKERS = {"ERKNet": "o", "IRKNet": "s", "DenseNet": "^", "CliqueNet": "v",
            "tableau RKNet": "D", "RKNet": "P"}


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_models(text: str) -> List[Tuple[str, str, Dict[str, Any]]]:
  """Parses ``--models``: returns ``(entry, model name, overrides)`` per entry.

  Raises:
    ValueError: for an empty list, an empty entry, a malformed ``field=value`` or a
      repeated entry, naming it.
  """
  entries = [e.strip() for e in (text or "").split(",")]
  if not text or not any(entries):
    raise ValueError("--models is empty: give one or more model names separated by "
                     "commas, e.g. --models='ERKNet-3x1 3x1,DenseNet-BC-22-k12'")
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


def entry_config(base, name: str, overrides: Dict[str, Any], seed: int):
  """``base`` with ``model``, ``seed`` and the entry's overrides set (a new ConfigDict)."""
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.model = name
    config.seed = int(seed)
    for key, value in overrides.items():
      if key in ("model", "seed"):
        raise ValueError(f"--models entry for {name!r}: set {key!r} with --models/--seeds, "
                         "not as an override")
      if key in config and not isinstance(config[key], type(config.model_kwargs)):
        config[key] = value
      else:
        config.model_kwargs[key] = value
  return config


def run_dir(workdir: str, entry: str, seed: int) -> str:
  """``WORKDIR/runs/<readable slug>-<hash of the entry>/seed_<seed>``."""
  slug = re.sub(r"[^A-Za-z0-9]+", "_", entry.replace("×", "x")).strip("_")[:60]
  digest = hashlib.sha1(entry.encode()).hexdigest()[:6]
  return os.path.join(workdir, RUNS_DIR, f"{slug}-{digest}", f"seed_{seed}")


def _finished_results(directory: str):
  """The run's results.json, or None while it has not finished. (That the run holds this
  entry's model is checked by ``check_entries``, against the run's model.json.)"""
  return rundir.read_json(rundir.path(directory, RESULTS_FILE), "a finished run's results")


def check_entries(base, models, seeds: int, workdir: str):
  """Validates every run's config and workdir (no arrays, no files) before any training."""
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f"--seeds={seeds!r}: expected a positive int (runs use seeds "
                     "0 .. N-1)")
  from experiments import run_config  # pylint: disable=g-import-not-at-top
  for entry, name, overrides in models:
    for seed in range(seeds):
      config = entry_config(base, name, overrides, seed)
      try:
        run_config.validate_config(config, run_dir(workdir, entry, seed))
      except (ValueError, TypeError, KeyError) as e:
        from experiments import cli  # pylint: disable=g-import-not-at-top
        raise ValueError(f"--models entry {entry!r}: {e}"
                         f"{cli.config_field_hint(overrides, base)}") from e


def _common_overrides(records: Sequence[dict]) -> Dict[str, Any]:
  """The ``field=value`` overrides every entry shares (shown once, not per row)."""
  if len(records) < 2:
    return {}
  first = records[0]["overrides"]
  return {k: v for k, v in first.items()
          if all(k in r["overrides"] and r["overrides"][k] == v for r in records[1:])}


def _label(rec: dict, common: Dict[str, Any]) -> str:
  own = [f"{k}={v}" for k, v in rec["overrides"].items() if k not in common]
  return rec["model"] + (f" ({', '.join(own)})" if own else "")


def summarise(records: Sequence[dict]) -> List[dict]:
  """One summary per model from its per-seed run results (see the module docstring)."""
  out = []
  common = _common_overrides(records)
  for rec in records:
    errors = [r["test_top1_error"] for r in rec["runs"]]
    times = [r.get("train_wall_time_sec", float("nan")) for r in rec["runs"]]
    first = rec["runs"][0]
    out.append({
        "name": _label(rec, common), "entry": rec["entry"], "model": rec["model"],
        "overrides": rec["overrides"], "family": family(rec["model"]),
        "params": int(first["params"]), "gflops": float(first["gflops"]),
        "seeds": [r["seed"] for r in rec["runs"]], "test_top1_errors": errors,
        "mean_test_top1_error": float(np.mean(errors)),
        "std_test_top1_error": float(np.std(errors, ddof=1)) if len(errors) > 1 else 0.0,
        "train_time_sec_per_run": float(np.mean(times)),
        "epochs": float(first.get("epochs", float("nan"))),
    })
  return out


def markdown_table(summary: Sequence[dict], caption: str = "") -> str:
  """``study.md``: one row per model, errors in percent, under an optional caption."""
  lines = ([caption, ""] if caption else []) + ["| model | family | params | GFLOPs | test error % (mean ± std) | per seed % "
           "| train time / run |",
           "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
  for s in summary:
    per_seed = ", ".join(f"{100 * e:.2f}" for e in s["test_top1_errors"])
    lines.append(
        f"| {s['name']} | {s['family']} | {s['params']:,} | {s['gflops']:.4f} | "
        f"{100 * s['mean_test_top1_error']:.2f} ± {100 * s['std_test_top1_error']:.2f} | "
        f"{per_seed} | {s['train_time_sec_per_run']:.0f} s |")
  return "\n".join(lines) + "\n"


def plot(summary: Sequence[dict], path: str, title: str = ""):
  """``study.png``: test error (%) against parameters, mean +- std, a marker per family."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=100)
  for s in summary:
    bar = ax.errorbar(s["params"], 100 * s["mean_test_top1_error"],
                      yerr=100 * s["std_test_top1_error"], marker=_MARKERS[s["family"]],
                      capsize=3, linestyle="none", label=s["name"])
    ax.scatter([s["params"]] * len(s["test_top1_errors"]),
               [100 * e for e in s["test_top1_errors"]], s=10, alpha=0.4,
               color=bar[0].get_color(), marker=_MARKERS[s["family"]])
  ax.set_yscale("symlog", linthresh=1.0)  # one diverged seed does not flatten the rest
  ax.set_ylim(bottom=0)
  ax.set_xlabel("parameters")
  ax.set_ylabel("test top-1 error (%): mean ± std, and each seed")
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def run_study(base, workdir: str, models_text: str, seeds: int) -> List[dict]:
  """Trains (or reuses) every (model, seed) run and writes study.json/.md/.png.

  Returns the per-model summaries, or an empty list when a run was preempted (SIGTERM:
  rerun the same command to go on).
  """
  models = parse_models(models_text)
  check_entries(base, models, seeds, workdir)
  from absl import logging  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top
  records = []
  for entry, name, overrides in models:
    runs = []
    for seed in range(seeds):
      config = entry_config(base, name, overrides, seed)
      directory = run_dir(workdir, entry, seed)
      results = _finished_results(directory)
      if results is None:
        logging.info("study: training %s, seed %d in %s", entry, seed, directory)
        results = train.train_and_evaluate(config, directory)
        if results.get("preempted"):
          logging.warning("study: preempted during %s seed %d; rerun to resume", entry, seed)
          return []
      else:
        logging.info("study: reusing %s, seed %d (%s)", entry, seed, directory)
      runs.append(dict(results, seed=seed, workdir=directory))
    records.append({"entry": entry, "model": name, "overrides": overrides, "runs": runs})
  summary = summarise(records)
  common = _common_overrides(records)
  epochs = summary[0]["epochs"]
  caption = (f"{base.dataset}, {seeds} seeds, {epochs:g} epochs, batch {base.batch_size}"
             + (", all models: " + ", ".join(f"{k}={v}" for k, v in common.items())
                if common else ""))
  with open(os.path.join(workdir, STUDY_JSON), "w") as f:
    json.dump({"dataset": base.dataset, "seeds": seeds, "epochs": epochs,
               "batch_size": base.batch_size, "common_overrides": common,
               "models": summary}, f, indent=2)
  with open(os.path.join(workdir, STUDY_MD), "w") as f:
    f.write(markdown_table(summary, caption))
  plot(summary, os.path.join(workdir, STUDY_PNG), title=f"{base.dataset}, {seeds} seeds")
  return summary


def main(argv):
  """absl entry point (see the module docstring for the command)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import metrics  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.console_logging()
  FLAGS = flags.FLAGS
  summary = run_study(FLAGS.config, FLAGS.workdir, FLAGS.models, FLAGS.seeds)  # cli.run
  if summary:
    with open(os.path.join(FLAGS.workdir, STUDY_MD)) as f:
      print(f.read())


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Study directory (runs/, study.json/.md/.png).")
  flags.DEFINE_string("models", None, "Comma-separated model entries (module docstring).")
  flags.DEFINE_integer("seeds", 3, "Seeds per model: 0 .. N-1.")
  config_flags.DEFINE_config_file("config", None, "Base training configuration.",
                                  lock_config=True)
  flags.mark_flags_as_required(["config", "workdir", "models"])


if __name__ == "__main__":
  from experiments import huge_pages  # pylint: disable=g-import-not-at-top
  huge_pages.reexec_with_huge_pages()
  _define_flags()
  from experiments import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
