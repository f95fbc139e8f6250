"""`sdpg-compare`: run methods x seeds on one task, everything else equal, and write the table and figures.

    sdpg-compare --config recipes/compare_demo_cpu.yaml                    # the CPU comparison in docs/RESULTS.md
    sdpg-compare --config recipes/compare_demo_cpu.yaml --methods grpo sdpg_urkl --seeds 0
    sdpg-compare --config recipes/compare_demo_cpu.yaml --render_only       # redraw from results.json
    python -m sdpg_trl.scripts.compare --config my_compare.yaml --output_dir outputs/my-compare --dry_run

Resumable: a finished run is never rerun, an interrupted or failed one starts again; a failed run does not stop the
others (the command exits non-zero at the end). Writes into the output folder one folder per run (its recipe, log,
trainer state and `run.json`), `base_eval.json`, `results.json` (every number), `results.md` (the table: held-out
Last and Best per method, mean ± standard error over seeds) and one PNG per curve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ..compare import (
    check_finished_runs,
    check_runs,
    collect,
    execute,
    load_recipe,
    plan_runs,
    train_in_subprocess,
    write_report,
)

# sdpg-evaluate flags taken from the comparison's shared training settings, so the base model is evaluated exactly
# as the runs evaluate their checkpoints.
EVAL_KEYS = (
    "dataset_name", "dataset_source", "eval_dataset_name", "arithmetic_level", "arithmetic_num_train",
    "arithmetic_num_eval", "arithmetic_seed", "eval_k", "eval_temperature", "eval_top_p", "eval_max_new_tokens",
    "eval_generation_batch_size", "eval_reward_func", "eval_seed", "dtype",
)  # fmt: skip


def evaluate_base(train: dict, model_name_or_path: str, output_dir: Path) -> None:
    """Held-out mean@k of the untrained model, once, into `base_eval.json` (skipped when it exists)."""
    target = output_dir / "base_eval.json"
    if target.is_file():
        return
    argv = [arg for key in EVAL_KEYS if key in train for arg in (f"--{key}", str(train[key]))]
    cmd = [sys.executable, "-m", "sdpg_trl.scripts.evaluate", "--model_name_or_path", model_name_or_path,
           *argv, "--output_file", str(target) + ".partial"]  # fmt: skip
    print("Evaluating the base model once (every run starts from it) ...", flush=True)
    with open(output_dir / "base_eval.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    os.replace(str(target) + ".partial", target)
    print(f"  base held-out accuracy {json.loads(target.read_text())['accuracy']:.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point `sdpg-compare`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="Comparison recipe (YAML with train, methods, seeds).")
    parser.add_argument("--output_dir", default="outputs/compare", help="Folder for the runs and the report.")
    parser.add_argument("--methods", nargs="+", help="Run only these methods of the recipe.")
    parser.add_argument("--seeds", nargs="+", type=int, help="Run only these seeds.")
    parser.add_argument("--model_name_or_path", help="Model to train (default: the recipe's, else the demo model).")
    parser.add_argument("--render_only", action="store_true", help="Redraw table and figures from results.json.")
    parser.add_argument("--dry_run", action="store_true", help="Print the runs and exit.")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    if args.render_only:
        results = json.loads((output_dir / "results.json").read_text())
        for path in write_report(results, output_dir):
            print(path)
        return
    recipe = load_recipe(args.config)
    model = args.model_name_or_path or recipe["train"].get("model_name_or_path")
    if not model and not args.dry_run:
        from ..models import smollm2_checkpoint  # the demo model, converted once and cached

        model = str(smollm2_checkpoint())
    runs = plan_runs(recipe, output_dir, methods=args.methods, seeds=args.seeds, model_name_or_path=model)
    if args.dry_run:
        for run in runs:
            print(f"{run.method:>28} seed {run.seed}: {run.folder}")
        return
    check_runs(runs)  # every run's flags parse before the first one starts
    check_finished_runs(runs)  # and the finished runs being resumed into were trained with the same flags
    output_dir.mkdir(parents=True, exist_ok=True)
    if recipe["train"].get("eval_every_steps"):
        evaluate_base(recipe["train"], model, output_dir)
    failed = execute(runs, train=train_in_subprocess, echo=lambda line: print(line, flush=True))
    results = collect(output_dir, recipe)
    written = write_report(results, output_dir)
    print((output_dir / "results.md").read_text())
    print("Wrote " + ", ".join(str(p) for p in written))
    if failed:  # the report above holds the finished runs; a rerun restarts only the failed ones
        listing = "; ".join(f"{run.method} seed {run.seed} ({error})" for run, error in failed)
        raise SystemExit(f"{len(failed)} run(s) failed: {listing}")


if __name__ == "__main__":
    main()
