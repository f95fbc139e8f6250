"""The metrics of SDPG's loss at each step, as `SDPGTrainer.compute_loss` logs them: every one a mean over every
process's tokens, whatever this process's data (every process takes part in every reduction, in the same order)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from .head_kernels import HeadScores
from .losses import Outcome, OutcomeOptions, TokenSelection, get_loss_type, k3_kl, masked_mean
from .step_terms import PerTokenTerms, StepCoefficients


class LossMetrics:
    """Appends one step's loss metrics to a trainer's `_metrics[mode]` lists, reduced with `accelerator`."""

    def __init__(self, accelerator: Accelerator, args: Any) -> None:
        self.accelerator, self.args = accelerator, args

    def global_masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of `values` over every process's tokens where `mask` is set."""
        reduce = lambda totals: self.accelerator.reduce(totals, reduction="sum")  # noqa: E731
        return masked_mean(values, mask, reduce=reduce).item()

    def log(
        self,
        metrics: dict,
        inputs: dict[str, Any],
        mask: torch.Tensor,
        scores: HeadScores,
        selection: TokenSelection,
        terms: PerTokenTerms,
        step: StepCoefficients,
    ) -> None:
        """The step's metrics; those of a term the method has (`step.method`) are logged from step 0, also while its
        schedule is at 0."""
        mean = self.global_masked_mean
        metrics["entropy"].append(mean(scores.entropy, mask))
        metrics["sdpg/distill_coef"].append(step.distill_coef)
        metrics["sdpg/gate_ratio"].append(self.accelerator.gather(selection.gate).mean().item())
        if step.method.distill:
            self.distill(metrics, inputs, scores, terms.distill_weight, selection.distilled)
        if step.method.rlsd:
            scored = selection.distilled | selection.teacher_only
            metrics["rlsd/lambda"].append(step.rlsd_lam)
            if step.terms.rlsd:
                advantages = inputs["advantages"].unsqueeze(1)
                ratio = terms.token_advantages / advantages.where(advantages != 0, 1.0)
                metrics["rlsd/advantage_weight"].append(mean(ratio, scored))
                teacher_minus_sampler = scores.teacher_logps - terms.sampler_logps
                metrics["rlsd/teacher_minus_sampler_logp"].append(mean(teacher_minus_sampler, scored))
        if terms.anchor is not None:
            metrics["sdpg/anchor"].append(mean(terms.anchor, mask))
            kl = k3_kl(scores.logps, inputs["ref_per_token_logps"])
            if self.args.use_bias_correction_kl:  # GRPOTrainer logs the importance-weighted estimate
                kl = kl * terms.policy.ratio
            metrics["kl"].append(mean(kl, mask))
        self.ratios(metrics, terms.policy, terms.options, terms.token_advantages, mask)

    def distill(
        self,
        metrics: dict,
        inputs: dict[str, Any],
        scores: HeadScores,
        distill_weight: torch.Tensor,
        distilled: torch.Tensor,
    ) -> None:
        """The distillation term's metrics over the distilled tokens, and the leakage signal: the share of the KL on
        completion tokens that also occur in the privileged context."""
        mean = self.global_masked_mean
        metrics["sdpg/distill_kl"].append(mean(scores.distill_kl, distilled))
        metrics["sdpg/teacher_minus_student_logp"].append(mean(scores.teacher_logps - scores.logps, distilled))
        metrics["sdpg/teacher_entropy"].append(mean(scores.teacher_entropy, distilled))
        metrics["sdpg/student_entropy"].append(mean(scores.entropy, distilled))
        metrics["sdpg/distilled_token_share"].append(mean(distill_weight, distilled))
        if "context_token_mask" in inputs:
            on_context = inputs["context_token_mask"] & distilled
            kl = scores.distill_kl
            totals = self.accelerator.reduce(torch.stack([(kl * on_context).sum(), (kl * distilled).sum()]))
            metrics["sdpg/kl_share_on_context_tokens"].append((totals[0] / totals[1].clamp(min=1e-12)).item())
            metrics["sdpg/context_token_share"].append(mean(on_context.float(), distilled))

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
        processes; one extra LM-head backward per term (`log_term_grad_norms`). `objective(name)` is the loss of
        that term alone."""
        for name in ("outcome", "distill", "anchor"):
            part = objective(name)
            grad = None
            if part.requires_grad:  # a term this step does not use is a constant 0
                grad = torch.autograd.grad(part, hidden, retain_graph=True, allow_unused=True)[0]
            norm = torch.zeros((), device=hidden.device) if grad is None else grad.float().square().sum()
            metrics[f"grad_norm/{name}"].append(self.accelerator.reduce(norm, reduction="sum").sqrt().item())
