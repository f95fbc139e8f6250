"""Methods x seeds on one task, everything else equal: the plan, the runs, the aggregate table and the figures.

A comparison recipe (YAML) has three keys, and two optional ones for the report:

    train:   {...}              # sdpg-train flags every run shares (no method field)
    methods: {name: {...}, ...} # per method, the flags that make it, e.g. {method: rlsd} or {distill_coef: 0.0}
    seeds:   [0, 1, 2]
    baseline: grpo              # optional: what every method is compared with (default: grpo when there is one)
    min_effect: 0.05            # optional: the smallest held-out difference that matters (default 0.05)

Each run is `sdpg-train` in a fresh process on `train + methods[name] + {seed, output_dir}`, in
`<output_dir>/<name>/seed<seed>/`, where its merged recipe (`config.yaml`), its log (`train.log`), the trainer's
`trainer_state.json` and a `run.json` marker are written. A folder with both files is finished and skipped; any
other folder is cleared and rerun. A run that fails is reported and the comparison goes on with the next one. Runs go
seed by seed (every method of seed 0 first), so a comparison cut short still has whole seeds. The base model is
evaluated once (`base_eval.json`): it is the same model with the same seeded sampling for every run, so the runs
themselves skip their step-0 evaluation.

The report covers every finished run in the output folder (and in any other comparison folder given), whatever
seeds and methods the invocation named: each method is compared with the baseline on the seeds both finished,
paired by seed (`compare_with_baseline`).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id
from scipy import optimize, stats

from .preflight import looks_like_local_path

if TYPE_CHECKING:
    from trl import TrlParser

# The held-out accuracy as `MeanAtKCallback` logs it for one eval set (TRL's `eval_` naming).
ACCURACY = "eval_accuracy"
# How runs made before that named their evaluation metrics, read as today's names so their folders still count.
LEGACY_KEYS = {"eval/accuracy": ACCURACY, "eval/completion_length": "eval_completion_length"}
# Curves drawn against the optimiser step: log key -> (file name, axis title).
CURVES = {
    ACCURACY: ("accuracy", "Held-out mean@k accuracy"),
    "reward": ("reward", "Training reward (rollout mean)"),
    "entropy": ("entropy", "Policy entropy of sampled tokens"),
    "kl": ("kl", "KL to the reference (k3)"),
    "completions/mean_length": ("response_length", "Response length (tokens)"),
}
# The diagnosis table (training rollouts, every logged step): column -> (numerator key, denominator key or None).
# A ratio is taken step by step, on steps where both were logged and the denominator is not 0.
DIAGNOSTICS = {
    "distill / outcome grad norm": ("grad_norm/distill", "grad_norm/outcome"),
    "gate ratio": ("sdpg/gate_ratio", None),
    "teacher - student logp": ("sdpg/teacher_minus_student_logp", None),
    "teacher entropy": ("sdpg/teacher_entropy", None),
    "student entropy": ("sdpg/student_entropy", None),
    "KL share on context tokens": ("sdpg/kl_share_on_context_tokens", None),
    "context token share": ("sdpg/context_token_share", None),
    "RLSD advantage weight": ("rlsd/advantage_weight", None),
}
# Per-step training values reported as "final": the mean of the last FINAL_WINDOW logged steps (one step is noisy).
FINAL_WINDOW = 3
FINISHED = "run.json"
RECIPE_KEYS = {"train", "methods", "seeds"}
REPORT_KEYS = {"baseline": "grpo", "min_effect": 0.05}  # optional recipe keys and their defaults


@dataclass(frozen=True)
class Run:
    """One training run of the comparison."""

    method: str
    seed: int
    folder: Path
    config: dict[str, Any]
    output_dir: Path  # the comparison's folder: nothing outside it is ever deleted


def check_method_name(name: Any) -> None:
    """A method name becomes a folder name under the output folder: refuse anything that is not one plain path part
    (a separator, `.`/`..`, an absolute path, a NUL), so that no run folder can lie outside the output folder."""
    bad = not isinstance(name, str) or not name.strip() or name in (".", "..") or "\0" in name
    if bad or "/" in name or "\\" in name or Path(name).is_absolute() or Path(name).name != name:
        raise ValueError(
            f"Method name {name!r} is not a plain folder name: a method's runs go to <output_dir>/<method>/, so the "
            "name may not contain '/' or '\\', be '.' or '..', or be an absolute path."
        )


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a comparison recipe and check its shape and method names (not yet its flags: `check_runs` does that)."""
    recipe = yaml.safe_load(Path(path).read_text())
    if not isinstance(recipe, dict) or not RECIPE_KEYS <= set(recipe) <= RECIPE_KEYS | set(REPORT_KEYS):
        raise ValueError(
            f"{path}: a comparison recipe has the keys train, methods and seeds, and optionally baseline and "
            f"min_effect; it has {sorted(recipe) if isinstance(recipe, dict) else type(recipe).__name__}."
        )
    if not recipe["methods"] or not recipe["seeds"]:
        raise ValueError(f"{path}: methods and seeds must not be empty.")
    for name in recipe["methods"]:
        check_method_name(name)
    if "baseline" in recipe and recipe["baseline"] not in recipe["methods"]:
        raise ValueError(
            f"{path}: baseline {recipe['baseline']!r} is not one of the methods {list(recipe['methods'])}."
        )
    if "min_effect" in recipe:
        check_min_effect(recipe["min_effect"], f"{path}: min_effect")
    for name, flags in recipe["methods"].items():
        shared = set(flags or {}) & set(recipe["train"])
        if shared:
            raise ValueError(
                f"{path}: method {name!r} sets {sorted(shared)}, which train: sets for every run already."
            )
    return recipe


def plan_runs(
    recipe: dict[str, Any],
    output_dir: str | Path,
    *,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    model_name_or_path: str | None = None,
) -> list[Run]:
    """Every (method, seed) run, seed-major, with its merged `sdpg-train` configuration."""
    unknown = set(methods or []) - set(recipe["methods"])
    if unknown:
        raise ValueError(f"Unknown methods {sorted(unknown)}; the recipe has {list(recipe['methods'])}.")
    runs = []
    for seed in seeds if seeds is not None else recipe["seeds"]:
        for name, flags in recipe["methods"].items():
            if methods and name not in methods:
                continue
            check_method_name(name)
            folder = Path(output_dir) / name / f"seed{seed}"
            config = {
                **recipe["train"],
                **(flags or {}),
                "seed": seed,
                "output_dir": str(folder),
                "eval_before_training": False,
            }
            if model_name_or_path:
                config["model_name_or_path"] = model_name_or_path
            runs.append(Run(name, seed, folder, config, Path(output_dir)))
    return runs


