"""Curves of a run as PNG files, drawn with matplotlib, which is the `plots` extra, not part of the core install.

`CurvesCallback` (added by `SDPGTrainer`) writes them into `output_dir` at the end of training when matplotlib is
installed, and otherwise logs how to get them; `plot_curves` draws them from any `trainer_state.json` log history.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

PLOTS_EXTRA = "pip install 'sdpg-trl[plots]'"

# One PNG per curve: file name -> (title, [(log key or fnmatch pattern, label)]). Keys absent from the log are
# skipped, and so is a curve with none of its keys; a pattern draws every key it matches, labelled by the key.
CURVES = {
    "reward": ("Mean reward of the rollouts", [("reward", "reward")]),
    "accuracy": (
        "Held-out mean@k accuracy",
        [("eval_accuracy", "eval accuracy"), ("eval_*_accuracy", None)],
    ),
    "entropy": ("Policy entropy of sampled tokens", [("entropy", "entropy")]),
    "kl": (
        "KL terms",
        [("sdpg/distill_kl", "distillation KL(student || teacher), gated"), ("kl", "KL to the reference")],
    ),
    "response_length": (
        "Response length (tokens)",
        [("completions/mean_length", "training rollouts"), ("eval_completion_length", "evaluation samples")],
    ),
}


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the headless Agg backend (the runs, the demo and the comparison only write files)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            f"Plotting needs matplotlib, which the core install of sdpg-trl leaves out: {PLOTS_EXTRA}."
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(log_history: list[dict], pattern: str, label: str | None) -> list[tuple[str, list, list]]:
    """`(label, steps, values)` of each logged key `pattern` names (itself, or the keys it matches)."""
    keys = sorted({key for entry in log_history for key in entry if fnmatch.fnmatchcase(key, pattern)})
    if label is not None:
        keys = [pattern] if pattern in keys else []
    found = []
    for key in keys:
        points = [(entry["step"], entry[key]) for entry in log_history if entry.get(key) is not None]
        if points:
            steps, values = zip(*points, strict=True)
            found.append((label or key, list(steps), list(values)))
    return found


def save_curve(fig: Any, ax: Any, title: str, path: Path, *, legend_size: float | None = None, dpi: int = 100) -> bool:
    """Finish one curve figure (title, integer optimiser steps, grid, legend) and write it as a PNG at `path`, unless
    nothing was drawn; close it either way. Returns whether the file was written."""
    from matplotlib.ticker import MaxNLocator

    drawn = bool(ax.lines)
    if drawn:
        ax.set(title=title, xlabel="optimiser step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return drawn


def plot_curves(log_history: list[dict], output_dir: str | Path) -> list[Path]:
    """One PNG per entry of `CURVES` that the log has, value against optimiser step, in `output_dir` (made if
    missing); returns the files written."""
    plt = pyplot()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, series) in CURVES.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for pattern, label in series:
            for line_label, steps, values in _series(log_history, pattern, label):
                ax.plot(steps, values, marker="o", label=line_label)
        path = Path(output_dir) / f"{name}.png"
        if save_curve(fig, ax, title, path):
            written.append(path)
    return written


class CurvesCallback(TrainerCallback):
    """At the end of training, the main process writes the run's curves into `output_dir` as PNG files, or, without
    matplotlib, logs how to get them."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        try:
            pyplot()
        except ImportError:
            logger.warning(
                "No PNG curves written to %s: drawing them needs matplotlib (%s); the numbers are in the "
                "trainer's state.log_history.",
                args.output_dir,
                PLOTS_EXTRA,
            )
            return
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        written = plot_curves(state.log_history, args.output_dir)
        logger.info("Curves written to %s: %s.", args.output_dir, ", ".join(path.name for path in written))
