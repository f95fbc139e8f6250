"""Methods x seeds on one task, everything else equal: the plan, the runs, the aggregate table and the figures.

A comparison recipe (YAML) has three keys:

    train:   {...}              # sdpg-train flags every run shares (no method field)
    methods: {name: {...}, ...} # per method, the flags that make it, e.g. {method: rlsd} or {distill_coef: 0.0}
    seeds:   [0, 1, 2]

Each run is `sdpg-train` in a fresh process on `train + methods[name] + {seed, output_dir}`, in
`<output_dir>/<name>/seed<seed>/`, where its merged recipe (`config.yaml`), its log (`train.log`), the trainer's
`trainer_state.json` and a `run.json` marker are written. A folder with both files is finished and skipped; any
other folder is cleared and rerun. A run that fails is reported and the comparison goes on with the next one. Runs go
seed by seed (every method of seed 0 first), so a comparison cut short still has whole seeds. The base model is
evaluated once (`base_eval.json`): it is the same model with the same seeded sampling for every run, so the runs
themselves skip their step-0 evaluation.
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

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id

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


@dataclass(frozen=True)
class Run:
    """One training run of the comparison."""

    method: str
    seed: int
    folder: Path
    config: dict[str, Any]


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a comparison recipe and check its shape (not yet its flags: `check_runs` does that)."""
    recipe = yaml.safe_load(Path(path).read_text())
    if not isinstance(recipe, dict) or set(recipe) != {"train", "methods", "seeds"}:
        raise ValueError(f"{path}: a comparison recipe has exactly the keys train, methods and seeds.")
    if not recipe["methods"] or not recipe["seeds"]:
        raise ValueError(f"{path}: methods and seeds must not be empty.")
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
            folder = Path(output_dir) / name / f"seed{seed}"
            config = {**recipe["train"], **(flags or {}), "seed": seed, "output_dir": str(folder),
                      "eval_before_training": False}  # fmt: skip
            if model_name_or_path:
                config["model_name_or_path"] = model_name_or_path
            runs.append(Run(name, seed, folder, config))
    return runs


def check_runs(runs: list[Run], make_parser: Callable[[], TrlParser]) -> None:
    """Check every run before the first one starts: its model (`model_problem`) and its configuration, which must
    parse with `make_parser()`, `sdpg-train`'s parser (`sdpg_trl.scripts.train.make_parser`, handed down by the
    script). Raises `ValueError` naming the run and what is wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            problem = model_problem(run.config.get("model_name_or_path"))
            if problem:
                raise ValueError(f"Method {run.method!r}, seed {run.seed}: {problem}")
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(run.config))
            try:
                make_parser().parse_args_and_config(args=["--config", str(path)], fail_with_unknown_args=True)
            except (ValueError, SystemExit) as err:
                raise ValueError(
                    f"Method {run.method!r}, seed {run.seed}: its configuration does not parse: {err}"
                ) from err


def model_problem(model: str | None) -> str | None:
    """What is wrong with a run's `model_name_or_path`, or None: a local folder must exist, anything else must be a
    valid Hub id (whether the Hub has it is left to the run, which may be offline)."""
    if not model:
        return "no model_name_or_path: set it under train:, or pass --model_name_or_path."
    path = Path(model).expanduser()
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
            warnings.add(f"{run.method}: max_steps {steps} is not a multiple of eval_every_steps {every}, so 'Last' "
                         f"is the accuracy at step {steps - steps % every}, not of the final model.")  # fmt: skip
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
            "Finished runs in the output folder were trained with other settings:\n" + "\n".join(lines)
            + "\nUse another --output_dir, or delete those run folders to train them again."
        )  # fmt: skip


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
            shutil.rmtree(run.folder)
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
        marker = {"method": run.method, "seed": run.seed, "wall_s": durations[-1], "started": started,
                  "finished": _now(), **facts, **revision, "config": run.config}  # fmt: skip
        (run.folder / FINISHED).write_text(json.dumps(marker, indent=2))
        evals = [h[ACCURACY] for h in read_history(run.folder) if ACCURACY in h]
        eta = statistics.mean(durations) * (len(todo) - index) / 60
        last = f"held-out last {evals[-1]:.3f}" if evals else "no evaluation"
        echo(f"{label} done in {durations[-1] / 60:.1f} min ({last}); about {eta:.0f} min to go")
    return failed


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
        for key, points in curves.items() if key != ACCURACY
    }  # fmt: skip
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


def collect(output_dir: str | Path, recipe: dict[str, Any]) -> dict[str, Any]:
    """Every finished run's summary, the aggregate per method, and the base evaluation, as one JSON-able dict."""
    output_dir = Path(output_dir)
    base_file = output_dir / "base_eval.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    base_accuracy = base["accuracy"] if base else None
    # Samples per evaluation, for the binomial SE: as the base evaluation counted them (any data set), else from the
    # recipe's arithmetic settings.
    train = recipe["train"]
    if base and base.get("num_problems") and base.get("k"):
        num_eval_samples = base["num_problems"] * base["k"]
    else:
        num_eval_samples = train.get("arithmetic_num_eval", 0) * train.get("eval_k", 0) or None
    runs: dict[str, dict[int, dict]] = {}
    for run in plan_runs(recipe, output_dir):
        if is_finished(run):
            runs.setdefault(run.method, {})[run.seed] = summarise_run(read_history(run.folder), base_accuracy)
    return {
        "base_accuracy": base_accuracy,
        "eval_samples_per_run": num_eval_samples,
        "runs": runs,
        "methods": aggregate(runs, num_eval_samples),
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
    """The paper's table: held-out accuracy Last / Best per method, mean ± SE over seeds, plus the final training
    entropy, response length, reward and KL."""
    lines = [
        "| method | seeds | held-out Last | held-out Best | sampling SE of one run | entropy | response length | "
        "training reward | KL to ref |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in results["methods"].items():
        sampling = f"{row['sampling_se']:.3f}" if row.get("sampling_se") is not None else "—"
        lines.append(
            f"| {method} | {len(row['seeds'])} | {_cell(row['last'])} | {_cell(row['best'])} | {sampling} | "
            f"{_cell(row['entropy'], 2)} | {_cell(row['completions/mean_length'], 1)} | {_cell(row['reward'])} | "
            f"{_cell(row['kl'], 4)} |"
        )
    if results.get("base_accuracy") is not None:
        lines.append(f"\nBase model before training: {results['base_accuracy']:.3f}.")
    return "\n".join(lines)


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
                ax.plot(steps, mean, color=colour, linewidth=2.2, marker="o" if key == ACCURACY else None,
                        markersize=4, label=f"{method} (n={len(curves)})")  # fmt: skip
        path = Path(output_dir) / f"{name}.png"
        if save_curve(fig, ax, title, path, legend_size=8, dpi=110):
            written.append(path)
    return written


def write_report(results: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """`results.json` (every number), `results.md` (the table and the diagnosis table) and the PNG figures, in
    `output_dir`."""
    output_dir = Path(output_dir)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    diagnosis = render_diagnostics(results)
    (output_dir / "results.md").write_text(render_table(results) + ("\n\n" + diagnosis if diagnosis else "") + "\n")
    return [output_dir / "results.json", output_dir / "results.md", *plot_curves(results, output_dir)]
