"""SDPG's math as pure functions (SPEC section 2).

Shapes: `B` rollouts, `T` completion positions, `V` vocabulary, `H` hidden size, `N` selected tokens. Every
`(B, T)` per-token tensor is aggregated by `sdpg_objective`, which is shared by the trainer and by
`sdpg_loss_reference`, so that the two differ only in how the per-token terms are computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

# ChunkedDivergenceFunction's `beta` that selects the reverse KL(student || teacher).
_REVERSE_KL = 1.0
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


def outcome_per_token(
    per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    old_per_token_logps: torch.Tensor | None = None,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 2.1: per-token outcome surrogate `(B, T)` and the detached ratio `rho` `(B, T)`.

    On-policy (`old_per_token_logps is None`): the REINFORCE surrogate `-A * log pi`, `rho = 1`.
    Off-policy: `-max(min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), c A)` for `A < 0`, without the `c A`
    floor for `A >= 0` (PPO clipping with the dual clip `c`).

    Args:
        per_token_logps: `(B, T)` log pi_theta of the sampled tokens, with grad.
        advantages: `(B,)` group-relative advantages.
        old_per_token_logps: `(B, T)` log-probs of the policy that sampled, or None when on-policy.
    """
    adv = advantages.unsqueeze(1)
    if old_per_token_logps is None:
        return -adv * per_token_logps, torch.ones_like(per_token_logps).detach()
    rho = torch.exp(per_token_logps - old_per_token_logps)
    surrogate = torch.min(rho * adv, torch.clamp(rho, 1 - epsilon_low, 1 + epsilon_high) * adv)
    if dual_clip is not None:
        surrogate = torch.where(adv < 0, torch.max(surrogate, dual_clip * adv), surrogate)
    return -surrogate, rho.detach()


def anchor_per_token(
    per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor, estimator: str
) -> torch.Tensor:
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


def chunked_reverse_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """SPEC 2.2 and 5: the same per-token KL as `full_vocab_reverse_kl`, from final hidden states.

    Neither view's `(N, V)` logits exist: TRL's `ChunkedDivergenceFunction` projects `[tokens, 32768]` vocabulary
    tiles through the LM head and recomputes them in backward; calling it on `chunk_size` tokens at a time bounds its
    buffers to `2 * chunk_size * 32768` floats. The gradient is path-wise through the student only.

    Args:
        student_hidden: `(N, H)` student final hidden states, with grad.
        teacher_hidden: `(N, H)` teacher final hidden states at the same completion positions.
        weight: `(V, H)` LM-head weight (shared by both views: same model).
        bias: `(V,)` LM-head bias or None.
    Returns: `(N,)` float32 per-token `KL(p || SG[q])`.
    """
    teacher_hidden = teacher_hidden.detach()
    chunks = [
        ChunkedDivergenceFunction.apply(
            student_hidden[start : start + chunk_size],
            weight,
            bias,
            teacher_hidden[start : start + chunk_size],
            weight.detach(),
            None if bias is None else bias.detach(),
            _REVERSE_KL,
            temperature,
            logit_scale,
            final_logit_softcapping,
            logit_scale,
            final_logit_softcapping,
        )[0]
        for start in range(0, student_hidden.shape[0], chunk_size)
    ]
    if not chunks:
        return student_hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(chunks)


@torch.no_grad()
def sampled_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """`log softmax(hidden @ weight.T + bias)[target]` per token, in vocabulary tiles, without grad (for metrics).

    Args:
        hidden: `(N, H)`; weight: `(V, H)`; bias: `(V,)` or None; targets: `(N,)` token ids.
    Returns: `(N,)` float32.
    """
    return ChunkedLogProbFunction.apply(
        hidden, weight, bias, targets, temperature, _VOCAB_TILE, final_logit_softcapping, logit_scale, ()
    )[0]


def sdpg_objective(
    outcome: torch.Tensor,
    opd: torch.Tensor,
    anchor: torch.Tensor | None,
    mask: torch.Tensor,
    gate: torch.Tensor,
    rho: torch.Tensor,
    *,
    distill_coef: float,
    kl_coef: float,
    normalizer: torch.Tensor | float,
) -> torch.Tensor:
    """SPEC 2: `L_out + beta(k) L_OPD+ + alpha L_K`, every term summed over tokens and divided by `normalizer` (N).

    Args:
        outcome, opd, anchor: `(B, T)` per-token terms (`anchor` None when `kl_coef` is 0).
        mask: `(B, T)` completion mask. gate: `(B,)` m_i. rho: `(B, T)` detached importance ratio (1 on-policy).
        distill_coef: the scheduled beta(k). kl_coef: alpha.
    Returns: scalar loss.
    """
    per_token = outcome + distill_coef * gate.unsqueeze(1) * rho * opd
    if anchor is not None and kl_coef != 0.0:
        per_token = per_token + kl_coef * rho * anchor
    return (per_token * mask).sum() / normalizer


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is set (0 when nothing is)."""
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


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
) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain-PyTorch SDPG loss from full logits (SPEC 2.1-2.4): the oracle the chunked trainer is tested against.

    Args:
        student_logits, teacher_logits: `(B, T, V)` temperature-scaled logits predicting each completion token.
        completion_ids, completion_mask: `(B, T)`.
        advantages: `(B,)`.
        distill_coef: the already-scheduled beta(k). kl_coef: alpha.
        ref_per_token_logps, old_per_token_logps: `(B, T)` or None.
    Returns: the scalar loss (normalised by all completion tokens of the batch) and float metrics:
        `opd_kl` and `teacher_minus_student_logp` (means over distilled tokens), `gate_ratio` (fraction of rollouts
        distilled), `anchor` (mean surrogate) and `kl` (mean k3) when a reference is given.
    """
    mask = completion_mask.float()
    log_p = F.log_softmax(_upcast(student_logits), dim=-1)
    per_token_logps = log_p.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    outcome, rho = outcome_per_token(per_token_logps, advantages, old_per_token_logps)
    opd = full_vocab_reverse_kl(student_logits, teacher_logits)
    m = positive_advantage_gate(advantages, gate)
    use_anchor = ref_per_token_logps is not None and kl_coef != 0.0
    anchor = anchor_per_token(per_token_logps, ref_per_token_logps, kl_estimator) if use_anchor else None
    loss = sdpg_objective(
        outcome, opd, anchor, mask, m, rho,
        distill_coef=distill_coef, kl_coef=kl_coef, normalizer=mask.sum().clamp(min=1.0),
    )  # fmt: skip

    with torch.no_grad():
        distilled = mask * m.unsqueeze(1)
        teacher_logps = F.log_softmax(_upcast(teacher_logits), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        metrics = {
            "opd_kl": masked_mean(opd, distilled).item(),
            "gate_ratio": m.mean().item(),
            "teacher_minus_student_logp": masked_mean(teacher_logps - per_token_logps, distilled).item(),
        }
        if use_anchor:
            metrics["anchor"] = masked_mean(anchor, mask).item()
            metrics["kl"] = masked_mean(k3_kl(per_token_logps, ref_per_token_logps), mask).item()
    return loss, metrics
