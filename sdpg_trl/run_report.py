"""What a run tells its user when it starts: a distillation schedule that never reaches `distill_coef`.

The paper's schedule (`distill_warmup_steps` 50, `distill_decay_steps` 350) is written for its 400-step runs. On a
shorter run the warmup and the decay overlap and `beta(k)` stays below `distill_coef`: a 2-step run with the defaults
distils at 5.7e-8 at most. `DistillScheduleReport` warns once per `train()`, when `state.max_steps` is known, with
the peak the run will reach and the step where it does.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from .config import SDPGConfig
from .losses import distill_coef_schedule

logger = logging.getLogger(__name__)


def distill_peak(args: SDPGConfig, max_steps: int) -> tuple[float, int]:
    """The largest `beta(k)` over the run's optimiser steps `k = 0 .. max_steps - 1`, and the first `k` reaching it.

    `beta(k)` is piecewise linear times linear (SPEC 2.3): constant, monotone or a concave parabola peaking at
    `max_steps / 2` on each piece, so its maximum is at a piece's end or at the middle of the run.
    """
    warmup, decay = args.distill_warmup_steps, args.distill_decay_steps
    last = max(max_steps - 1, 0)
    candidates = {0, warmup, max_steps - decay, max_steps // 2, (max_steps + 1) // 2, last}
    steps = sorted(min(max(k, 0), last) for k in candidates)
    values = [distill_coef_schedule(k, max_steps, args.distill_coef, warmup, decay) for k in steps]
    peak = max(values)
    return peak, steps[values.index(peak)]


class DistillScheduleReport(TrainerCallback):
    """Warn at the start of training (once, on the main process) when `beta(k)` never reaches `distill_coef` within
    `max_steps`."""

    def on_train_begin(self, args: SDPGConfig, state, control, **kwargs):
        if args.distill_coef <= 0 or state.max_steps <= 0 or not state.is_world_process_zero:
            return
        peak, step = distill_peak(args, state.max_steps)
        if peak >= args.distill_coef * (1 - 1e-9):
            return
        logger.warning(
            "The distillation weight beta(k) never reaches distill_coef=%g in this run: with max_steps=%d, "
            "distill_warmup_steps=%d and distill_decay_steps=%d the warmup and the decay overlap, and beta(k) peaks "
            "at %.3g (%.3g of distill_coef) at optimiser step %d of %d. To distil at distill_coef, train for at least "
            "distill_warmup_steps + distill_decay_steps = %d steps, or shorten the two windows (0 turns one off).",
            args.distill_coef,
            state.max_steps,
            args.distill_warmup_steps,
            args.distill_decay_steps,
            peak,
            peak / args.distill_coef,
            step + 1,
            state.max_steps,
            args.distill_warmup_steps + args.distill_decay_steps,
        )
