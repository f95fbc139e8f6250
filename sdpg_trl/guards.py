"""Non-finite values never reach the weights: a step whose loss, gradient or rewards are not finite is skipped.

`StepGuard` is a `TrainerCallback`. The trainer hands it each micro-batch's loss (and whether the generation batch
behind it had a broken reward) and each step's total gradient norm before clipping (which overflows to inf while every
gradient entry is finite, e.g. at `distill_coef` 1e30). Just before the optimizer step it checks the gradients too,
agrees across processes, and on a bad step makes that one call of the (accelerate-wrapped) optimizer a no-op marked as
skipped, so that the Trainer does not step the learning-rate scheduler either. `transformers.Trainer` then zeroes
the gradients as usual, so nothing of the bad step survives. After `max_consecutive_skipped_steps` skips in a row
training stops with an error.

What is logged: `skipped_steps` (skipped optimizer steps so far in the run) next to every training `loss`, and
`loss` itself is the mean over the steps of the logging window that were optimised, or `None` when every step of the
window was skipped (never the 0.0 or running average that `logging_nan_inf_filter` substitutes for a NaN). A skipped
step forces a log entry at its step, so the count reaches the log history (and any checkpoint) at once.

Under DeepSpeed the engine steps inside `accelerator.backward`, before any callback runs, so the skip is DeepSpeed's
own: its ZeRO optimizers discard a step whose gradient norm is not finite (no update, no scheduler step). The guard
hands it every step it must skip: `deepspeed_loss` turns the loss of a batch with a broken reward into NaN before
the backward, so its gradients are not finite; then the guard reads whether DeepSpeed skipped, and counts and logs
the step as above.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def reward_fault(rewards_per_func: torch.Tensor, names: list[str]) -> str | None:
    """Why a generation batch's rewards cannot be trained on, or None when they can.

    `rewards_per_func` is GRPOTrainer's `(completions, reward functions)` matrix, gathered over processes, with None
    already turned into NaN. An infinite reward is always a bug (GRPO would turn its group's advantages into NaN and
    then silently to 0). A NaN/None for some rows keeps GRPO's meaning ("this function does not apply"); a batch in
    which no completion has any reward at all is refused, since it carries no outcome signal.
    """
    total = rewards_per_func.size(0)
    infinite = torch.isinf(rewards_per_func).sum(0).tolist()
    culprits = [
        f"{name!r} returned inf for {count} of {total} completions" for name, count in zip(names, infinite) if count
    ]
    if culprits:
        return "reward function " + "; ".join(culprits)
    if total > 0 and torch.isnan(rewards_per_func).all():
        functions = ", ".join(map(repr, names))
        return f"no completion has a reward: every reward function ({functions}) returned None or NaN"
    return None


def _nonfinite_grad(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grads = [g.to_local() if isinstance(g, DTensor) else g for g in grads]  # FSDP2: each process checks its shard
    return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class StepGuard(TrainerCallback):
    """Skip optimizer steps whose loss, gradients or rewards are not finite; stop after too many in a row.

    Args:
        max_consecutive_skipped_steps: training raises once this many optimizer steps in a row were skipped.
        deepspeed: the optimizer is DeepSpeed's, which steps inside the backward pass and skips non-finite steps.
    """

    def __init__(self, max_consecutive_skipped_steps: int, deepspeed: bool = False):
        self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
        self.deepspeed = deepspeed
        self.skipped_steps = 0
        self.consecutive = 0
        self._reset_step()
        self._window = [0.0, 0]  # loss sum and number of optimised steps since the last logged `loss`
        self._run = [0.0, 0]  # the same over this `train()` call, for `train_loss`
        self._restore_optimizer = None

    def _reset_step(self) -> None:
        self._loss: torch.Tensor | None = None  # sum of this step's micro-batch losses, as the Trainer sums them
        self._fault: str | None = None
        self._grad_norm: float | None = None  # this step's total gradient norm before clipping, when handed over
        self._skip: str | None = None
        self._step_loss = 0.0

    # Fed by the trainer ----------------------------------------------------------------------------------------------
    def observe(self, loss: torch.Tensor, fault: str | None = None) -> None:
        """One micro-batch's loss (as `training_step` returns it) and the fault of its generation batch, if any."""
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss
        self._fault = self._fault or fault

    def deepspeed_loss(self, loss: torch.Tensor, fault: str | None) -> torch.Tensor:
        """The micro-batch loss to back-propagate under DeepSpeed: NaN for a generation batch with a broken reward,
        so that DeepSpeed's non-finite-gradient check discards the step (finite gradients would be applied)."""
        return loss * float("nan") if fault is not None else loss

    def observe_grad_norm(self, grad_norm: torch.Tensor | float | None) -> None:
        """The step's total gradient norm before clipping, as the Trainer computes it (None when it computes none).

        Every gradient entry can be finite while their norm overflows (inf); clipping then scales the gradients to 0,
        and without this check the optimizer and the scheduler would still step."""
        self._grad_norm = None if grad_norm is None else float(grad_norm)

    def rewrite_logs(self, logs: dict) -> None:
        """Replace the Trainer's `loss` and `train_loss` by means over optimised steps; add `skipped_steps`."""
        if "loss" in logs:
            total, steps = self._window
            logs["loss"] = total / steps if steps else None
            logs["skipped_steps"] = self.skipped_steps
            self._window = [0.0, 0]
        if "train_loss" in logs:
            total, steps = self._run
            logs["train_loss"] = total / steps if steps else None

    # Callback events -------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        # Resumed runs continue the count from the last log (a skipped step always logs at once).
        self.skipped_steps = next((h["skipped_steps"] for h in reversed(state.log_history) if "skipped_steps" in h), 0)
        self.consecutive = 0
        self._window, self._run = [0.0, 0], [0.0, 0]

    def on_step_begin(self, args, state, control, **kwargs):
        self._reset_step()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        loss = self._loss if self._loss is not None else torch.zeros((), device=args.device)
        # Under DeepSpeed the step has already run: a non-finite gradient shows as DeepSpeed's skip.
        deepspeed_skipped = self.deepspeed and optimizer.step_was_skipped
        bad_norm = self._grad_norm is not None and not math.isfinite(self._grad_norm)
        flags = torch.stack(
            [
                torch.tensor(float(_nonfinite_grad(model) or deepspeed_skipped), device=loss.device),
                torch.tensor(float(bad_norm), device=loss.device),
                (~torch.isfinite(loss)).float(),
                torch.tensor(float(self._fault is not None), device=loss.device),
                loss,
            ]
        )
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags)  # every process must take the same decision
            world = dist.get_world_size()
        bad_grad, bad_norm, bad_loss, bad_batch, loss_sum = flags.tolist()
        self._step_loss = loss_sum / world
        if bad_batch:
            self._skip = self._fault or "the generation batch of another process has a broken reward"
        elif bad_loss:
            self._skip = f"the loss is not finite ({loss_sum})"
        elif bad_grad:
            self._skip = "a gradient is not finite"
        elif bad_norm:
            self._skip = f"the gradient norm is not finite ({self._grad_norm}), although every gradient entry is"
        if self._skip is not None and not self.deepspeed:
            self._skip_optimizer_step(optimizer)
        elif self._skip is not None and not deepspeed_skipped:
            raise RuntimeError(
                f"DeepSpeed applied optimizer step {state.global_step + 1}, which SDPG had to skip because "
                f"{self._skip}: "
                "its non-finite-gradient check is off (bf16 with `check_grad_overflow: false` in the DeepSpeed "
                "config?). Turn it on so that non-finite steps are skipped."
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self._restore_optimizer is not None:
            self._restore_optimizer()
            self._restore_optimizer = None
        if self._skip is None:
            self.consecutive = 0
            for acc in (self._window, self._run):
                acc[0] += self._step_loss
                acc[1] += 1
            return
        self.skipped_steps += 1
        self.consecutive += 1
        control.should_log = True  # put the count in the log history now
        if self.consecutive >= self.max_consecutive_skipped_steps:
            first = state.global_step - self.consecutive + 1
            raise RuntimeError(
                f"SDPG stopped training: {self.consecutive} optimizer steps in a row "
                f"(steps {first}-{state.global_step}) had non-finite values and were skipped; the last one because "
                f"{self._skip}. Check the reward functions, the data and the learning rate "
                f"(SDPGConfig.max_consecutive_skipped_steps={self.max_consecutive_skipped_steps})."
            )
        logger.warning(
            "SDPG skipped optimizer step %d because %s: no optimizer or scheduler step was taken "
            "(%d skipped in a row; training stops at %d).",
            state.global_step,
            self._skip,
            self.consecutive,
            self.max_consecutive_skipped_steps,
        )

    # The skip itself -------------------------------------------------------------------------------------------------
    def _skip_optimizer_step(self, optimizer) -> None:
        """Make the next `optimizer.step()` a no-op that accelerate reports as skipped (so the scheduler holds)."""
        noop = lambda *args, **kwargs: None  # noqa: E731
        if getattr(optimizer, "scaler", None) is not None:
            # Mixed precision with a GradScaler: let accelerate run scaler.step/update (the scaler's bookkeeping stays
            # consistent) with an inner step that does nothing; accelerate then marks the step as skipped itself.
            original = optimizer._optimizer_patched_step_method
            optimizer._optimizer_patched_step_method = noop

            def restore():
                optimizer._optimizer_patched_step_method = original
        else:
            optimizer.step = noop  # an instance attribute shadows AcceleratedOptimizer.step for this one call
            optimizer._is_overflow = True  # read by `accelerator.optimizer_step_was_skipped`

            def restore():
                optimizer.__dict__.pop("step", None)
                optimizer._is_overflow = False

        self._restore_optimizer = restore