def check_runs(runs: list[Run], make_parser: Callable[[], TrlParser]) -> None:
    """Check every run before the first one starts: its model (`model_problem`) and its configuration, which must
    parse with `make_parser()`, `sdpg-train`'s parser (`sdpg_trl.scripts.train.make_parser`, handed down by the
    script), and what it needs installed (`SDPGConfig.missing_packages`, e.g. a `report_to` tracker). Raises
    `ValueError` naming the run and what is wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            problem = model_problem(run.config.get("model_name_or_path"))
            if problem:
                raise ValueError(f"Method {run.method!r}, seed {run.seed}: {problem}")
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(run.config))
            try:
                parsed = make_parser().parse_args_and_config(args=["--config", str(path)], fail_with_unknown_args=True)
            except (ValueError, TypeError, SystemExit) as err:  # the type checks raise TypeError
                raise ValueError(
                    f"Method {run.method!r}, seed {run.seed}: its configuration does not parse: {err}"
                ) from err
            missing = [
                line for args in parsed if hasattr(args, "missing_packages") for line in args.missing_packages()
            ]
            if missing:
                raise ValueError(
                    f"Method {run.method!r}, seed {run.seed} needs what is not installed: " + "; ".join(missing)
                )


def model_problem(model: str | None) -> str | None:
    """What is wrong with a run's `model_name_or_path`, or None: a local folder must exist, anything else must be a
    valid Hub id (whether the Hub has it is left to the run, which may be offline)."""
    if not model:
        return "no model_name_or_path: set it under train:, or pass --model_name_or_path."
    path = Path(model).expanduser()
    if path.is_dir() and not any(path.iterdir()):
        return f"model_name_or_path {model} is an empty folder, not a model."
    if path.exists():
        return None if path.is_dir() else f"model_name_or_path {model} is a file, not a model folder."
    if looks_like_local_path(model):
        return f"model_name_or_path {model} does not exist (a local folder)."
    try:
        validate_repo_id(model)
    except HFValidationError:
        return f"model_name_or_path {model!r} is neither an existing folder nor a valid Hub id."
    return None


def last_evaluation_warnings(runs: list[Run]) -> list[str]:
    """Runs whose last held-out evaluation is not of the final model (`max_steps` not a multiple of
    `eval_every_steps`): their "Last" would be an earlier checkpoint's accuracy."""
    warnings = set()
    for run in runs:
        every, steps = run.config.get("eval_every_steps") or 0, run.config.get("max_steps") or 0
        if every > 0 and steps > 0 and steps % every:
            warnings.add(
                f"{run.method}: max_steps {steps} is not a multiple of eval_every_steps {every}, so 'Last' "
                f"is the accuracy at step {steps - steps % every}, not of the final model."
            )
    return sorted(warnings)


def is_finished(run: Run) -> bool:
    return (run.folder / FINISHED).is_file() and (run.folder / "trainer_state.json").is_file()


def completed_without_marker(run: Run) -> bool:
    """Training ran to its end (`sdpg-train` writes `trainer_state.json` into the run folder only after the last step,
    checkpoints go to subfolders) and left its `config.yaml`, but no `run.json` was written: the comparison was
    stopped right after the run, or the run was made by another driver with the same layout."""
    folder = run.folder
    done = (folder / "trainer_state.json").is_file() and (folder / "config.yaml").is_file()
    return done and not (folder / FINISHED).exists()


def adopt_completed_runs(runs: list[Run]) -> list[Run]:
    """Write the `run.json` marker of every completed run that lacks one, from its own `config.yaml` (so that
    `check_finished_runs` then compares what it was really trained with), instead of training it again."""
    adopted = []
    for run in runs:
        if completed_without_marker(run):
            history = read_history(run.folder)
            runtime = next((entry["train_runtime"] for entry in history if "train_runtime" in entry), None)
            config = yaml.safe_load((run.folder / "config.yaml").read_text())
            marker = {"method": run.method, "seed": run.seed, "wall_s": runtime, "adopted": True, "config": config}
            (run.folder / FINISHED).write_text(json.dumps(marker, indent=2))
            adopted.append(run)
    return adopted


def changed_settings(run: Run) -> dict[str, tuple[Any, Any]]:
    """For a finished run, each setting whose recorded value (in `run.json`) differs from the planned one, as
    `key: (recorded, planned)`; the output folder is not compared."""
    recorded = json.loads((run.folder / FINISHED).read_text()).get("config")
    if recorded is None:  # a marker without its configuration: nothing to compare
        return {}
    keys = sorted((set(recorded) | set(run.config)) - {"output_dir"})
    return {k: (recorded.get(k), run.config.get(k)) for k in keys if recorded.get(k) != run.config.get(k)}


def check_finished_runs(runs: list[Run]) -> None:
    """Refuse to resume into finished runs that were trained with other settings (an edited recipe, another model):
    skipping them would put two configurations in one table."""
    stale = [(run, changed) for run in runs if is_finished(run) and (changed := changed_settings(run))]
    if stale:
        lines = [
            f"  {run.method} seed {run.seed}: " + ", ".join(f"{k}: {was!r} -> {now!r}" for k, (was, now) in d.items())
            for run, d in stale
        ]
        raise ValueError(
            "Finished runs in the output folder were trained with other settings:\n"
            + "\n".join(lines)
            + "\nUse another --output_dir, or delete those run folders to train them again."
        )


def train_in_subprocess(run: Run) -> dict[str, Any]:
    """Run `sdpg-train` on the run's configuration in a fresh process; raise if it fails, else return the command."""
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "config.yaml").write_text(yaml.safe_dump(run.config, sort_keys=False))
    cmd = [sys.executable, "-m", "sdpg_trl.scripts.train", "--config", str(run.folder / "config.yaml")]
    with open(run.folder / "train.log", "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}; see {run.folder / 'train.log'}")
    return {"command": cmd}


