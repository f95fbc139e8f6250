"""One step's coefficients and per-token terms (SPEC 2, 3): what `SDPGTrainer.compute_loss` hands from the LM head's
scores to `sdpg_objective` and to the metrics. Which terms are on is decided once per step, in `step_coefficients`,
and carried from there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._trl_compat import off_policy_sequence_mask
from .head_kernels import HeadScores
from .losses import (
    LossTerms,
    Outcome,
    OutcomeOptions,
    TokenSelection,
    anchor_per_token,
    distill_coef_schedule,
    distill_token_weight,
    loss_terms,
    outcome_per_token,
    rlsd_advantages,
    rlsd_lambda,
    sampler_log_probs,
)


class StepCoefficients(NamedTuple):
    """One optimiser step's scheduled coefficients (SPEC 2.3, 3), the terms they switch on this step (`terms`) and the
    terms the method has at all (`method`, from its unscheduled coefficients: which metrics it logs)."""

    distill_coef: float
    rlsd_lam: float
    terms: LossTerms
    method: LossTerms


def step_coefficients(args: Any, step: int, total_steps: int, kl_coef: float) -> StepCoefficients:
    """The coefficients of optimiser step `step` of `total_steps` under config `args`; `kl_coef` is alpha (TRL's
    `beta`)."""
    distill_coef = distill_coef_schedule(
        step, total_steps, args.distill_coef, args.distill_warmup_steps, args.distill_decay_steps
    )
    rlsd_lam = rlsd_lambda(step, args.rlsd_coef, args.rlsd_decay_steps)
    terms = loss_terms(outcome_coef=args.outcome_coef, distill_coef=distill_coef, rlsd_lam=rlsd_lam, kl_coef=kl_coef)
    return StepCoefficients(distill_coef, rlsd_lam, terms, args.method_terms)


class PerTokenTerms(NamedTuple):
    """The `(B, C)` terms `sdpg_objective` sums (None: a term this step does not use), and what their metrics read.

    Attributes:
        outcome: GRPO's policy term after its token filters. distill_kl: the reverse KL to the teacher. anchor: the
            reference anchor. distill_weight: `(B, C)` gate times the distillation filters. policy: the outcome's
            ratios (`Outcome`). options: GRPO's options it was formed with. token_advantages: `(B,)`, or `(B, C)`
            with RLSD. trained_mask: `(B, C)` the tokens the outcome term trains (after `top_entropy_quantile`).
            sampler_logps: `(B, C)` the log-probs of the policy that sampled (`sampler_log_probs`).
    """

    outcome: torch.Tensor | None
    distill_kl: torch.Tensor | None
    anchor: torch.Tensor | None
    distill_weight: torch.Tensor
    policy: Outcome
    options: OutcomeOptions
    token_advantages: torch.Tensor
    trained_mask: torch.Tensor
    sampler_logps: torch.Tensor


def per_token_terms(
    args: Any,
    inputs: dict[str, Any],
    mask: torch.Tensor,
    scores: HeadScores,
    selection: TokenSelection,
    step: StepCoefficients,
    *,
    eos_token_ids: list[int] | None,
    high_entropy_mask: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
) -> PerTokenTerms:
    """The `(B, C)` terms of SPEC 2 and 3 from the head's scores: GRPO's policy term for its loss type (with RLSD's
    reweighted advantages and GRPO's token filters), the anchor, the distillation KL and its token weights.
    `high_entropy_mask` is GRPOTrainer's `get_high_entropy_mask`."""
    terms, advantages, old_logps = step.terms, inputs["advantages"], inputs.get("old_per_token_logps")
    sampler_logps = sampler_log_probs(scores.logps, old_logps)
    token_advantages = advantages
    if terms.rlsd:
        token_advantages = rlsd_advantages(
            advantages,
            scores.teacher_logps,
            sampler_logps,
            lam=step.rlsd_lam,
            clip=args.rlsd_clip,
            scored=selection.teacher_rows,
        )
    # GRPO's policy loss for its loss_type; vLLM's `importance_sampling_ratio` corrects the sampler mismatch.
    options = OutcomeOptions.from_config(args)
    policy = outcome_per_token(
        scores.logps,
        token_advantages,
        old_logps,
        mask=mask,
        options=options,
        sampler_ratio=inputs.get("importance_sampling_ratio"),
    )
    outcome, trained_mask = _grpo_token_filters(
        args, inputs, mask, scores, policy.loss, sampler_logps, high_entropy_mask
    )
    anchor = None
    if terms.anchor:
        anchor = anchor_per_token(scores.logps, inputs["ref_per_token_logps"], args.kl_estimator, args)
        if args.use_bias_correction_kl:  # DeepSeek-V3.2: times the importance ratio, with its gradient
            anchor = anchor * policy.ratio
    confident_only = args.distill_teacher_confident_only
    distill_weight = distill_token_weight(
        mask,
        selection.gate * selection.distill_rows,
        completion_ids=inputs["completion_ids"],
        eos_token_ids=eos_token_ids if args.distill_exclude_eos else None,
        student_entropy=scores.entropy if confident_only else None,
        teacher_entropy=scores.teacher_entropy if confident_only else None,
    )
    return PerTokenTerms(
        outcome=outcome if terms.outcome else None,
        distill_kl=scores.distill_kl if terms.distill else None,
        anchor=anchor,
        distill_weight=distill_weight,
        policy=policy,
        options=options,
        token_advantages=token_advantages,
        trained_mask=trained_mask,
        sampler_logps=sampler_logps,
    )


def _grpo_token_filters(
    args: Any,
    inputs: dict[str, Any],
    mask: torch.Tensor,
    scores: HeadScores,
    outcome: torch.Tensor,
    sampler_logps: torch.Tensor,
    high_entropy_mask: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's filters of its policy term (not of SDPG's terms): DeepSeek-V3.2's off-policy sequence mask, measured
    against the sampler's log-probs, and the top-entropy-quantile token mask ("Beyond the 80/20 Rule"). Returns the
    filtered outcome and the `(B, C)` tokens it trains."""
    if args.off_policy_mask_threshold is not None:
        outcome = outcome * off_policy_sequence_mask(
            inputs["advantages"].unsqueeze(1),
            scores.logps,
            inputs.get("sampling_per_token_logps", sampler_logps),
            mask,
            args.off_policy_mask_threshold,
        )
    trained_mask = mask
    if args.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(scores.entropy.detach(), mask, 1 - args.top_entropy_quantile)
        outcome, trained_mask = outcome * entropy_mask, mask * entropy_mask
    return outcome, trained_mask
