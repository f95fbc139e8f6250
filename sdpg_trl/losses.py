"""SDPG's math as pure functions (SPEC section 2).

Shapes: `B` rollouts, `T` completion positions, `V` vocabulary, `H` hidden size, `N` selected tokens. Every
`(B, T)` per-token tensor is aggregated by `sdpg_objective`, which is shared by the trainer and by
`sdpg_loss_reference`, so that the two differ only in how the per-token terms are computed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

# TRL's helpers (private to TRL, so imported through `_trl_compat`): fp32 projections and gradient GEMMs from
# bf16/fp16 inputs, ZeRO-3 gathering, and GRPOTrainer's VESPO gamma weight.
from ._trl_compat import ChunkedLogProbFunction, maybe_gather_lm_head_ctx, vespo_gamma_weights
from ._trl_compat import addmm_fp32 as _addmm_fp32
from ._trl_compat import compute_dtype as _compute_dtype
from ._trl_compat import project_tile as _project

# Vocabulary tile width of TRL's chunked log-prob kernel (the value TRL's own fused LM head uses).
_VOCAB_TILE = 32768


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to fp32 for the softmax; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def beta_schedule(step: int, total_steps: int, base: float, warmup_steps: int, decay_steps: int) -> float:
    """SPEC 2.3: `beta(k) = base * min(1, k / T_warm) * min(1, (T - k) / T_decay)`.

    A window of 0 steps is switched off. Only depends on `step`, so it continues correctly after a resume.
    """
    warm = 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)
    decay = 1.0 if decay_steps == 0 else min(1.0, max(0, total_steps - step) / decay_steps)
    return base * warm * decay


def positive_advantage_gate(advantages: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """SPEC 2.2: `m_i = 1[A_i > 0]` as floats, shape (B,); all ones when the gate is off."""
    if not enabled:
        return torch.ones_like(advantages, dtype=torch.float32)
    return (advantages > 0).float()


# GRPO's loss types (TRL `GRPOConfig.loss_type`), and those whose surrogate is PPO's clipped ratio (the dual clip's).
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


@dataclass(frozen=True)
class OutcomeOptions:
    """How the outcome term is formed: GRPO's choices, under TRL `GRPOConfig`'s names (SPEC 2.1 generalised).

    `loss_type` picks the surrogate (PPO clip for the grpo family, CISPO, SAPO, VESPO) and, in `policy_token_weights`,
    the aggregation; `importance_sampling_level` is per token or per sequence (GSPO). `dual_clip` is SDPG's (SPEC 2.1)
    and only applies to PPO's clipped surrogate. The defaults are SDPG's: DAPO aggregation, token ratios, dual clip 3.
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip: float | None = 3.0
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    @classmethod
    def from_config(cls, args: Any) -> OutcomeOptions:
        """The options of an `SDPGConfig`; `epsilon_high` defaults to `epsilon`, as in GRPOTrainer."""
        names = {f.name for f in fields(cls)} - {"epsilon_low", "epsilon_high"}
        high = args.epsilon if args.epsilon_high is None else args.epsilon_high
        return cls(epsilon_low=args.epsilon, epsilon_high=high, **{name: getattr(args, name) for name in names})


class Outcome(NamedTuple):
    """`outcome_per_token`'s result.

    Attributes:
        loss: `(B, T)` per-token outcome surrogate.
        rho: `(B, T)` detached token ratio `pi_theta / pi_old` (1 on-policy), SPEC 2.2 and 2.4's weight of SDPG's
            terms (per token, whatever the importance-sampling level of the outcome).
        ratio: the importance ratio at `importance_sampling_level`, with gradient (value 1 on-policy): `(B, T)` per
            token, `(B, 1)` per sequence. GRPO's `coef_1`, which `use_bias_correction_kl` multiplies the anchor by.
        vespo_weight: `(B, 1)` VESPO's detached gamma weight `phi(w)`, or None for the other loss types.
    """

    loss: torch.Tensor
    rho: torch.Tensor
    ratio: torch.Tensor
    vespo_weight: torch.Tensor | None