def source_revision() -> dict[str, Any]:
    """The git commit of the sdpg_trl source that runs, and whether it has uncommitted changes (None outside git)."""
    source = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": bool(changes) if commit else None}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def execute(
    runs: list[Run], train: Callable[[Run], dict[str, Any] | None] = train_in_subprocess, echo: Callable = print
) -> list[tuple[Run, str]]:
    """Train every unfinished run, one progress line each; finished runs are skipped, broken folders restarted.

    A run whose `train` raises is reported and left unfinished (the next invocation restarts it); the others go on.
    A run that completed but has no marker is adopted (`adopt_completed_runs`). Finished runs whose recorded settings
    differ from the plan stop everything before any training. Returns the failed runs with their error. `train` may
    return extra facts for `run.json` (e.g. the command).
    """
    for run in adopt_completed_runs(runs):
        echo(f"{run.method} seed {run.seed}: completed earlier without run.json; counted as finished")
    check_finished_runs(runs)
    todo = [run for run in runs if not is_finished(run)]
    echo(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to go.")
    revision = source_revision() if todo else {}
    durations: list[float] = []
    failed: list[tuple[Run, str]] = []
    for index, run in enumerate(todo, 1):
        label = f"[{index}/{len(todo)}] {run.method} seed {run.seed}"
        if run.folder.exists():
            echo(f"{label}: unfinished folder from an earlier attempt, starting it again")
            clear_run_folder(run)
        echo(f"{label} ... (log: {run.folder / 'train.log'})")
        started, start = _now(), time.time()
        try:
            facts = train(run) or {}
        except Exception as err:  # one broken run must not end the comparison; Ctrl-C (not an Exception) still does
            durations.append(time.time() - start)
            failed.append((run, str(err)))
            echo(f"{label} FAILED after {durations[-1] / 60:.1f} min: {err}")
            continue
        durations.append(time.time() - start)
        marker = {
            "method": run.method,
            "seed": run.seed,
            "wall_s": durations[-1],
            "started": started,
            "finished": _now(),
            **facts,
            **revision,
            "config": run.config,
        }
        (run.folder / FINISHED).write_text(json.dumps(marker, indent=2))
        evals = [h[ACCURACY] for h in read_history(run.folder) if ACCURACY in h]
        eta = statistics.mean(durations) * (len(todo) - index) / 60
        last = f"held-out last {evals[-1]:.3f}" if evals else "no evaluation"
        echo(f"{label} done in {durations[-1] / 60:.1f} min ({last}); about {eta:.0f} min to go")
    return failed


def clear_run_folder(run: Run) -> None:
    """Delete an unfinished run's folder, only if it really is `<output_dir>/<method>/seed<seed>` inside the output
    folder (resolved, so no `..` or link leads out of it); otherwise raise and delete nothing."""
    root, folder = run.output_dir.resolve(), run.folder.resolve()
    expected = root / run.method / f"seed{run.seed}"
    if folder != expected:  # a `..` in the name, or a link on the way, resolves elsewhere
        raise ValueError(
            f"Refusing to delete {run.folder} (resolves to {folder}): it is not the run folder {expected} inside the "
            f"output folder {root}."
        )
    shutil.rmtree(folder)


def read_history(folder: Path) -> list[dict]:
    """A run's log history (`trainer_state.json`), with the metric names of older runs (`LEGACY_KEYS`) updated."""
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [{LEGACY_KEYS.get(key, key): value for key, value in entry.items()} for entry in history]


# ---------------------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------------------
def series(history: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in a trainer log history, in step order."""
    return sorted((entry["step"], entry[key]) for entry in history if entry.get(key) is not None)


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean over seeds (SE is nan for one value)."""
    mean = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def every_series(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Every number the run logged (losses, rewards, `sdpg/*`, `rlsd/*`, `grad_norm/*`, evaluations, ...) as
    `key: [(step, value), ...]`; the trainer's end-of-training summary (`train_runtime`, ...) included."""
    keys = {k for entry in history for k, v in entry.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {key: series(history, key) for key in sorted(keys - {"step", "epoch"})}


def summarise_run(history: list[dict], base_accuracy: float | None) -> dict[str, Any]:
    """A run's curves and its table entries: held-out accuracy Last and Best (over its evaluations after step 0),
    and the final entropy, response length, reward and KL (mean of the last `FINAL_WINDOW` logged steps). `history`
    keeps every logged series as it was logged (without the base model's step 0)."""
    curves = {key: series(history, key) for key in CURVES}
    if base_accuracy is not None:
        curves[ACCURACY] = [(0, base_accuracy), *[p for p in curves[ACCURACY] if p[0] != 0]]
    trained = [value for step, value in curves[ACCURACY] if step > 0]
    final = {
        key: statistics.mean(v for _, v in points[-FINAL_WINDOW:]) if points else None
        for key, points in curves.items()
        if key != ACCURACY
    }
    return {
        "curves": curves,
        "last": trained[-1] if trained else None,
        "best": max(trained) if trained else None,
        "final": final,
        "history": every_series(history),
    }


def aggregate(runs: dict[str, dict[int, dict]], num_eval_samples: int | None) -> dict[str, dict[str, Any]]:
    """Per method, over its seeds: mean and SE of Last, Best and the final training values.

    `sampling_se` is the binomial standard error of one evaluation, `sqrt(p (1 - p) / n)` at the method's mean Last,
    the noise a single run's number carries even with the seed fixed.
    """
    table = {}
    for method, by_seed in runs.items():
        done = [r for r in by_seed.values() if r["last"] is not None]
        if not done:
            continue
        row: dict[str, Any] = {"seeds": sorted(s for s, r in by_seed.items() if r["last"] is not None)}
        for name in ("last", "best"):
            row[name] = mean_and_se([r[name] for r in done])
        for key in CURVES:
            if key == ACCURACY:
                continue
            values = [r["final"][key] for r in done if r["final"].get(key) is not None]
            row[key] = mean_and_se(values) if values else None
        if num_eval_samples:
            p = row["last"][0]
            row["sampling_se"] = math.sqrt(p * (1 - p) / num_eval_samples)
        table[method] = row
    return table


def finished_run_folders(output_dir: str | Path) -> list[tuple[str, int, Path]]:
    """Every finished run under `output_dir` (`<method>/seed<N>/` holding `run.json` and `trainer_state.json`),
    whatever recipe or invocation made it, as `(method, seed, folder)` sorted by method and seed."""
    found = []
    for folder in Path(output_dir).glob("*/seed*"):
        seed = folder.name.removeprefix("seed")
        if seed.lstrip("-").isdigit() and (folder / FINISHED).is_file() and (folder / "trainer_state.json").is_file():
            found.append((folder.parent.name, int(seed), folder))
    return sorted(found)


def collect_folder(
    output_dir: str | Path, recipe: dict[str, Any] | None = None, model_name_or_path: str | None = None
) -> dict[str, Any]:
    """Every finished run in one comparison folder: `runs` (method -> seed -> `summarise_run`), `base_accuracy`,
    `eval_samples_per_run` and `warnings` (a run of a method the recipe lacks, or trained with other settings than
    the recipe plans for it; without a recipe, other settings than the method's first run)."""
    output_dir = Path(output_dir)
    base_file = output_dir / "base_eval.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    base_accuracy = base["accuracy"] if base else None
    # Samples per evaluation, for the binomial SE: as the base evaluation counted them (any data set), else from the
    # recipe's arithmetic settings.
    train = (recipe or {}).get("train", {})
    if base and base.get("num_problems") and base.get("k"):
        num_eval_samples = base["num_problems"] * base["k"]
    else:
        num_eval_samples = train.get("arithmetic_num_eval", 0) * train.get("eval_k", 0) or None
    runs: dict[str, dict[int, dict]] = {}
    warnings, first_config = [], {}
    for method, seed, folder in finished_run_folders(output_dir):
        recorded = json.loads((folder / FINISHED).read_text()).get("config")
        if recipe is not None and method not in recipe["methods"]:
            warnings.append(f"{folder}: method {method!r} is not in the recipe; reported as it is.")
        elif recipe is not None:
            (planned,) = plan_runs(
                recipe, output_dir, methods=[method], seeds=[seed], model_name_or_path=model_name_or_path
            )
            changed = changed_settings(planned)
            if changed:
                listing = ", ".join(f"{k}: {was!r} (recipe: {now!r})" for k, (was, now) in changed.items())
                warnings.append(f"{folder}: trained with other settings than the recipe's: {listing}.")
        elif recorded is not None:
            settings = {k: v for k, v in recorded.items() if k not in ("seed", "output_dir")}
            reference = first_config.setdefault(method, (seed, settings))
            changed = sorted(k for k in set(settings) | set(reference[1]) if settings.get(k) != reference[1].get(k))
            if changed:
                warnings.append(f"{folder}: trained with other settings than {method} seed {reference[0]}: {changed}.")
        runs.setdefault(method, {})[seed] = summarise_run(read_history(folder), base_accuracy)
    if recipe is not None:  # the recipe's order, then the methods it does not have
        order = [m for m in recipe["methods"] if m in runs] + [m for m in runs if m not in recipe["methods"]]
        runs = {m: runs[m] for m in order}
    return {
        "base_accuracy": base_accuracy,
        "eval_samples_per_run": num_eval_samples,
        "runs": runs,
        "warnings": warnings,
    }


def _json_round_trip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def merge_runs(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Merge several sources of runs (`(label, {runs, base_accuracy, eval_samples_per_run, warnings})`, e.g. a
    `results.json` and `collect_folder`s) into one. The same run in two sources must hold the same numbers, else
    `ValueError`; a differing base evaluation or evaluation size is a warning (the first source's is kept)."""
    runs: dict[str, dict[int, dict]] = {}
    source: dict[tuple[str, int], str] = {}
    merged: dict[str, Any] = {"base_accuracy": None, "eval_samples_per_run": None, "warnings": []}
    for label, part in parts:
        merged["warnings"] += part.get("warnings", [])
        for key in ("base_accuracy", "eval_samples_per_run"):
            if merged[key] is None:
                merged[key] = part.get(key)
            elif part.get(key) is not None and part[key] != merged[key]:
                merged["warnings"].append(f"{label}: {key} is {part[key]}, not {merged[key]} as in {parts[0][0]}.")
        for method, by_seed in part["runs"].items():
            for seed, summary in by_seed.items():
                seed, summary = int(seed), _json_round_trip(summary)
                here = runs.setdefault(method, {})
                if seed in here and here[seed] != summary:
                    raise ValueError(
                        f"{method} seed {seed} is in both {source[method, seed]} and {label}, with different "
                        "numbers: remove it from one of them."
                    )
                here[seed] = summary
                source.setdefault((method, seed), label)
    merged["warnings"] = list(dict.fromkeys(merged["warnings"]))  # a source merged again adds no copies
    return {**merged, "runs": {m: dict(sorted(by_seed.items())) for m, by_seed in runs.items()}}


def collect(
    output_dirs: str | Path | list[str | Path],
    recipe: dict[str, Any] | None = None,
    *,
    model_name_or_path: str | None = None,
    baseline: str | None = None,
    min_effect: float | None = None,
) -> dict[str, Any]:
    """Every finished run in the comparison folder(s), the aggregate per method, the base evaluation and the paired
    comparisons with the baseline (`analyse`), as one JSON-able dict."""
    folders = output_dirs if isinstance(output_dirs, list) else [output_dirs]
    merged = merge_runs([(str(f), collect_folder(f, recipe, model_name_or_path)) for f in folders])
    return analyse(merged, baseline=baseline, min_effect=min_effect)


def analyse(merged: dict[str, Any], *, baseline: str | None = None, min_effect: float | None = None) -> dict[str, Any]:
    """From runs (`merge_runs`' shape), the results: the runs, the per-method aggregate (`methods`) and the paired
    comparisons with `baseline` (default: grpo when it ran; None without one) at `min_effect` (default 0.05)."""
    runs = merged["runs"]
    min_effect = REPORT_KEYS["min_effect"] if min_effect is None else min_effect
    if baseline is None and REPORT_KEYS["baseline"] in runs:
        baseline = REPORT_KEYS["baseline"]
    if baseline is not None and baseline not in runs:
        raise ValueError(f"The baseline {baseline!r} has no finished run; the runs are of {list(runs)}.")
    samples = merged.get("eval_samples_per_run")
    return {
        "base_accuracy": merged.get("base_accuracy"),
        "eval_samples_per_run": samples,
        "warnings": merged.get("warnings", []),
        "runs": runs,
        "methods": aggregate(runs, samples),
        "comparisons": compare_with_baseline(runs, baseline, min_effect, samples) if baseline else None,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Paired comparison with the baseline
# ---------------------------------------------------------------------------------------------------------------------
ALPHA = 0.05  # two-sided level of every test and interval (the equivalence test's 90% interval is its TOST form)
POWER = 0.8  # for the smallest detectable difference and the seeds needed
SD_UPPER_LEVEL = 0.8  # the pessimistic SD: its one-sided 80% upper confidence limit
MAX_SEEDS = 10_000  # seeds needed beyond this are reported as "more than"
MIN_EXACT_PAIRS = 6  # below this, the smallest two-sided p of a sign or permutation test, 2 / 2**n, is above 0.05


def check_min_effect(value: Any, name: str = "min_effect") -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{name} must be a positive number (a held-out accuracy difference, e.g. 0.05), got {value!r}."
        )


def t_power(difference: float, sd: float, n: int) -> float:
    """Power of the two-sided paired t test at `ALPHA` with `n` pairs when the differences have mean `difference` and
    SD `sd`: P(|T| > t_crit), T noncentral t with n - 1 degrees of freedom and noncentrality difference·√n / sd."""
    df, nc = n - 1, difference * math.sqrt(n) / sd
    crit = stats.t.ppf(1 - ALPHA / 2, df)
    # P(T < -crit) as P(T > crit) at -nc: scipy's nct.cdf turns nan far in that tail, nct.sf underflows to 0.
    return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc))


def detectable_difference(sd: float, n: int) -> float:
    """The smallest true mean difference that `n` pairs with differences of SD `sd` detect with `POWER`."""
    if sd == 0:
        return 0.0
    high = sd  # doubled until detected
    while t_power(high, sd, n) < POWER:
        high *= 2
    return float(optimize.brentq(lambda d: t_power(d, sd, n) - POWER, 0.0, high, xtol=1e-10))


def seeds_needed(difference: float, sd: float) -> int | None:
    """The fewest pairs that detect `difference` with `POWER` when the differences have SD `sd`; None above
    `MAX_SEEDS`. The power grows with the pairs: doubling, then a bisection, finds it (near the answer, where
    scipy's noncentral t is accurate)."""
    if sd == 0:
        return 2
    low, high = 1, 2  # t_power(low) < POWER <= t_power(high) once found; 1 pair has no test at all
    while t_power(difference, sd, high) < POWER:
        if high >= MAX_SEEDS:
            return None
        low, high = high, min(2 * high, MAX_SEEDS)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if t_power(difference, sd, mid) >= POWER else (mid, high)
    return high


def no_spread(diffs: np.ndarray) -> bool:
    """Whether the per-seed differences are equal (up to float rounding, which would give an SD of ~1e-17)."""
    return bool(np.ptp(diffs) <= 1e-12 * max(1.0, float(np.abs(diffs).max())))


def paired_t(base: np.ndarray, other: np.ndarray, levels: tuple[float, ...] = (1 - ALPHA, 1 - 2 * ALPHA)) -> dict:
    """The paired t test of `other - base` (2 or more pairs): two-sided `p` and the intervals at `levels` (`ci95`,
    `ci90` at the default ones; `ci` for one other level). Equal differences on every seed (`no_spread`) leave the
    test nothing to measure the noise by: p and the intervals are None (no test), not a p of 0 from 2 seeds."""
    names = ("ci95", "ci90") if levels == (1 - ALPHA, 1 - 2 * ALPHA) else ("ci",)
    if no_spread(other - base):
        return {"p": None, **{name: None for name in names}}
    test = stats.ttest_rel(other, base)
    intervals = {name: [float(x) for x in test.confidence_interval(level)] for name, level in zip(names, levels)}
    return {"p": float(test.pvalue), **intervals}


def paired_comparison(
    baseline: dict[int, float], method: dict[int, float], min_effect: float, eval_samples: int | None
) -> dict[str, Any]:
    """One method's held-out accuracy against the baseline's on the seeds both finished (`seeds`; the others are
    named in `baseline_only` and `method_only`): the per-seed differences (method - baseline), their mean and SD, the
    paired t test (p, 95% and 90% intervals, df n - 1; none below 2 pairs), wins/losses/ties, the correlation of the
    two methods over seeds, the share of the differences' variance that is evaluation sampling noise (binomial: each
    accuracy p over N samples has variance p (1 - p) / N, estimated without bias as p̂ (1 - p̂) / (N - 1)), and the
    power analysis: the smallest difference detected with `POWER`, and the seeds `min_effect` needs at the observed
    SD, at its `SD_UPPER_LEVEL` upper confidence limit, at the SD the seeds alone would give (no eval noise), and
    at the SD with 4x the evaluation samples per run."""
    seeds = sorted(set(baseline) & set(method))
    base = np.array([baseline[s] for s in seeds], dtype=float)
    other = np.array([method[s] for s in seeds], dtype=float)
    diffs = other - base
    n = len(seeds)
    out: dict[str, Any] = {
        "seeds": seeds,
        "baseline_only": sorted(set(baseline) - set(method)),
        "method_only": sorted(set(method) - set(baseline)),
        "n": n,
        "no_spread": False,
        "differences": diffs.tolist(),
        "wins": int((diffs > 0).sum()),
        "losses": int((diffs < 0).sum()),
        "ties": int((diffs == 0).sum()),
        "mean": float(diffs.mean()) if n else None,
    }
    for key in (
        "sd",
        "p",
        "ci95",
        "ci90",
        "correlation",
        "eval_variance",
        "eval_noise_share",
        "detectable",
        "seeds_needed",
        "sd_upper",
        "seeds_needed_pessimistic",
        "sd_without_eval_noise",
        "seeds_needed_without_eval_noise",
        "sd_with_4x_eval_samples",
        "seeds_needed_with_4x_eval_samples",
    ):
        out[key] = None
    if n < 2:
        return out
    out["no_spread"] = no_spread(diffs)
    sd = 0.0 if out["no_spread"] else float(diffs.std(ddof=1))
    out["sd"] = sd
    out.update(paired_t(base, other))
    if n >= 3 and base.std() > 0 and other.std() > 0:
        out["correlation"] = float(stats.pearsonr(base, other).statistic)
    if eval_samples and eval_samples > 1:
        variance = float(np.mean((base * (1 - base) + other * (1 - other)) / (eval_samples - 1)))
        out["eval_variance"] = variance
        out["eval_noise_share"] = variance / sd**2 if sd > 0 else None
        out["sd_without_eval_noise"] = math.sqrt(max(sd**2 - variance, 0.0))
        out["seeds_needed_without_eval_noise"] = seeds_needed(min_effect, out["sd_without_eval_noise"])
        out["sd_with_4x_eval_samples"] = math.sqrt(max(sd**2 - 0.75 * variance, 0.0))  # its variance falls as 1/N
        out["seeds_needed_with_4x_eval_samples"] = seeds_needed(min_effect, out["sd_with_4x_eval_samples"])
    if out["no_spread"]:  # no SD to plan with: power and seeds needed stay unknown
        return out
    out["detectable"] = detectable_difference(sd, n)
    out["seeds_needed"] = seeds_needed(min_effect, sd)
    out["sd_upper"] = sd * math.sqrt((n - 1) / stats.chi2.ppf(1 - SD_UPPER_LEVEL, n - 1))
    out["seeds_needed_pessimistic"] = seeds_needed(min_effect, out["sd_upper"])
    return out


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (scipy.stats has only the false-discovery-rate adjustments)."""
    adjusted, running = {}, 0.0
    for rank, name in enumerate(sorted(pvalues, key=pvalues.get)):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def compare_with_baseline(
    runs: dict[str, dict[Any, dict]], baseline: str, min_effect: float, eval_samples: int | None
) -> dict[str, Any]:
    """Every other method against `baseline` on held-out Last, paired by seed (`paired_comparison`), with Holm's
    correction across the methods compared and a verdict each:

    - BETTER / WORSE: Holm-adjusted p < `ALPHA`. Then the interval at Holm's level for that comparison
      (1 - ALPHA / (m - k + 1) for the k-th smallest of m p-values, `ci_holm`) excludes 0 too.
    - EQUIVALENT: otherwise, when the 90% interval lies inside ±min_effect (two one-sided tests at `ALPHA`).
    - UNRESOLVED: otherwise, or with fewer than 2 pairs.
    """

    last = {
        name: {int(s): r["last"] for s, r in by_seed.items() if r["last"] is not None}
        for name, by_seed in runs.items()
    }
    methods = {
        name: paired_comparison(last[baseline], last[name], min_effect, eval_samples)
        for name in runs
        if name != baseline
    }
    tested = {name: c["p"] for name, c in methods.items() if c["p"] is not None}
    adjusted = holm(tested)
    for rank, name in enumerate(sorted(tested, key=tested.get)):
        c = methods[name]
        c["p_holm"], c["holm_level"] = adjusted[name], 1 - ALPHA / (len(tested) - rank)
        pairs = np.array([[last[baseline][s], last[name][s]] for s in c["seeds"]])
        c["ci_holm"] = paired_t(pairs[:, 0], pairs[:, 1], (c["holm_level"],))["ci"]
    for c in methods.values():
        c.setdefault("p_holm", None)
        c.setdefault("holm_level", None)
        c.setdefault("ci_holm", None)
        if c["p_holm"] is not None and c["p_holm"] < ALPHA:
            c["verdict"] = "BETTER" if c["mean"] > 0 else "WORSE"
        elif c["ci90"] is not None and -min_effect < c["ci90"][0] and c["ci90"][1] < min_effect:
            c["verdict"] = "EQUIVALENT"
        else:
            c["verdict"] = "UNRESOLVED"
        c["underpowered"] = c["detectable"] is not None and c["detectable"] > min_effect
    return {
        "baseline": baseline,
        "min_effect": min_effect,
        "alpha": ALPHA,
        "power": POWER,
        "metric": "held-out Last",
        "eval_samples_per_run": eval_samples,
        "methods": methods,
    }


def run_diagnostics(history: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """One run's `DIAGNOSTICS`: each the mean over the steps that logged it (a ratio: the mean of per-step ratios).
    `history` is `summarise_run`'s `history`; a column the run never logged is left out."""
    values = {}
    for column, (key, denominator) in DIAGNOSTICS.items():
        points = dict(history.get(key, []))
        if denominator is not None:
            below = dict(history.get(denominator, []))
            points = {step: value / below[step] for step, value in points.items() if below.get(step)}
        if points:
            values[column] = statistics.mean(points.values())
    return values


def diagnostics(results: dict[str, Any]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per method, each `DIAGNOSTICS` column as mean and SE over its seeds (columns no seed logged are left out)."""
    table = {}
    for method, by_seed in results["runs"].items():
        per_seed = [run_diagnostics(run["history"]) for run in by_seed.values()]
        columns = [c for c in DIAGNOSTICS if any(c in seed for seed in per_seed)]
        table[method] = {c: mean_and_se([seed[c] for seed in per_seed if c in seed]) for c in columns}
    return table


def render_diagnostics(results: dict[str, Any]) -> str:
    """The diagnosis table: what the distillation term looked like on the training rollouts, per method."""
    table = diagnostics(results)
    columns = [c for c in DIAGNOSTICS if any(c in row for row in table.values())]
    if not columns:
        return ""
    lines = [
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {method} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for method, row in table.items()),
    ]
    return "Training rollouts, mean over logged steps, then mean ± SE over seeds:\n\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Table and figures
# ---------------------------------------------------------------------------------------------------------------------
def _cell(stat: tuple[float, float] | None, digits: int = 3) -> str:
    if stat is None:
        return "—"
    mean, se = stat
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def render_table(results: dict[str, Any]) -> str:
    """The per-method table: held-out accuracy Last (mean ± SE over seeds, and each seed's) and Best, plus the final
    training entropy, response length, reward and KL."""
    lines = [
        "| method | seeds | held-out Last | Last per seed | held-out Best | sampling SE of one run | entropy | "
        "response length | training reward | KL to ref |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in results["methods"].items():
        sampling = f"{row['sampling_se']:.3f}" if row.get("sampling_se") is not None else "—"
        by_seed = results["runs"][method]
        per_seed = ", ".join(f"s{s}: {by_seed[s]['last']:.3f}" for s in row["seeds"])
        lines.append(
            f"| {method} | {len(row['seeds'])} | {_cell(row['last'])} | {per_seed} | {_cell(row['best'])} | "
            f"{sampling} | {_cell(row['entropy'], 2)} | {_cell(row['completions/mean_length'], 1)} | "
            f"{_cell(row['reward'])} | {_cell(row['kl'], 4)} |"
        )
    lines.append(
        "\n± is the standard error of the mean over seeds (SD / √n): a spread, not an interval, and not for comparing "
        "methods (see the paired comparison). Last is the final held-out evaluation; Best is the highest one, chosen "
        "on the held-out set itself, so it is optimistic."
    )
    if results.get("base_accuracy") is not None:
        lines.append(f"\nBase model before training: {results['base_accuracy']:.3f}.")
    return "\n".join(lines)


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _interval(bounds: list[float] | None) -> str:
    return "—" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def _seeds(count: int | None) -> str:
    return f"> {MAX_SEEDS}" if count is None else str(count)


def _share(share: float | None) -> str:
    return "—" if share is None else ("> 100%" if share > 1 else f"{share:.0%}")


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _seed_list(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def describe_comparison(
    method: str, baseline: str, c: dict[str, Any], min_effect: float, eval_samples: int | None
) -> str:
    """One method's comparison with the baseline in words: verdict, interval, power and what would resolve it."""
    left = [f"{baseline}'s seed(s) {_seed_list(c['baseline_only'])}"] if c["baseline_only"] else []
    left += [f"{method}'s seed(s) {_seed_list(c['method_only'])}"] if c["method_only"] else []
    left_out = f" (left out, not finished by both: {'; '.join(left)})" if left else ""
    if c["n"] == 0:
        return f"- **{method}**: no seed finished by both it and {baseline}{left_out}; not compared."
    if c["n"] == 1:
        return (
            f"- **{method}: UNRESOLVED.** One shared seed ({c['seeds'][0]}){left_out}: difference "
            f"{_signed(c['mean'])}; one pair gives no interval."
        )
    if c["no_spread"]:
        return (
            f"- **{method}: UNRESOLVED.** Paired on seeds {_seed_list(c['seeds'])}{left_out}: the difference is "
            f"{_signed(c['mean'])} on every seed. With no spread between seeds a paired test has nothing to measure "
            "the noise by (each evaluation alone is noisy), so there is no interval, verdict or power: run more seeds."
        )
    text = (
        f"- **{method}: {c['verdict']}.** Paired on seeds {_seed_list(c['seeds'])}{left_out}: differences "
        f"{', '.join(_signed(d) for d in c['differences'])}; mean {_signed(c['mean'])}, SD {c['sd']:.3f}, 95% CI "
        f"{_interval(c['ci95'])}, Holm-adjusted p {c['p_holm']:.3f} (its {c['holm_level']:.1%} interval "
        f"{_interval(c['ci_holm'])}); 90% CI {_interval(c['ci90'])} against ±{min_effect:g}. Wins/losses/ties "
        f"{c['wins']}/{c['losses']}/{c['ties']}"
    )
    if c["correlation"] is not None:
        text += f"; correlation with {baseline} over seeds {c['correlation']:.2f}"
    if c["eval_noise_share"] is not None:
        text += f"; evaluation sampling noise is {_share(c['eval_noise_share'])} of the differences' variance"
    text += (
        f". Power: {c['n']} pairs detect {c['detectable']:.3f} with {POWER:.0%} power; a difference of "
        f"{min_effect:g} needs {_seeds(c['seeds_needed'])} paired seeds at the observed SD, "
        f"{_seeds(c['seeds_needed_pessimistic'])} at its {SD_UPPER_LEVEL:.0%} upper confidence limit "
        f"({c['sd_upper']:.3f})."
    )
    if c["underpowered"]:
        text += (
            f" UNDERPOWERED: the smallest difference these seeds detect, {c['detectable']:.3f}, is above "
            f"{min_effect:g}, so a true difference of {min_effect:g} would most likely go unseen."
        )
        share = c["eval_noise_share"]
        if share is not None and share >= 0.5:
            text += (
                f" Evaluation noise is most of the variance: more evaluation samples per run (cheap) help more than "
                f"more seeds. With 4x the evaluation samples ({4 * eval_samples} per run) the SD would be "
                f"{c['sd_with_4x_eval_samples']:.3f} and {min_effect:g} would need "
                f"{_seeds(c['seeds_needed_with_4x_eval_samples'])} seeds; without evaluation noise, SD "
                f"{c['sd_without_eval_noise']:.3f} and {_seeds(c['seeds_needed_without_eval_noise'])} seeds."
            )
        elif share is not None:
            text += (
                f" Evaluation noise is {_share(share)} of the variance: more seeds help more than more evaluation "
                f"samples (even without evaluation noise, {min_effect:g} would need "
                f"{_seeds(c['seeds_needed_without_eval_noise'])} seeds)."
            )
    if c["n"] < MIN_EXACT_PAIRS:
        text += (
            f" With {c['n']} pairs no exact test (sign or permutation) can reach p < {ALPHA:g}: its smallest "
            f"two-sided p is 2 / 2^{c['n']} = {2 / 2 ** c['n']:.3f}."
        )
    return text


def render_comparisons(results: dict[str, Any]) -> str:
    """The paired comparison with the baseline: a table, then each method in words, then what the verdicts mean."""
    comparisons = results.get("comparisons")
    if not comparisons:
        return "No paired comparison: no baseline (the recipe has no `grpo`; set `baseline:` or pass --baseline)."
    baseline, delta = comparisons["baseline"], comparisons["min_effect"]
    lines = [
        f"Paired with {baseline} on the same seed (held-out Last, method - {baseline}), min_effect ±{delta:g}:",
        "",
        "| method | pairs | mean difference | 95% CI | Holm p | wins/losses/ties | verdict | detectable (80% power) | "
        f"seeds for {delta:g} (observed SD / pessimistic) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, c in comparisons["methods"].items():
        if c["n"] < 2:
            lines.append(
                f"| {method} | {c['n']} | {'—' if c['mean'] is None else _signed(c['mean'])} | — | — | "
                f"{c['wins']}/{c['losses']}/{c['ties']} | UNRESOLVED | — | — |"
            )
            continue
        lines.append(
            f"| {method} | {c['n']} | {_signed(c['mean'])} | {_interval(c['ci95'])} | {_number(c['p_holm'])} | "
            f"{c['wins']}/{c['losses']}/{c['ties']} | {c['verdict']} | {_number(c['detectable'])} | "
            f"{'—' if c['no_spread'] else _seeds(c['seeds_needed'])} / "
            f"{'—' if c['no_spread'] else _seeds(c['seeds_needed_pessimistic'])} |"
        )
    lines += [
        "",
        *(
            describe_comparison(m, baseline, c, delta, comparisons["eval_samples_per_run"])
            for m, c in comparisons["methods"].items()
        ),
    ]
    lines += [
        "",
        f"How to read it: the differences are paired by seed (methods on one seed share data order and base "
        f"sampling). The 95% CI is the paired t interval (df = pairs - 1); Holm p is corrected across the "
        f"{len(comparisons['methods'])} methods compared. BETTER / WORSE: Holm p < {ALPHA:g}. EQUIVALENT: the 90% CI "
        f"lies inside ±{delta:g} (two one-sided tests at {ALPHA:g}). UNRESOLVED: neither; the data cannot tell. "
        f'"Detectable" is the smallest true difference these pairs find with {POWER:.0%} power (noncentral t, '
        f"observed SD); the pessimistic seed count uses the {SD_UPPER_LEVEL:.0%} upper confidence limit of the SD.",
    ]
    return "\n".join(lines)


def render_report(results: dict[str, Any]) -> str:
    """results.md: warnings, the per-method table, the paired comparison and the diagnosis table."""
    parts = ["Warnings:\n" + "\n".join(f"- {w}" for w in results["warnings"])] if results.get("warnings") else []
    parts += [render_table(results), render_comparisons(results)]
    diagnosis = render_diagnostics(results)
    return "\n\n".join(parts + ([diagnosis] if diagnosis else [])) + "\n"


def plot_curves(results: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """One PNG per curve: every method in its own colour, each seed a thin line, the seeds' mean bold."""
    from .plotting import pyplot, save_curve

    plt = pyplot()
    written = []
    colours = plt.get_cmap("tab10")
    legacy = {new: old for old, new in LEGACY_KEYS.items()}  # a results.json written before the `eval_` names
    for key, (name, title) in CURVES.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for index, (method, by_seed) in enumerate(results["runs"].items()):
            colour = colours(index % 10)
            found = (r["curves"].get(key) or r["curves"].get(legacy.get(key)) for r in by_seed.values())
            curves = [dict(curve) for curve in found if curve]
            for curve in curves:
                ax.plot(list(curve), list(curve.values()), color=colour, alpha=0.3, linewidth=0.8)
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if steps:
                mean = [statistics.mean(c[s] for c in curves) for s in steps]
                ax.plot(
                    steps,
                    mean,
                    color=colour,
                    linewidth=2.2,
                    marker="o" if key == ACCURACY else None,
                    markersize=4,
                    label=f"{method} (n={len(curves)})",
                )
        path = Path(output_dir) / f"{name}.png"
        if save_curve(fig, ax, title, path, legend_size=8, dpi=110):
            written.append(path)
    return written


def plot_comparison(results: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """Two PNGs: `differences.png`, each method's per-seed differences from the baseline with their mean, 95% interval,
    the zero line and the ±min_effect band; `paired_accuracy.png`, each method's held-out Last per seed, each seed's
    results joined across the methods."""
    from .plotting import pyplot

    plt = pyplot()
    output_dir = Path(output_dir)
    written = []
    comparisons = results.get("comparisons")
    if comparisons and comparisons["methods"]:
        baseline, delta, methods = comparisons["baseline"], comparisons["min_effect"], comparisons["methods"]
        fig, ax = plt.subplots(figsize=(7, 0.6 * len(methods) + 1.5))
        ax.axvspan(-delta, delta, color="tab:green", alpha=0.12, label=f"±{delta:g} (min_effect)")
        ax.axvline(0, color="black", linewidth=0.8)
        for row, c in enumerate(reversed(list(methods.values()))):
            ax.scatter(c["differences"], [row] * c["n"], color="tab:blue", alpha=0.6, s=18, zorder=3)
            if c["ci95"] is not None:
                ax.errorbar(
                    c["mean"],
                    row,
                    xerr=[[c["mean"] - c["ci95"][0]], [c["ci95"][1] - c["mean"]]],
                    fmt="D",
                    color="black",
                    capsize=4,
                    zorder=4,
                )
            elif c["mean"] is not None:
                ax.plot(c["mean"], row, "D", color="black")
        ax.set_yticks(range(len(methods)), [f"{m} (n={c['n']})" for m, c in reversed(list(methods.items()))])
        ax.set(
            xlabel=f"held-out Last, method - {baseline}",
            title=f"Paired with {baseline}: seeds (dots), mean and 95% CI",
        )
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        written.append(output_dir / "differences.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    runs = results["runs"]
    if runs:
        names = list(runs)
        seeds = sorted({s for by_seed in runs.values() for s in by_seed})
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
        for seed in seeds:
            values = [runs[m][seed]["last"] if seed in runs[m] else None for m in names]
            ax.plot(
                range(len(names)),
                [math.nan if v is None else v for v in values],
                marker="o",
                alpha=0.6,
                label=f"seed {seed}",
            )
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set(ylabel="held-out Last", title="Held-out accuracy per method, each seed joined across methods")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        written.append(output_dir / "paired_accuracy.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_report(results: dict[str, Any], output_dir: str | Path, echo: Callable[[str], Any] = print) -> list[Path]:
    """`results.json` (every number), `results.md` (`render_report`) and the PNG figures, in `output_dir`; without
    matplotlib, the tables only, and `echo` says why there are no figures."""
    from .plotting import pyplot

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(render_report(results))
    written = [output_dir / "results.json", output_dir / "results.md"]
    try:
        pyplot()
    except ImportError as err:
        echo(f"Warning: no figures written: {err}")
        return written
    return [*written, *plot_curves(results, output_dir), *plot_comparison(results, output_dir)]
