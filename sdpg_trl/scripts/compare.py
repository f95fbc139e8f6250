"""`sdpg-compare`: run methods x seeds on one task, everything else equal, and write the table and figures.

    sdpg-compare --config recipes/compare_demo_cpu.yaml                    # the CPU comparison in docs/RESULTS.md
    sdpg-compare --config recipes/compare_demo_cpu.yaml --methods grpo sdpg_urkl --seeds 0
    sdpg-compare --output_dir outputs/compare --render_only                 # recompute the report from results.json
    sdpg-compare --output_dir outputs/compare --render_only --merge outputs/more_seeds  # add another folder's runs
    python -m sdpg_trl.scripts.compare --config my_compare.yaml --output_dir outputs/my-compare --dry_run

Resumable: a finished run is never rerun, an interrupted or failed one starts again; a failed run does not stop the
others (the command exits non-zero at the end). Writes into the output folder one folder per run (its recipe, log,
trainer state and `run.json`), `base_eval.json`, `results.json` (every number), `results.md` (the per-method table,
each method paired by seed with the baseline: interval, verdict and power) and the PNG figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from ..compare import (
    REPORT_KEYS,
    adopt_completed_runs,
    analyse,
    check_finished_runs,
    check_min_effect,
    check_runs,
    collect,
    collect_folder,
    completed_without_marker,
    execute,
    is_finished,
    last_evaluation_warnings,
    load_recipe,
    merge_runs,
    plan_runs,
    render_report,
    train_in_subprocess,
    write_report,
)
from ..plotting import pyplot

# sdpg-evaluate's own switches, not settings of the evaluation. `use_vllm` and the vLLM settings are: runs that roll
# out with vLLM evaluate with their vLLM engine, so the base model is evaluated with vLLM too.
# The teacher view's template and context column are not either: the held-out evaluation scores the student view, so
# methods may differ in them (e.g. an answer-only template).
NOT_EVALUATION_SETTINGS = {"model_name_or_path", "output_file", "teacher_template", "context_column"}
# The weights' dtype when a recipe sets none: trl.ModelConfig's default, which sdpg-train uses.
TRAINING_DTYPE = "float32"


def evaluation_keys() -> set[str]:
    """The `sdpg-train` settings that decide the held-out evaluation (`sdpg-evaluate`'s data, mean@k, dtype flags)."""
    from .evaluate import EvaluateArguments

    return {f.name for f in dataclasses.fields(EvaluateArguments)} - NOT_EVALUATION_SETTINGS


def evaluate_base(train: dict, model_name_or_path: str, output_dir: Path) -> None:
    """Held-out mean@k of the untrained model, once, into `base_eval.json`, with the runs' evaluation settings.

    Skipped when `base_eval.json` holds an evaluation with the same settings; redone when they changed.
    """
    target = output_dir / "base_eval.json"
    settings = {key: train[key] for key in sorted(evaluation_keys()) if train.get(key) is not None}
    settings.setdefault("dtype", TRAINING_DTYPE)  # sdpg-evaluate's own default ("auto") is not sdpg-train's
    settings["model_name_or_path"] = model_name_or_path
    if target.is_file():
        if json.loads(target.read_text()).get("settings") == settings:
            return
        print("The base evaluation in the output folder used other settings; evaluating the base model again.")
    config = output_dir / "base_eval_config.yaml"
    config.write_text(yaml.safe_dump({**settings, "output_file": str(target) + ".partial"}, sort_keys=False))
    cmd = [sys.executable, "-m", "sdpg_trl.scripts.evaluate", "--config", str(config)]
    print("Evaluating the base model once (every run starts from it) ...", flush=True)
    with open(output_dir / "base_eval.log", "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"The base evaluation failed (exit {result.returncode}); see {output_dir / 'base_eval.log'}")
    report = json.loads(Path(str(target) + ".partial").read_text())
    target.write_text(json.dumps({**report, "settings": settings, "command": cmd}, indent=2))
    os.remove(str(target) + ".partial")
    print(f"  base held-out accuracy {report['accuracy']:.3f}", flush=True)


def render_only(output_dir: Path, merge: list[str], baseline: str | None, min_effect: float | None) -> dict:
    """The report recomputed without training: from `output_dir/results.json`, with the runs of each `merge` source
    added (a `results.json` file, or a comparison folder whose finished run folders are read). The baseline and
    min_effect default to the ones results.json was made with."""
    source = output_dir / "results.json"
    if not source.is_file():
        raise SystemExit(f"--render_only: {source} does not exist (run the comparison first).")
    earlier = json.loads(source.read_text())
    parts = [(str(source), earlier)]
    for path in map(Path, merge):
        if path.is_file():
            parts.append((str(path), json.loads(path.read_text())))
        elif path.is_dir():
            parts.append((str(path), collect_folder(path)))
        else:
            raise SystemExit(f"--merge {path}: neither a results.json nor a comparison folder.")
    made_with = earlier.get("comparisons") or {}
    return analyse(
        merge_runs(parts),
        baseline=baseline or made_with.get("baseline"),
        min_effect=min_effect if min_effect is not None else made_with.get("min_effect"),
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point `sdpg-compare`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", help="Comparison recipe (YAML with train, methods, seeds); not with --render_only."
    )
    parser.add_argument("--output_dir", default="outputs/compare", help="Folder for the runs and the report.")
    parser.add_argument("--methods", nargs="+", help="Run only these methods of the recipe.")
    parser.add_argument("--seeds", nargs="+", type=int, help="Run these seeds (the recipe's or others).")
    parser.add_argument("--model_name_or_path", help="Model to train (default: the recipe's, else the demo model).")
    parser.add_argument(
        "--baseline", help="Method every other is compared with (default: the recipe's baseline:, else grpo)."
    )
    parser.add_argument(
        "--min_effect",
        type=float,
        help="Smallest held-out difference that matters (default: the recipe's, else 0.05).",
    )
    parser.add_argument(
        "--render_only", action="store_true", help="Recompute the report from results.json, without training."
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="PATH",
        help="With --render_only: add the runs of these results.json files or comparison folders to the report.",
    )
    parser.add_argument("--dry_run", action="store_true", help="Print the runs and exit.")
    args = parser.parse_args(argv)
    if args.min_effect is not None:
        try:
            check_min_effect(args.min_effect, "--min_effect")
        except ValueError as err:
            parser.error(str(err))
    if args.merge and not args.render_only:
        parser.error("--merge works with --render_only (a comparison collects its own output folder)")
    try:  # checked before any run: without matplotlib the report is the tables only
        pyplot()
    except ImportError as err:
        print(f"Warning: the report will have no figures: {err}", flush=True)

    output_dir = Path(args.output_dir)
    if args.render_only:
        try:
            results = render_only(output_dir, args.merge, args.baseline, args.min_effect)
        except ValueError as err:  # a baseline without runs, the same run with other numbers in two sources
            parser.error(str(err))
        for path in write_report(results, output_dir):
            print(path)
        print(render_report(results))
        return
    if not args.config:
        parser.error("--config is required (only --render_only works without it)")
    recipe = load_recipe(args.config)
    baseline = args.baseline or recipe.get("baseline")
    if baseline is not None and baseline not in recipe["methods"]:
        parser.error(f"--baseline {baseline!r} is not one of the recipe's methods {list(recipe['methods'])}")
    baseline = baseline or (REPORT_KEYS["baseline"] if REPORT_KEYS["baseline"] in recipe["methods"] else None)
    min_effect = args.min_effect if args.min_effect is not None else recipe.get("min_effect")
    for name, flags in recipe["methods"].items():  # the base model is evaluated once, so every run must evaluate alike
        if set(flags or {}) & evaluation_keys():
            parser.error(
                f"method {name!r} sets {sorted(set(flags) & evaluation_keys())}: data and evaluation settings "
                "belong under train:, the same for every method"
            )
    eval_sets = recipe["train"].get("eval_dataset_name")
    if isinstance(eval_sets, list) and len(eval_sets) > 1:
        parser.error(f"eval_dataset_name names {len(eval_sets)} sets, {eval_sets}: the table reports one held-out set")
    model = args.model_name_or_path or recipe["train"].get("model_name_or_path")
    if not model and not args.dry_run:
        from ..models import smollm2_checkpoint  # the demo model, converted once and cached

        model = str(smollm2_checkpoint())
    runs = plan_runs(recipe, output_dir, methods=args.methods, seeds=args.seeds, model_name_or_path=model)
    if args.dry_run:
        for run in runs:
            if is_finished(run):
                state = "finished"
            elif completed_without_marker(run):
                state = "completed without run.json: adopted if its config.yaml matches"
            elif run.folder.exists():
                state = "unfinished, restarts"
            else:
                state = "to run"
            print(f"{run.method:>28} seed {run.seed}: {run.folder.resolve()} ({state})")
        return
    from .train import make_parser  # the training stack, needed from here on only

    check_runs(runs, make_parser)  # every run's model and flags, before the first one starts
    for warning in last_evaluation_warnings(runs):
        print(f"Warning: {warning}", flush=True)
    for run in adopt_completed_runs(runs):
        print(f"{run.method} seed {run.seed}: completed earlier without run.json; counted as finished")
    check_finished_runs(runs)  # and the finished runs being resumed into were trained with the same flags
    output_dir.mkdir(parents=True, exist_ok=True)
    if recipe["train"].get("eval_every_steps"):
        evaluate_base(recipe["train"], model, output_dir)
    failed = execute(runs, train=train_in_subprocess, echo=lambda line: print(line, flush=True))
    # Every finished run in the folder, not only this invocation's (e.g. seeds added with --seeds).
    results = collect(output_dir, recipe, model_name_or_path=model, baseline=baseline, min_effect=min_effect)
    written = write_report(results, output_dir)
    print(render_report(results))
    print("Wrote " + ", ".join(str(p) for p in written))
    if failed:  # the report above holds the finished runs; a rerun restarts only the failed ones
        listing = "; ".join(f"{run.method} seed {run.seed} ({error})" for run, error in failed)
        raise SystemExit(f"{len(failed)} run(s) failed: {listing}")


if __name__ == "__main__":
    main()