def outcome_per_token(
    per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    old_per_token_logps: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    options: OutcomeOptions = OutcomeOptions(),
    sampler_ratio: torch.Tensor | None = None,
) -> Outcome:
    """SPEC 2.1: the per-token outcome surrogate for GRPO's `loss_type`, exactly as TRL GRPOTrainer forms it.

    With `w` the importance ratio (per token, or GSPO's `exp(mean_t log ratio)` per sequence) and `A` the advantage:
    - grpo, bnpo, dr_grpo, dapo, luspo: `-max(min(w' A, clip(w, 1 - eps_low, 1 + eps_high) A), c A)`, where `w'` is
      `w` capped at `delta` (INTELLECT-2's two-sided clip) and the dual-clip floor `c A` only applies for `A < 0`;
    - cispo: `-SG[min(w, eps_high)] A log pi`;
    - sapo: `-sigmoid(tau (w - 1)) 4 / tau A`, with `tau` the temperature of `A`'s sign;
    - vespo: `-SG[phi(w_seq)] A log pi` with TRL's gamma weight of the sequence ratio.
    On-policy (`old_per_token_logps is None`), the clipped and soft surrogates become the REINFORCE surrogate
    `-A log pi` (SPEC 2.1), which has their gradient at `w = 1`; cispo and vespo keep their form, with `w = 1`.

    Args:
        per_token_logps: `(B, T)` log pi_theta of the sampled tokens, with grad.
        advantages: `(B,)` group-relative advantages, or `(B, T)` per-token ones (RLSD's `A_hat`).
        old_per_token_logps: `(B, T)` log-probs of the policy that sampled, or None when on-policy.
        mask: `(B, T)` completion mask, for sequence-level ratios and VESPO; None: every token counts.
        sampler_ratio: `(B, T)` or `(B, 1)` vLLM importance-sampling correction `pi_old / pi_sampler` (TRL's
            `importance_sampling_ratio`), or None. It multiplies the surrogate; VESPO folds it into its weight.
    """
    if options.loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {options.loss_type!r}; expected one of {LOSS_TYPES}.")
    if options.importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"Unknown importance_sampling_level {options.importance_sampling_level!r}.")
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    mask = torch.ones_like(per_token_logps) if mask is None else mask.to(per_token_logps.dtype)
    on_policy = old_per_token_logps is None
    log_ratio = per_token_logps - (per_token_logps.detach() if on_policy else old_per_token_logps)
    if options.importance_sampling_level == "sequence":
        ratio = torch.exp((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
    else:
        ratio = torch.exp(log_ratio)
    vespo_weight = None
    if options.loss_type == "cispo":
        loss = -torch.clamp(ratio, max=options.epsilon_high).detach() * adv * per_token_logps
    elif options.loss_type == "vespo":
        vespo_weight = vespo_gamma_weights(
            adv, log_ratio, mask, sampler_ratio, k_pos=options.vespo_k_pos, lambda_pos=options.vespo_lambda_pos,
            k_neg=options.vespo_k_neg, lambda_neg=options.vespo_lambda_neg,
        )  # fmt: skip
        loss = -vespo_weight * adv * per_token_logps
    elif on_policy:
        loss = -adv * per_token_logps
    elif options.loss_type == "sapo":
        tau = torch.where(adv > 0, options.sapo_temperature_pos, options.sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:
        unclipped = ratio if options.delta is None else torch.clamp(ratio, max=options.delta)
        clipped = torch.clamp(ratio, 1 - options.epsilon_low, 1 + options.epsilon_high)
        surrogate = torch.min(unclipped * adv, clipped * adv)
        if options.dual_clip is not None:
            surrogate = torch.where(adv < 0, torch.max(surrogate, options.dual_clip * adv), surrogate)
        loss = -surrogate
    if sampler_ratio is not None and options.loss_type != "vespo":
        loss = loss * sampler_ratio
    return Outcome(loss.expand_as(per_token_logps), torch.exp(log_ratio).detach(), ratio, vespo_weight)


def policy_token_weights(
    mask: torch.Tensor,
    loss_type: str,
    *,
    token_normalizer: torch.Tensor | float,
    accumulation_steps: float = 1.0,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """`(B, T)` weight of each token's outcome and anchor terms in the loss: GRPOTrainer's aggregation for `loss_type`
    (its per-token loss is the outcome plus the KL anchor), written as a weighted sum over tokens.

    - dapo, cispo, vespo: `1 / token_normalizer`, the completion tokens of the accumulated batch (SPEC 2's `N`);
    - grpo, sapo: each sequence's mean, then the mean over the `B` sequences;
    - bnpo: `1 / (tokens in this micro-batch)`; dr_grpo: `1 / (B * max_completion_length)`;
    - luspo: each sequence's sum, then the mean over sequences.
    All but the first are divided by `accumulation_steps` (TRL scales them for gradient accumulation; the DAPO
    normaliser already spans the accumulated batch).

    Args:
        mask: `(B, T)` completion mask. token_normalizer: `N` for one micro-batch, as the trainer computes it.
        max_completion_length: dr_grpo's constant; None: `T`.
    """
    mask = mask.float()
    if loss_type in ("dapo", "cispo", "vespo"):
        return mask / token_normalizer
    if loss_type in ("grpo", "sapo"):
        weights = mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / mask.size(0)
    elif loss_type == "bnpo":
        weights = mask / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        weights = mask / (mask.size(0) * (mask.size(1) if max_completion_length is None else max_completion_length))
    elif loss_type == "luspo":
        weights = mask / mask.size(0)
    else:
        raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}.")
    return weights / accumulation_steps


# Reference code's clamp on RLSD's log-ratio, so exp() stays finite before the clip.
RLSD_DELTA_CLAMP = 20.0


def rlsd_lambda(step: int, start: float, decay_steps: int) -> float:
    """SPEC 3 (RLSD): the mixing weight `lam(k) = start * max(0, 1 - k / decay_steps)`; `decay_steps = 0` keeps it.

    `k` counts optimiser steps from 0, like `beta_schedule`, so the first update uses `start`.
    """
    if decay_steps == 0:
        return start
    return start * max(0.0, 1.0 - step / decay_steps)


def rlsd_advantages(
    advantages: torch.Tensor,
    teacher_logps: torch.Tensor,
    old_logps: torch.Tensor,
    *,
    lam: float,
    clip: float = 0.2,
    scored: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPEC 3 (RLSD): per-token advantages
    `A_hat = A * ((1 - lam) + lam * clip(exp(sign(A) Delta), 1 - eps_w, 1 + eps_w))`
    with `Delta = SG[log q(y_t) - log p_old(y_t)]`, clamped to +-20 as in the reference code.

    Args:
        advantages: `(B,)` group-relative advantages.
        teacher_logps: `(B, T)` teacher log-probs of the sampled tokens. old_logps: `(B, T)` sampler log-probs.
        lam: the scheduled `lam(k)`. clip: `eps_w`.
        scored: `(B,)` bool, the rows the teacher scored; the others keep `A` (token weight 1). None: all rows.
    Returns: `(B, T)` detached advantages.
    """
    delta = (teacher_logps - old_logps).detach().clamp(-RLSD_DELTA_CLAMP, RLSD_DELTA_CLAMP)
    adv = advantages.detach().unsqueeze(1)
    weight = torch.exp(torch.sign(adv) * delta).clamp(1 - clip, 1 + clip)
    if scored is not None:
        weight = torch.where(scored.unsqueeze(1), weight, torch.ones_like(weight))
    return adv * ((1 - lam) + lam * weight)


def anchor_per_token(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """SPEC 2.4: per-token anchor surrogate `(B, T)` with `log w = log pi_theta - log pi_ref` on sampled tokens.

    `urkl` 0.5 (log w)^2 | `ufkl` 1/w + log w | `rkl` 0.5 (log w + 1)^2 | `fkl` 1/w | `k3` 1/w + log w - 1 (TRL).
    """
    log_w = per_token_logps - ref_per_token_logps
    if estimator == "urkl":
        return 0.5 * log_w.square()
    if estimator == "ufkl":
        return torch.exp(-log_w) + log_w
    if estimator == "rkl":
        return 0.5 * (log_w + 1).square()
    if estimator == "fkl":
        return torch.exp(-log_w)
    if estimator == "k3":
        return torch.exp(-log_w) + log_w - 1
    raise ValueError(f"Unknown kl_estimator {estimator!r}; expected one of k3, urkl, ufkl, rkl, fkl.")


def k3_kl(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    """TRL's k3 estimate of KL(pi_theta || pi_ref) per token `(B, T)`; logged as `kl` so curves compare to GRPO's."""
    return anchor_per_token(per_token_logps, ref_per_token_logps, "k3")


def full_vocab_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """SPEC 2.2 written out: `KL(p || SG[q]) = sum_a p(a) (log p(a) - log q(a))`, per position.

    Args:
        student_logits: `(..., V)` temperature-scaled student logits, with grad.
        teacher_logits: `(..., V)` temperature-scaled teacher logits (detached here).
    Returns: `(...)`, in fp32 or wider.
    """
    log_p = F.log_softmax(_upcast(student_logits), dim=-1)
    log_q = F.log_softmax(_upcast(teacher_logits.detach()), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def chunked_logps_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target (with grad) and entropy (without), in vocabulary tiles: TRL's fused-head kernel on
    exactly the given tokens (its fused head projects every position of the sequence on devices without Triton).

    Args:
        hidden: `(N, H)`; weight: `(V, H)`; bias: `(V,)` or None; targets: `(N,)` token ids.
    Returns: `(N,)` float32 log-probs and `(N,)` float32 entropies.
    """
    with maybe_gather_lm_head_ctx(weight, bias):
        outputs = ChunkedLogProbFunction.apply(
            hidden, weight, bias, targets, temperature, _VOCAB_TILE, final_logit_softcapping, logit_scale, ("entropy",)
        )
    return outputs[0], outputs[1]


# Why not `trl.kernels.chunked_divergence.ChunkedDivergenceFunction`: it gives the same per-token KL, but next to
# TRL's log-prob kernel it projects the student a second time; one shared pass is ~30% less head work
# (`python -m bench.head_kernels`). Its tile helpers are reused above.
class _FusedPolicyDistillation(torch.autograd.Function):
    """One pass over vocabulary tiles giving, per distilled token, everything SDPG needs from the LM head.

    Forward: the student's sampled-token log-prob and entropy (what TRL's fused head gives GRPO), the teacher's
    sampled-token log-prob and entropy (metrics), and the full-vocabulary reverse KL(p || SG[q]) (SPEC 2.2), from
    online softmax statistics. Backward recomputes both tiles once and applies
    `dL/dz = g_logp * (onehot(y) - p) + g_kl * p * (log p - log q - KL)` to the student only.

    The teacher's head is the student's (live teacher) or a frozen/EMA copy's (`teacher_weight`, `teacher_bias`).
    Shapes: hiddens `(N, H)`, weights `(V, H)`, biases `(V,)` or None, labels `(N,)` -> five `(N,)` fp32 tensors.
    """

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, labels, transform,
                vocab_chunk):  # fmt: skip
        dtype = _compute_dtype(student_hidden)
        n, vocab = student_hidden.shape[0], weight.shape[0]
        f32 = {"device": student_hidden.device, "dtype": torch.float32}
        s_max, t_max = torch.full((n,), -math.inf, **f32), torch.full((n,), -math.inf, **f32)
        s_sum, s_x_sum, s_gap, t_sum, t_x_sum, s_label, t_label = (torch.zeros(n, **f32) for _ in range(7))
        h_s, h_t = student_hidden.to(dtype), teacher_hidden.to(dtype)
        with _gather_heads(weight, bias, teacher_weight, teacher_bias):
            for start in range(0, vocab, vocab_chunk):
                end = min(start + vocab_chunk, vocab)
                s, _ = _logit_tile(h_s, weight, bias, start, end, transform, dtype)
                t, _ = _logit_tile(h_t, teacher_weight, teacher_bias, start, end, transform, dtype)
                rows, cols = _labels_in_tile(labels, start, end)
                s_label[rows], t_label[rows] = s[rows, cols], t[rows, cols]
                # Online softmax: rescale the running sums whenever a tile raises the running max.
                new_s_max, new_t_max = torch.maximum(s_max, s.amax(-1)), torch.maximum(t_max, t.amax(-1))
                s_rescale, t_rescale = torch.exp(s_max - new_s_max), torch.exp(t_max - new_t_max)
                e_s, e_t = torch.exp(s - new_s_max.unsqueeze(1)), torch.exp(t - new_t_max.unsqueeze(1))
                s_sum = s_sum * s_rescale + e_s.sum(-1)
                s_x_sum = s_x_sum * s_rescale + (e_s * s).sum(-1)
                s_gap = s_gap * s_rescale + (e_s * (s - t)).sum(-1)
                t_sum = t_sum * t_rescale + e_t.sum(-1)
                t_x_sum = t_x_sum * t_rescale + (e_t * t).sum(-1)
                s_max, t_max = new_s_max, new_t_max
        s_lse, t_lse = s_max + s_sum.log(), t_max + t_sum.log()
        kl = s_gap / s_sum - s_lse + t_lse
        entropy, teacher_logps, teacher_entropy = s_lse - s_x_sum / s_sum, t_label - t_lse, t_lse - t_x_sum / t_sum
        ctx.save_for_backward(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, labels,
                              s_lse, t_lse, kl)  # fmt: skip
        ctx.transform, ctx.vocab_chunk, ctx.dtype = transform, vocab_chunk, dtype
        ctx.mark_non_differentiable(entropy, teacher_logps, teacher_entropy)
        return s_label - s_lse, entropy, kl, teacher_logps, teacher_entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy, grad_kl, _grad_teacher_logps, _grad_teacher_entropy):
        student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, labels, s_lse, t_lse, kl = (
            ctx.saved_tensors
        )
        dtype = ctx.dtype
        grad_logps = torch.zeros_like(kl) if grad_logps is None else grad_logps.float()
        grad_kl = torch.zeros_like(kl) if grad_kl is None else grad_kl.float()
        need_weight = ctx.needs_input_grad[2]
        need_bias = bias is not None and ctx.needs_input_grad[3]
        h_s, h_t = student_hidden.to(dtype), teacher_hidden.to(dtype)
        f32 = {"device": weight.device, "dtype": torch.float32}  # gradients accumulate in fp32, as in TRL's kernels
        grad_hidden = torch.zeros(student_hidden.shape, **f32)
        grad_weight = torch.zeros(weight.shape, **f32) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], **f32) if need_bias else None
        with _gather_heads(weight, bias, teacher_weight, teacher_bias):
            for start in range(0, weight.shape[0], ctx.vocab_chunk):
                end = min(start + ctx.vocab_chunk, weight.shape[0])
                s, dz_draw = _logit_tile(h_s, weight, bias, start, end, ctx.transform, dtype)
                t, _ = _logit_tile(h_t, teacher_weight, teacher_bias, start, end, ctx.transform, dtype)
                log_p, log_q = s - s_lse.unsqueeze(1), t - t_lse.unsqueeze(1)
                p = log_p.exp()
                grad_z = p * (grad_kl.unsqueeze(1) * (log_p - log_q - kl.unsqueeze(1)) - grad_logps.unsqueeze(1))
                rows, cols = _labels_in_tile(labels, start, end)
                grad_z[rows, cols] += grad_logps[rows]
                grad_raw = grad_z * dz_draw
                grad_tile = grad_raw.to(dtype)
                _addmm_fp32(grad_hidden, grad_tile, weight[start:end].to(dtype))
                if need_weight:
                    _addmm_fp32(grad_weight[start:end], grad_tile.t(), h_s)
                if need_bias:
                    grad_bias[start:end] += grad_raw.sum(0)
        return (
            grad_hidden.to(student_hidden.dtype),
            None,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


@contextmanager
def _gather_heads(weight, bias, teacher_weight, teacher_bias):
    """ZeRO-3 gathering of the student's head, and of the teacher's when it is another model's."""
    with maybe_gather_lm_head_ctx(weight, bias):
        if teacher_weight is weight:
            yield
        else:
            with maybe_gather_lm_head_ctx(teacher_weight, teacher_bias):
                yield


def _logit_tile(hidden, weight, bias, start, end, transform, dtype):
    """fp32 logits `(N, end - start)` of one vocabulary tile after scale, softcap and temperature, and their
    derivative with respect to the raw projection (a scalar, or a tile when softcapping)."""
    scale, softcap, inv_temperature = transform
    z = torch.empty((hidden.shape[0], end - start), device=hidden.device, dtype=torch.float32)
    _project(z, hidden, weight, bias, start, end, dtype)  # TRL's: fp32 output even from bf16 inputs
    z = z * scale
    if softcap is None:
        return z * inv_temperature, scale * inv_temperature
    capped = torch.tanh(z / softcap)
    return softcap * capped * inv_temperature, (1 - capped.square()) * scale * inv_temperature


def _labels_in_tile(labels, start, end):
    """(rows, columns within the tile) of the labels that fall in vocabulary tile [start, end)."""
    rows = ((labels >= start) & (labels < end)).nonzero().squeeze(1)
    return rows, labels[rows] - start


def fused_policy_distillation(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_chunk_size: int = 8192,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC 2.1, 2.2 and 5 for the distilled tokens in one LM-head pass: student log-prob of the sampled token
    and entropy, reverse KL(p || SG[q]), and the teacher's log-prob of the sampled token and entropy (no grad).

    Sharing the student's vocabulary projection between the outcome term and the KL is the point: the LM head runs
    twice per view (forward, recompute in backward) instead of TRL's fused head plus a separate divergence pass.
    Transient memory is a few `chunk_size x vocab_chunk_size` fp32 tiles.

    Args:
        student_hidden: `(N, H)` student final hidden states, with grad. teacher_hidden: `(N, H)`, detached here.
        weight: `(V, H)` student LM-head weight. bias: `(V,)` or None. labels: `(N,)` sampled tokens.
        teacher_weight, teacher_bias: the teacher's head when it is another model (frozen or EMA teacher); default
            the student's (the live teacher shares the weights).
    Returns: `(logps, entropy, kl, teacher_logps, teacher_entropy)`, each `(N,)` fp32; only `logps` and `kl` carry
        gradients.
    """
    if teacher_weight is None:
        teacher_weight, teacher_bias = weight, bias
    transform = (logit_scale, final_logit_softcapping, 1.0 / temperature)
    outputs = [
        _FusedPolicyDistillation.apply(
            student_hidden[start : start + chunk_size],
            teacher_hidden[start : start + chunk_size].detach(),
            weight,
            bias,
            teacher_weight,  # no gradient flows to it: backward returns None for the teacher's head
            teacher_bias,
            labels[start : start + chunk_size],
            transform,
            vocab_chunk_size,
        )
        for start in range(0, student_hidden.shape[0], chunk_size)
    ]
    if not outputs:
        empty = student_hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty, empty, empty
    return tuple(torch.cat(parts) for parts in zip(*outputs))


@dataclass(frozen=True)
class LossTerms:
    """Which per-token terms one step needs; `compute_loss` reads this instead of branching on method names.

    A method (GRPO, RLSD, OPCD, SDPG and its ablations) is a choice of coefficients, and a term whose coefficient is
    0 at this step is not computed at all. The teacher forward runs only when `distill` or `rlsd` is set.

    Attributes:
        outcome: the verifier-grounded surrogate `L_out` (SPEC 2.1); off for pure self-distillation (OPCD).
        distill: the full-vocabulary reverse KL to the teacher, `L_OPD` (SPEC 2.2); on when `beta(k) > 0`.
        rlsd: RLSD's teacher-reweighted advantages (SPEC 3); on when `lam(k) > 0`.
        anchor: the reference anchor `L_K` (SPEC 2.4); on when `alpha > 0`.
    """

    outcome: bool
    distill: bool
    rlsd: bool
    anchor: bool

    @property
    def teacher(self) -> bool:
        """Whether the teacher view is scored at all this step."""
        return self.distill or self.rlsd


def loss_terms(*, outcome_coef: float, distill_coef: float, rlsd_lam: float, kl_coef: float) -> LossTerms:
    """The terms a step needs from its (already scheduled) coefficients."""
    return LossTerms(
        outcome=outcome_coef != 0.0, distill=distill_coef > 0.0, rlsd=rlsd_lam > 0.0, anchor=kl_coef != 0.0
    )


def sdpg_objective(
    outcome: torch.Tensor | None,
    opd: torch.Tensor | None,
    anchor: torch.Tensor | None,
    mask: torch.Tensor,
    distill_weight: torch.Tensor,
    rho: torch.Tensor,
    *,
    distill_coef: float,
    kl_coef: float,
    normalizer: torch.Tensor | float,
    policy_weights: torch.Tensor,
    outcome_coef: float = 1.0,
    anchor_ratio_weighted: bool = True,
) -> torch.Tensor:
    """SPEC 2: `c_out L_out + beta(k) L_OPD+ + alpha L_K`.

    The distillation term is summed over tokens and divided by `normalizer`, SPEC 2's `N` (the completion tokens,
    DAPO-style), whatever GRPO's `loss_type`. The outcome and the anchor are GRPO's per-token loss (its policy term
    plus its KL term), so they are aggregated the way `loss_type` aggregates it: by `policy_weights`. With the default
    `loss_type="dapo"` those weights are `mask / N` too, and every term is over `N` as SPEC 2 says.

    Args:
        outcome, opd, anchor: `(B, T)` per-token terms, or None when the step does not use the term.
        mask: `(B, T)` completion mask. rho: `(B, T)` detached importance ratio (1 on-policy).
        distill_weight: `(B,)` gate m_i, or `(B, T)` the gate times per-token filters (EOS, teacher confidence).
        distill_coef: the scheduled beta(k). kl_coef: alpha. outcome_coef: 1 for every method but pure distillation.
        anchor_ratio_weighted: weigh the anchor by `SG[rho]` off-policy (SPEC 2.4); GRPO does not.
        policy_weights: `(B, T)` from `policy_token_weights` (`mask / normalizer` for DAPO).
    Returns: scalar loss.
    """
    policy = torch.zeros_like(rho)
    if outcome is not None and outcome_coef != 0.0:
        policy = policy + outcome_coef * outcome
    if anchor is not None and kl_coef != 0.0:
        policy = policy + kl_coef * (rho if anchor_ratio_weighted else 1.0) * anchor
    distill = torch.zeros_like(rho)
    if opd is not None and distill_coef != 0.0:
        weight = distill_weight.unsqueeze(1) if distill_weight.dim() == 1 else distill_weight
        distill = distill_coef * weight * rho * opd
    return (policy * policy_weights).sum() + (distill * mask).sum() / normalizer


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is set (0 when nothing is)."""
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy `(...)` of the softmax of `(..., V)` logits, in fp32 or wider."""
    log_p = F.log_softmax(_upcast(logits), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def distill_token_weight(
    mask: torch.Tensor,
    gate: torch.Tensor,
    *,
    completion_ids: torch.Tensor,
    eos_token_ids: list[int] | None = None,
    student_entropy: torch.Tensor | None = None,
    teacher_entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(B, T)` weight of each token in `L_OPD`: the gate `m_i` (SPEC 2.2), times two optional filters (both off
    by default, so SDPG's definition is unchanged):

    - `eos_token_ids`: leave EOS tokens out (the reference code's authors found EOS carried ~2.5x the mean
      per-token KL and taught the model not to stop);
    - `student_entropy`, `teacher_entropy` `(B, T)`: distil only where the teacher is more certain than the student,
      `H(q) < H(p)` (the KL elsewhere pulls the student toward a flatter, less informed distribution).
    """
    weight = gate.unsqueeze(1) * mask.float()
    if eos_token_ids:
        weight = weight * ~torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    if teacher_entropy is not None:
        weight = weight * (teacher_entropy < student_entropy)
    return weight


def sdpg_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    distill_coef: float,
    kl_coef: float,
    kl_estimator: str = "urkl",
    gate: bool = True,
    ref_per_token_logps: torch.Tensor | None = None,
    old_per_token_logps: torch.Tensor | None = None,
    outcome_coef: float = 1.0,
    rlsd_lam: float = 0.0,
    rlsd_clip: float = 0.2,
    eos_token_ids: list[int] | None = None,
    teacher_confident_only: bool = False,
    outcome: OutcomeOptions = OutcomeOptions(),
    anchor_ratio_weighted: bool = True,
    bias_correction_kl: bool = False,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain-PyTorch loss of every method from full logits (SPEC 2.1-2.4, SPEC 3): the oracle the chunked trainer is
    tested against. GRPO's token filters (top-entropy quantile, off-policy sequence mask) and vLLM's sampler
    correction are not modelled here: they are TRL's, and the trainer is tested against stock GRPOTrainer for them.

    Args:
        student_logits, teacher_logits: `(B, T, V)` temperature-scaled logits predicting each completion token.
        completion_ids, completion_mask: `(B, T)`.
        advantages: `(B,)`.
        distill_coef: the already-scheduled beta(k). kl_coef: alpha. outcome_coef: weight of `L_out`.
        ref_per_token_logps, old_per_token_logps: `(B, T)` or None.
        rlsd_lam, rlsd_clip: RLSD's scheduled `lam(k)` and `eps_w`; `rlsd_lam > 0` reweights the advantages.
        eos_token_ids, teacher_confident_only: the optional distillation token filters (`distill_token_weight`).
        outcome: GRPO's loss type, importance-sampling level and clipping (`OutcomeOptions`). anchor_ratio_weighted:
            weigh the anchor by `SG[rho]`. bias_correction_kl: multiply the anchor by the importance ratio, with its
            gradient (TRL's `use_bias_correction_kl`). max_completion_length: dr_grpo's constant (None: `T`).
    Returns: the scalar loss (the distillation term normalised by all completion tokens of the batch, the outcome and
        the anchor aggregated by `outcome.loss_type` in one accumulation step) and float metrics:
        `opd_kl`, `teacher_minus_student_logp`, `teacher_entropy` and `student_entropy` (means over the gated tokens),
        `gate_ratio` (fraction of rollouts distilled), `anchor` (mean surrogate) and `kl` (mean k3, importance-weighted
        with `bias_correction_kl` as GRPOTrainer logs it) when a reference is given.
    """
    mask = completion_mask.float()
    log_p = F.log_softmax(_upcast(student_logits), dim=-1)
    per_token_logps = log_p.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    teacher_logps = F.log_softmax(_upcast(teacher_logits), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    m = positive_advantage_gate(advantages, gate)
    if rlsd_lam > 0:
        old = per_token_logps if old_per_token_logps is None else old_per_token_logps
        advantages = rlsd_advantages(advantages, teacher_logps, old, lam=rlsd_lam, clip=rlsd_clip)
    policy = outcome_per_token(per_token_logps, advantages, old_per_token_logps, mask=mask, options=outcome)
    opd = full_vocab_reverse_kl(student_logits, teacher_logits)
    student_entropy, teacher_entropy = entropy_from_logits(student_logits), entropy_from_logits(teacher_logits)
    weight = distill_token_weight(
        mask, m, completion_ids=completion_ids, eos_token_ids=eos_token_ids,
        student_entropy=student_entropy.detach() if teacher_confident_only else None,
        teacher_entropy=teacher_entropy if teacher_confident_only else None,
    )  # fmt: skip
    use_anchor = ref_per_token_logps is not None and kl_coef != 0.0
    anchor = anchor_per_token(per_token_logps, ref_per_token_logps, kl_estimator) if use_anchor else None
    if use_anchor and bias_correction_kl:
        anchor = anchor * policy.ratio
    n_tokens = mask.sum().clamp(min=1.0)
    policy_weights = policy_token_weights(mask, outcome.loss_type, token_normalizer=n_tokens,
                                          max_completion_length=max_completion_length)  # fmt: skip
    loss = sdpg_objective(
        policy.loss, opd, anchor, mask, weight, policy.rho, outcome_coef=outcome_coef, distill_coef=distill_coef,
        kl_coef=kl_coef, normalizer=n_tokens, anchor_ratio_weighted=anchor_ratio_weighted,
        policy_weights=policy_weights,
    )  # fmt: skip

    with torch.no_grad():
        distilled = mask * m.unsqueeze(1)
        metrics = {
            "opd_kl": masked_mean(opd, distilled).item(),
            "gate_ratio": m.mean().item(),
            "teacher_minus_student_logp": masked_mean(teacher_logps - per_token_logps, distilled).item(),
            "teacher_entropy": masked_mean(teacher_entropy, distilled).item(),
            "student_entropy": masked_mean(student_entropy, distilled).item(),
        }
        if use_anchor:
            metrics["anchor"] = masked_mean(anchor, mask).item()
            kl = k3_kl(per_token_logps, ref_per_token_logps) * (policy.ratio if bias_correction_kl else 1.0)
            metrics["kl"] = masked_mean(kl, mask).item()
    return loss, metrics
