"""The metrics of SDPG's loss at each step, as `SDPGTrainer.compute_loss` logs them, over every process's tokens
whatever this process's data (every process takes part in every reduction, in the same order).

Two kinds, by whose definition they follow:
- SDPG's own (`sdpg/*`, `rlsd/*`): one value per optimizer step, the ratio of sums over the whole accumulation window
  (every micro-batch, every process; `StepSums`), so that it does not depend on how the step's batch is split into
  micro-batches and processes. A mean over no tokens is undefined and logged as NaN, which `GRPOTrainer.log` leaves
  out of its average over the logging window (and logs as None when no value remains), never as 0.
- GRPOTrainer's (`entropy`, `kl`, `clip_ratio/*`, the loss type's own) as GRPOTrainer defines them: one value per
  micro-batch (a mean over the processes' tokens of that micro-batch; the min/max over its sequences), 0 over no
  tokens, so that SDPG runs read like GRPO runs. `grad_norm/*` are per micro-batch too (see `term_grad_norms`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from .head_kernels import HeadScores
from .losses import Outcome, OutcomeOptions, TokenSelection, get_loss_type, k3_kl, masked_mean, masked_totals
from .step_terms import PerTokenTerms, StepCoefficients


class StepSums:
    """One optimizer step's ratio metrics, accumulated over its micro-batches: per key, the `(numerator, denominator)`
    sums of this process, and the step's constants (its coefficients)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.constants: dict[str, float] = {}

    def add(self, key: str, numerator: torch.Tensor, denominator: torch.Tensor | float) -> None:
        """Add a micro-batch's numerator and denominator (scalars) to the key's sums."""
        totals = torch.stack([numerator, torch.as_tensor(denominator, dtype=numerator.dtype, device=numerator.device)])
        self.sums[key] = totals if key not in self.sums else self.sums[key] + totals

    def mean(self, key: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a micro-batch's `values` where `mask` is set to the key's mean."""
        self.add(key, *masked_totals(values, mask))

    def append_to(self, metrics: dict, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Append each key's ratio of sums over every process (`reduce`: one sum over processes for all keys), NaN
        where the denominator is 0, and each constant to `metrics`; then start the next step."""
        if self.sums:  # the same keys in the same order on every process: they depend on the step, not on its data
            keys = list(self.sums)
            numerator, denominator = reduce(torch.stack([self.sums[key] for key in keys])).unbind(-1)
            ratios = torch.where(denominator != 0, numerator / denominator, torch.nan)
            for key, value in zip(keys, ratios.tolist(), strict=True):
                metrics[key].append(value)
        for key, value in self.constants.items():
            metrics[key].append(value)
        self.sums, self.constants = {}, {}


class LossMetrics:
    """Appends one micro-batch's loss metrics to a trainer's `_metrics[mode]` lists, reduced with `accelerator`;
    SDPG's own once per optimizer step (train: at the accumulation window's last micro-batch; eval: each call)."""

    def __init__(self, accelerator: Accelerator, args: Any) -> None:
        self.accelerator, self.args = accelerator, args
        self.steps = {"train": StepSums(), "eval": StepSums()}

    def global_masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of `values` over every process's tokens where `mask` is set (0 over none, as GRPOTrainer's)."""
        return masked_mean(values, mask, reduce=self.reduce).item()

    def reduce(self, totals: torch.Tensor) -> torch.Tensor:
        """`totals` summed over every process."""
        return self.accelerator.reduce(totals, reduction="sum")

    def log(
        self,
        metrics: dict,
        mode: str,
        inputs: dict[str, Any],
        mask: torch.Tensor,
        scores: HeadScores,
        selection: TokenSelection,
        terms: PerTokenTerms,
        step: StepCoefficients,
    ) -> None:
        """The micro-batch's metrics; those of a term the method has (`step.method`) are logged from step 0, also
        while its schedule is at 0 (then as NaN: nothing was distilled)."""
        # GRPOTrainer's, per micro-batch
        metrics["entropy"].append(self.global_masked_mean(scores.entropy, mask))
        if terms.anchor is not None:
            kl = k3_kl(scores.logps, inputs["ref_per_token_logps"])
            if self.args.use_bias_correction_kl:  # GRPOTrainer logs the importance-weighted estimate
                kl = kl * terms.policy.ratio
            metrics["kl"].append(self.global_masked_mean(kl, mask))
        self.ratios(metrics, terms.policy, terms.options, terms.token_advantages, mask)
        # SDPG's, over the optimizer step
        sums = self.steps[mode]
        sums.constants["sdpg/distill_coef"] = step.distill_coef
        sums.add("sdpg/gate_ratio", selection.gate.float().sum(), selection.gate.numel())
        if step.method.distill:
            self.distill(sums, inputs, scores, terms.distill_weight, selection.distilled)
        if step.method.rlsd:
            sums.constants["rlsd/lambda"] = step.rlsd_lam
            if step.terms.rlsd:
                scored = selection.distilled | selection.teacher_only
                advantages = inputs["advantages"].unsqueeze(1)
                sums.mean(
                    "rlsd/advantage_weight", terms.token_advantages / advantages.where(advantages != 0, 1.0), scored
                )
                sums.mean("rlsd/teacher_minus_sampler_logp", scores.teacher_logps - terms.sampler_logps, scored)
        if terms.anchor is not None:
            sums.mean("sdpg/anchor", terms.anchor, mask)
        if mode != "train" or self.accelerator.sync_gradients:
            sums.append_to(metrics, self.reduce)

    @staticmethod
    def distill(
        sums: StepSums,
        inputs: dict[str, Any],
        scores: HeadScores,
        distill_weight: torch.Tensor,
        distilled: torch.Tensor,
    ) -> None:
        """The distillation term's metrics over the distilled tokens, and the leakage signal: the share of the KL on
        completion tokens that also occur in the privileged context."""
        sums.mean("sdpg/distill_kl", scores.distill_kl, distilled)
        sums.mean("sdpg/teacher_minus_student_logp", scores.teacher_logps - scores.logps, distilled)
        sums.mean("sdpg/teacher_entropy", scores.teacher_entropy, distilled)
        sums.mean("sdpg/student_entropy", scores.entropy, distilled)
        sums.mean("sdpg/distilled_token_share", distill_weight, distilled)
        if "context_token_mask" in inputs:
            on_context = inputs["context_token_mask"] & distilled
            kl = scores.distill_kl
            sums.add("sdpg/kl_share_on_context_tokens", (kl * on_context).sum(), (kl * distilled).sum())
            sums.mean("sdpg/context_token_share", on_context.float(), distilled)

    def ratios(
        self, metrics: dict, policy: Outcome, options: OutcomeOptions, advantages: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """GRPOTrainer's importance-ratio metrics for the loss type, under its names, so SDPG runs read like GRPO
        runs: `clip_ratio/*` (PPO's clipped types) and the loss type's own (`LossType.metrics`)."""
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        ratio, loss_type = policy.ratio.detach(), get_loss_type(options.loss_type)

        def mean(values: torch.Tensor) -> float:  # `(B, 1)`: one value per sequence, averaged over sequences (TRL)
            return self.global_masked_mean(values, torch.ones_like(values) if values.size(1) == 1 else mask)

        for name, values in (loss_type.metrics(policy, options, adv) if loss_type.metrics else {}).items():
            metrics[name].append(mean(values))
        if not loss_type.clipped:
            return
        if options.delta is not None:  # GRPOTrainer measures the ratio after its two-sided cap
            ratio = ratio.clamp(max=options.delta)
        low = ((ratio < 1 - options.epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + options.epsilon_high) & (adv > 0)).float()
        metrics["clip_ratio/low_mean"].append(mean(low))
        metrics["clip_ratio/high_mean"].append(mean(high))
        metrics["clip_ratio/region_mean"].append(mean(torch.maximum(low, high)))

        def per_sequence(x: torch.Tensor) -> torch.Tensor:  # nan for an empty row, as in TRL
            return x.squeeze(1) if x.size(1) == 1 else (x * mask).sum(-1) / mask.sum(-1)

        low_min = self.accelerator.gather(per_sequence(low)).nan_to_num(nan=float("inf")).min()
        high_max = self.accelerator.gather(per_sequence(high)).nan_to_num(nan=-float("inf")).max()
        metrics["clip_ratio/low_min"].append(low_min.item())
        metrics["clip_ratio/high_max"].append(high_max.item())

    def term_grad_norms(self, metrics: dict, objective: Callable[[str], torch.Tensor], hidden: torch.Tensor) -> None:
        """`grad_norm/{outcome,distill,anchor}`: each term's gradient norm at the final hidden states, over all
        processes, per micro-batch (the norm of its contribution: the window's would need every micro-batch's
        gradient kept); one extra LM-head backward per term (`log_term_grad_norms`). `objective(name)` is the loss
        of that term alone."""
        for name in ("outcome", "distill", "anchor"):
            part = objective(name)
            grad = None
            if part.requires_grad:  # a term this step does not use is a constant 0
                grad = torch.autograd.grad(part, hidden, retain_graph=True, allow_unused=True)[0]
            norm = torch.zeros((), device=hidden.device) if grad is None else grad.float().square().sum()
            metrics[f"grad_norm/{name}"].append(self.accelerator.reduce(norm, reduction="sum").sqrt().item())
