"""SDPG's math as pure functions (SPEC section 2).

Shapes: `B` rollouts, `T` completion positions, `V` vocabulary, `H` hidden size, `N` selected tokens. Every
`(B, T)` per-token tensor is aggregated by `sdpg_objective`, which is shared by the trainer and by
`sdpg_loss_reference`, so that the two differ only in how the per-token terms are computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

# GRPOTrainer's VESPO gamma weight (private to TRL, so imported through `_trl_compat`).
from ._trl_compat import vespo_gamma_weights


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to fp32 for the softmax; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as floats: fp32 from bool, integer or half-precision masks; an fp64 mask stays fp64."""
    return mask.to(torch.promote_types(mask.dtype, torch.float32))


def distill_coef_schedule(step: int, total_steps: int, base: float, warmup_steps: int, decay_steps: int) -> float:
    """SPEC 2.3: the distillation coefficient at step k, the paper's
    `beta(k) = base * min(1, k / T_warm) * min(1, (T - k) / T_decay)`.

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


@dataclass(frozen=True)
class OutcomeOptions:
    """How the outcome term is formed: GRPO's choices, under TRL `GRPOConfig`'s names (SPEC 2.1 generalised).

    `loss_type` picks the surrogate (PPO clip for the grpo family, CISPO, SAPO, VESPO) and, in `policy_token_weights`,
    the aggregation; `importance_sampling_level` is per token or per sequence (GSPO). `dual_clip` is SDPG's (SPEC 2.1)
    and only applies to PPO's clipped surrogate. `on_policy_surrogate`: on-policy, SPEC 2.1's REINFORCE form
    (`"reinforce"`) or the loss type's own at ratio 1 (`"ratio"`, GRPOTrainer's value; the same gradient). The defaults
    are SDPG's: DAPO aggregation, token ratios, dual clip 3, REINFORCE on-policy.
    """

    loss_type: str = "dapo"
    on_policy_surrogate: str = "reinforce"
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


# ---------------------------------------------------------------------------------------------------------------------
# Registries: a variant of a term is one registered function that declares the config fields it reads (as verl's
# `core_algos.register_policy_loss`). The config's allowed values, `--help`, error messages, docs/ALGORITHM.md's table
# and the resume check's loss-shaping fields are all read from here.
# ---------------------------------------------------------------------------------------------------------------------


def read_settings(reads: tuple[str, ...], settings: Mapping[str, Any] | Any | None) -> dict[str, Any]:
    """The values of the config fields `reads` from `settings`, a mapping or a config object (None: no fields)."""
    if not reads:
        return {}
    if settings is None:
        raise ValueError(f"This variant reads the config fields {list(reads)}; pass them as `settings`.")
    if isinstance(settings, Mapping):
        return {name: settings[name] for name in reads}
    return {name: getattr(settings, name) for name in reads}


def unknown_name(field: str, name: str, registry: Mapping[str, Any]) -> ValueError:
    """The error for a name that is not registered, listing the registered ones."""
    return ValueError(f"Unknown {field} {name!r}; expected one of {', '.join(map(repr, registry))}.")


class SurrogateInputs(NamedTuple):
    """What a loss type's surrogate reads, all `(B, T)` unless said: `logps` log pi_theta (with grad); `advantages`
    `(B, 1)` or `(B, T)`; `log_ratio` log pi_theta - log pi_old per token; `ratio` the importance ratio at
    `importance_sampling_level` (`(B, T)`, or `(B, 1)` per sequence); `mask` completion mask (float);
    `sampler_ratio` vLLM's `pi_old / pi_sampler` correction or None."""

    logps: torch.Tensor
    advantages: torch.Tensor
    log_ratio: torch.Tensor
    ratio: torch.Tensor
    mask: torch.Tensor
    sampler_ratio: torch.Tensor | None


class Aggregator(NamedTuple):
    """How a loss type sums its per-token loss: `weights(mask, token_normalizer, max_completion_length)` gives the
    `(B, T)` weight of each token; `spans_accumulation`: the weights already span the accumulated batch (DAPO's `N`),
    so they are not divided by the accumulation steps as the others are (TRL scales them for accumulation)."""

    weights: Callable[[torch.Tensor, torch.Tensor | float, int | None], torch.Tensor]
    spans_accumulation: bool
    description: str


ACCUMULATED_TOKENS = Aggregator(
    lambda mask, n, _: mask / n, True, "`N`, the completion tokens of the accumulated batch"
)
SEQUENCE_MEAN = Aggregator(
    lambda mask, n, _: mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / mask.size(0),
    False,
    "each sequence's mean, then the mean over sequences",
)
MICRO_BATCH_TOKENS = Aggregator(lambda mask, n, _: mask / mask.sum().clamp(min=1.0), False, "the micro-batch's tokens")
FIXED_LENGTH = Aggregator(
    lambda mask, n, max_len: mask / (mask.size(0) * (mask.size(1) if max_len is None else max_len)),
    False,
    "`B x max_completion_length`",
)
SEQUENCE_SUM = Aggregator(
    lambda mask, n, _: mask / mask.size(0), False, "each sequence's sum, then the mean over sequences"
)


@dataclass(frozen=True)
class LossType:
    """A registered outcome loss type (GRPO's `loss_type`): its surrogate and how it is aggregated.

    Attributes:
        name: the `loss_type` value. surrogate: `(SurrogateInputs, OutcomeOptions) -> ((B, T) loss, (B, 1) sequence
            weight it logs or None)`. aggregation: `Aggregator`. reads: the config fields the type reads (beyond
            `loss_type`, `importance_sampling_level` and `on_policy_surrogate`, which every type reads).
        clipped: the surrogate is PPO's clipped ratio (`dual_clip` applies; GRPO's `clip_ratio/*` metrics).
        reinforce_on_policy: on-policy with `on_policy_surrogate="reinforce"` it is SPEC 2.1's `-A log pi`.
        folds_sampler_ratio: the surrogate applies vLLM's sampler correction itself (else it multiplies the loss).
        metrics: `(Outcome, OutcomeOptions, (B, 1) or (B, T) advantages) -> {name: values}`, the type's own
            metrics, each a mean (per token, or per sequence for `(B, 1)` values) under GRPOTrainer's names.
        formula: the surrogate as docs/ALGORITHM.md's table writes it.
    """

    name: str
    surrogate: Callable[[SurrogateInputs, OutcomeOptions], tuple[torch.Tensor, torch.Tensor | None]]
    aggregation: Aggregator
    reads: tuple[str, ...]
    clipped: bool
    reinforce_on_policy: bool
    folds_sampler_ratio: bool
    metrics: Callable[..., dict[str, torch.Tensor]] | None
    formula: str


LOSS_TYPES: dict[str, LossType] = {}


def register_loss_type(
    name: str,
    *,
    aggregation: Aggregator,
    formula: str,
    reads: tuple[str, ...] = (),
    clipped: bool = False,
    reinforce_on_policy: bool = True,
    folds_sampler_ratio: bool = False,
    metrics: Callable[..., dict[str, torch.Tensor]] | None = None,
) -> Callable:
    """Register the decorated surrogate as outcome loss type `name` (see `LossType` for the arguments)."""

    def register(surrogate: Callable) -> Callable:
        if name in LOSS_TYPES:
            raise ValueError(f"loss_type {name!r} is already registered.")
        LOSS_TYPES[name] = LossType(
            name,
            surrogate,
            aggregation,
            tuple(reads),
            clipped,
            reinforce_on_policy,
            folds_sampler_ratio,
            metrics,
            formula,
        )
        return surrogate

    return register


def get_loss_type(name: str) -> LossType:
    """The registered loss type `name`; a ValueError listing the registered ones otherwise."""
    if name not in LOSS_TYPES:
        raise unknown_name("loss_type", name, LOSS_TYPES)
    return LOSS_TYPES[name]


def clipped_loss_types() -> tuple[str, ...]:
    """The registered loss types whose surrogate is PPO's clipped ratio (where `dual_clip` applies)."""
    return tuple(name for name, entry in LOSS_TYPES.items() if entry.clipped)


_PPO_CLIP_FIELDS = ("epsilon", "epsilon_high", "delta", "dual_clip")
_PPO_CLIP = "`-max(min(w' A, clip(w, 1 - eps_low, 1 + eps_high) A), c A)`"


# Decorators apply bottom-up: this registers grpo, bnpo, dr_grpo, dapo, luspo, in GRPOConfig's order.
@register_loss_type("luspo", aggregation=SEQUENCE_SUM, reads=_PPO_CLIP_FIELDS, clipped=True, formula=_PPO_CLIP)
@register_loss_type("dapo", aggregation=ACCUMULATED_TOKENS, reads=_PPO_CLIP_FIELDS, clipped=True, formula=_PPO_CLIP)
@register_loss_type(
    "dr_grpo",
    aggregation=FIXED_LENGTH,
    reads=(*_PPO_CLIP_FIELDS, "max_completion_length"),
    clipped=True,
    formula=_PPO_CLIP,
)
@register_loss_type("bnpo", aggregation=MICRO_BATCH_TOKENS, reads=_PPO_CLIP_FIELDS, clipped=True, formula=_PPO_CLIP)
@register_loss_type("grpo", aggregation=SEQUENCE_MEAN, reads=_PPO_CLIP_FIELDS, clipped=True, formula=_PPO_CLIP)
def ppo_clip_surrogate(x: SurrogateInputs, options: OutcomeOptions) -> tuple[torch.Tensor, None]:
    """PPO's clipped ratio (SPEC 2.1): `w'` is `w` capped at `delta` (INTELLECT-2's two-sided clip) and the dual-clip
    floor `c A` only applies for `A < 0`."""
    ratio, adv = x.ratio, x.advantages
    unclipped = ratio if options.delta is None else torch.clamp(ratio, max=options.delta)
    clipped = torch.clamp(ratio, 1 - options.epsilon_low, 1 + options.epsilon_high)
    surrogate = torch.min(unclipped * adv, clipped * adv)
    if options.dual_clip is not None:
        surrogate = torch.where(adv < 0, torch.max(surrogate, options.dual_clip * adv), surrogate)
    return -surrogate, None


def _cispo_metrics(policy: Outcome, options: OutcomeOptions, adv: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"cispo_clip_ratio": ((policy.ratio.detach() > options.epsilon_high) & (adv > 0)).float()}


@register_loss_type(
    "cispo",
    aggregation=ACCUMULATED_TOKENS,
    reads=("epsilon", "epsilon_high"),
    reinforce_on_policy=False,
    metrics=_cispo_metrics,
    formula="`-SG[min(w, eps_high)] A log pi`",
)
def cispo_surrogate(x: SurrogateInputs, options: OutcomeOptions) -> tuple[torch.Tensor, None]:
    """CISPO: the REINFORCE term weighted by the detached, capped ratio."""
    return -torch.clamp(x.ratio, max=options.epsilon_high).detach() * x.advantages * x.logps, None


@register_loss_type(
    "sapo",
    aggregation=SEQUENCE_MEAN,
    reads=("sapo_temperature_pos", "sapo_temperature_neg"),
    formula="`-sigmoid(tau (w - 1)) 4 / tau A`, `tau` the temperature of `A`'s sign",
)
def sapo_surrogate(x: SurrogateInputs, options: OutcomeOptions) -> tuple[torch.Tensor, None]:
    """SAPO: a soft gate on the ratio, with one temperature per advantage sign."""
    adv = x.advantages
    tau = torch.where(adv > 0, options.sapo_temperature_pos, options.sapo_temperature_neg)
    return -torch.sigmoid(tau * (x.ratio - 1)) * 4 / tau * adv, None


def _vespo_metrics(policy: Outcome, options: OutcomeOptions, adv: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"vespo/phi_seq_mean": policy.vespo_weight}


@register_loss_type(
    "vespo",
    aggregation=ACCUMULATED_TOKENS,
    reads=("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
    reinforce_on_policy=False,
    folds_sampler_ratio=True,
    metrics=_vespo_metrics,
    formula="`-SG[phi(w_seq)] A log pi`, TRL's gamma weight of the sequence ratio",
)
def vespo_surrogate(x: SurrogateInputs, options: OutcomeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """VESPO: the REINFORCE term weighted by TRL's detached gamma weight of the sequence ratio (which folds in vLLM's
    sampler correction)."""
    weight = vespo_gamma_weights(
        x.advantages,
        x.log_ratio,
        x.mask,
        x.sampler_ratio,
        k_pos=options.vespo_k_pos,
        lambda_pos=options.vespo_lambda_pos,
        k_neg=options.vespo_k_neg,
        lambda_neg=options.vespo_lambda_neg,
    )
    return -weight * x.advantages * x.logps, weight


def sampler_log_probs(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None) -> torch.Tensor:
    """`(B, T)` log-probs of the policy that sampled: the old ones off-policy, else the detached current ones (the
    one place this fallback is written; GRPOTrainer passes no old log-probs on-policy)."""
    return per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps


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

    With `w` the importance ratio (per token, or GSPO's `exp(mean_t log ratio)` per sequence) and `A` the advantage,
    the surrogate is the one registered for `options.loss_type` (`LOSS_TYPES`; docs/ALGORITHM.md's table lists them).
    On-policy (`old_per_token_logps is None`), a type registered with `reinforce_on_policy` (the clipped and soft
    surrogates) becomes the REINFORCE surrogate `-A log pi` (SPEC 2.1), which has its gradient at `w = 1`, unless
    `options.on_policy_surrogate` is `"ratio"` (GRPOTrainer's value: the surrogate itself at `w = 1`); the others
    (cispo, vespo) keep their form, with `w = 1`.

    Args:
        per_token_logps: `(B, T)` log pi_theta of the sampled tokens, with grad.
        advantages: `(B,)` group-relative advantages, or `(B, T)` per-token ones (RLSD's `A_hat`).
        old_per_token_logps: `(B, T)` log-probs of the policy that sampled, or None when on-policy.
        mask: `(B, T)` completion mask, for sequence-level ratios and VESPO; None: every token counts.
        sampler_ratio: `(B, T)` or `(B, 1)` vLLM importance-sampling correction `pi_old / pi_sampler` (TRL's
            `importance_sampling_ratio`), or None. It multiplies the surrogate; VESPO folds it into its weight.
    """
    loss_type = get_loss_type(options.loss_type)
    if options.importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"Unknown importance_sampling_level {options.importance_sampling_level!r}.")
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    mask = torch.ones_like(per_token_logps) if mask is None else mask.to(per_token_logps.dtype)
    on_policy = old_per_token_logps is None
    log_ratio = per_token_logps - sampler_log_probs(per_token_logps, old_per_token_logps)
    if options.importance_sampling_level == "sequence":
        ratio = torch.exp((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
    else:
        ratio = torch.exp(log_ratio)
    if on_policy and options.on_policy_surrogate == "reinforce" and loss_type.reinforce_on_policy:
        loss, vespo_weight = -adv * per_token_logps, None
    else:
        inputs = SurrogateInputs(per_token_logps, adv, log_ratio, ratio, mask, sampler_ratio)
        loss, vespo_weight = loss_type.surrogate(inputs, options)
    if sampler_ratio is not None and not loss_type.folds_sampler_ratio:
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

    The registered type's `Aggregator` gives the weights (docs/ALGORITHM.md's table): DAPO's `1 / token_normalizer`
    (the completion tokens of the accumulated batch, SPEC 2's `N`) spans the accumulated batch; the others are
    divided by `accumulation_steps`, as TRL scales them for gradient accumulation.

    Args:
        mask: `(B, T)` completion mask. token_normalizer: `N` for one micro-batch, as the trainer computes it.
        max_completion_length: dr_grpo's constant; None: `T`.
    """
    aggregation = get_loss_type(loss_type).aggregation
    weights = aggregation.weights(_float_mask(mask), token_normalizer, max_completion_length)
    return weights if aggregation.spans_accumulation else weights / accumulation_steps


# Reference code's clamp on RLSD's log-ratio, so exp() stays finite before the clip.
RLSD_DELTA_CLAMP = 20.0


def rlsd_lambda(step: int, start: float, decay_steps: int) -> float:
    """SPEC 3 (RLSD): the mixing weight `lam(k) = start * max(0, 1 - k / decay_steps)`; `decay_steps = 0` keeps it.

    `k` counts optimiser steps from 0, like `distill_coef_schedule`, so the first update uses `start`.
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


@dataclass(frozen=True)
class AnchorEstimator:
    """A registered anchor surrogate `L_K` (SPEC 2.4): `fn(log_w, **fields)` per token, with `log_w = log pi_theta -
    log pi_ref` on sampled tokens and `fields` the config fields it declares in `reads`."""

    name: str
    fn: Callable[..., torch.Tensor]
    reads: tuple[str, ...]
    formula: str


ANCHOR_ESTIMATORS: dict[str, AnchorEstimator] = {}


def register_anchor_estimator(name: str, *, formula: str, reads: tuple[str, ...] = ()) -> Callable:
    """Register the decorated `fn(log_w, **fields) -> (B, T)` as anchor estimator `name` (`kl_estimator`)."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in ANCHOR_ESTIMATORS:
            raise ValueError(f"kl_estimator {name!r} is already registered.")
        ANCHOR_ESTIMATORS[name] = AnchorEstimator(name, fn, tuple(reads), formula)
        return fn

    return register


def get_anchor_estimator(name: str) -> AnchorEstimator:
    """The registered anchor estimator `name`; a ValueError listing the registered ones otherwise."""
    if name not in ANCHOR_ESTIMATORS:
        raise unknown_name("kl_estimator", name, ANCHOR_ESTIMATORS)
    return ANCHOR_ESTIMATORS[name]


@register_anchor_estimator("k3", formula="`1/w + log w - 1` (TRL's)")
def k3_anchor(log_w: torch.Tensor) -> torch.Tensor:
    return torch.exp(-log_w) + log_w - 1


@register_anchor_estimator("urkl", formula="`0.5 (log w)^2` (the reference code's default)")
def urkl_anchor(log_w: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_w.square()


@register_anchor_estimator("ufkl", formula="`1/w + log w` (the gradient of `k3`)")
def ufkl_anchor(log_w: torch.Tensor) -> torch.Tensor:
    return torch.exp(-log_w) + log_w


@register_anchor_estimator("rkl", formula="`0.5 (log w + 1)^2`")
def rkl_anchor(log_w: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_w + 1).square()


@register_anchor_estimator("fkl", formula="`1/w`")
def fkl_anchor(log_w: torch.Tensor) -> torch.Tensor:
    return torch.exp(-log_w)


def anchor_per_token(
    per_token_logps: torch.Tensor,
    ref_per_token_logps: torch.Tensor,
    estimator: str,
    settings: Mapping[str, Any] | Any | None = None,
) -> torch.Tensor:
    """SPEC 2.4: per-token anchor surrogate `(B, T)` of the registered `estimator` (`ANCHOR_ESTIMATORS`), with
    `log w = log pi_theta - log pi_ref` on sampled tokens. `settings` (a mapping or an `SDPGConfig`) gives the
    config fields the estimator declares it reads."""
    entry = get_anchor_estimator(estimator)
    return entry.fn(per_token_logps - ref_per_token_logps, **read_settings(entry.reads, settings))


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


@dataclass(frozen=True)
class LossTerms:
    """Which per-token terms one step needs; `compute_loss` reads this instead of branching on method names.

    A method (GRPO, RLSD, OPCD, SDPG and its ablations) is a choice of coefficients, and a term whose coefficient is
    0 at this step is not computed at all. The teacher forward runs only when `distill` or `rlsd` is set.

    Attributes:
        outcome: the verifier-grounded surrogate `L_out` (SPEC 2.1); off for pure self-distillation (OPCD).
        distill: the full-vocabulary reverse KL to the teacher (SPEC 2.2, the paper's `L_OPD`); on when the
            scheduled `distill_coef` is > 0.
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


class TokenSelection(NamedTuple):
    """Which rollouts and tokens each term of one step uses (SPEC 2.2's gate, RLSD's scored rows, SPEC 1's fit).

    Attributes:
        gate: `(B,)` float `m_i` (all ones with the gate off). distill_rows: `(B,)` bool, the rollouts distilled:
            gated, with a teacher prompt that fits, on a step that distils. teacher_rows: `(B,)` bool, the rollouts
            the teacher scores: the distilled ones and, for RLSD, every one whose advantage is not 0 (RLSD's `A_hat`
            is 0 where `A` is). teacher_index: `(B,)` long, each rollout's row among the teacher's (-1: none).
        plain: `(B, T)` valid tokens that are not distilled (the student's log-prob only). distilled: `(B, T)` valid
            tokens of the distilled rollouts. teacher_only: `(B, T)` valid tokens the teacher scores without a KL
            (RLSD's).
    """

    gate: torch.Tensor
    distill_rows: torch.Tensor
    teacher_rows: torch.Tensor
    teacher_index: torch.Tensor
    plain: torch.Tensor
    distilled: torch.Tensor
    teacher_only: torch.Tensor

    @property
    def rows(self) -> torch.Tensor:
        """`(R,)` indices of the rollouts the teacher scores, in the order of `teacher_index`."""
        return self.teacher_rows.nonzero().squeeze(1)


def token_selection(
    advantages: torch.Tensor,
    mask: torch.Tensor,
    terms: LossTerms,
    *,
    gate_enabled: bool = True,
    fits: torch.Tensor | bool = True,
) -> TokenSelection:
    """The rows and tokens of one step's terms (`TokenSelection`), from the advantages `(B,)`, the completion mask
    `(B, T)`, the step's terms and `fits` `(B,)`: the rollouts whose teacher prompt fits its length cap."""
    gate = positive_advantage_gate(advantages, gate_enabled)
    distill_rows = gate.bool() & terms.distill & fits
    teacher_rows = distill_rows | ((advantages != 0) & terms.rlsd & fits)
    rows = teacher_rows.nonzero().squeeze(1)
    teacher_index = torch.full_like(advantages, -1, dtype=torch.long)
    teacher_index[rows] = torch.arange(rows.numel(), device=rows.device)
    valid = mask.bool()
    distilled = valid & distill_rows.unsqueeze(1)
    return TokenSelection(
        gate=gate,
        distill_rows=distill_rows,
        teacher_rows=teacher_rows,
        teacher_index=teacher_index,
        plain=valid & ~distilled,
        distilled=distilled,
        teacher_only=valid & teacher_rows.unsqueeze(1) & ~distilled,
    )


class Aggregation(NamedTuple):
    """How per-token terms are summed into the loss: SPEC 2's `N` for the distillation term, GRPO's `(B, T)`
    weights for the outcome and the anchor (`policy_token_weights`), the gradient accumulation steps of the step (1
    in evaluation), which GRPO's entropy bonus and MoE auxiliary loss are divided by too, and whether the loss type's
    weights already span them (`Aggregator.spans_accumulation`: DAPO's `N`)."""

    normalizer: torch.Tensor
    policy_weights: torch.Tensor
    accumulation_steps: int = 1
    spans_accumulation: bool = True


def loss_aggregation(
    mask: torch.Tensor,
    loss_type: str,
    num_items_in_batch: torch.Tensor,
    *,
    num_processes: int = 1,
    accumulation_steps: int = 1,
    steps_per_generation: int = 1,
    max_completion_length: int | None = None,
) -> Aggregation:
    """The one normaliser rule, for the trainer and for `sdpg_loss_reference`.

    `N` is the completion tokens of the generation batch on all processes (`num_items_in_batch`, as GRPOTrainer's
    DAPO counts it), per process, and per micro-batch of an optimizer step: a generation batch is split into
    `steps_per_generation` micro-batches, `accumulation_steps` of which are summed into one step. With the defaults
    (one process, one micro-batch) it is `num_items_in_batch` itself.

    Args:
        mask: `(B, T)` completion mask. num_items_in_batch: scalar tensor. accumulation_steps: the gradient
            accumulation steps of a training step (1 in evaluation).
    """
    normalizer = num_items_in_batch.clamp(min=1.0) / num_processes * accumulation_steps / steps_per_generation
    weights = policy_token_weights(
        mask,
        loss_type,
        token_normalizer=normalizer,
        max_completion_length=max_completion_length,
        accumulation_steps=accumulation_steps,
    )
    spans_accumulation = get_loss_type(loss_type).aggregation.spans_accumulation
    return Aggregation(normalizer, weights, accumulation_steps, spans_accumulation)


def sdpg_objective(
    outcome: torch.Tensor | None,
    distill_kl: torch.Tensor | None,
    anchor: torch.Tensor | None,
    mask: torch.Tensor,
    distill_weight: torch.Tensor,
    rho: torch.Tensor,
    *,
    distill_coef: float,
    kl_coef: float,
    aggregation: Aggregation,
    outcome_coef: float = 1.0,
    anchor_ratio_weighted: bool = True,
) -> torch.Tensor:
    """SPEC 2: `c_out L_out + beta(k) L_OPD+ + alpha L_K`.

    The distillation term is summed over tokens and divided by `aggregation.normalizer`, SPEC 2's `N` (the
    completion tokens, DAPO-style), whatever GRPO's `loss_type`. The outcome and the anchor are GRPO's per-token loss
    (its policy term plus its KL term), so they are aggregated the way `loss_type` aggregates it: by
    `aggregation.policy_weights`. With the default `loss_type="dapo"` those weights are `mask / N` too, and every term
    is over `N` as SPEC 2 says.

    Args:
        outcome, distill_kl, anchor: `(B, T)` per-token terms, or None when the step does not use the term (whether
            it does is `LossTerms`' decision; a term given here is added, whatever its coefficient).
        mask: `(B, T)` completion mask. rho: `(B, T)` detached importance ratio (1 on-policy).
        distill_weight: `(B,)` gate m_i, or `(B, T)` the gate times per-token filters (EOS, teacher confidence).
        distill_coef: the scheduled beta(k). kl_coef: alpha. outcome_coef: 1 for every method but pure distillation.
        anchor_ratio_weighted: weigh the anchor by `SG[rho]` off-policy (SPEC 2.4); GRPO does not.
        aggregation: from `loss_aggregation`.
    Returns: scalar loss.
    """
    policy = torch.zeros_like(rho)
    if outcome is not None:
        policy = policy + outcome_coef * outcome
    if anchor is not None:
        policy = policy + kl_coef * (rho if anchor_ratio_weighted else 1.0) * anchor
    distill = torch.zeros_like(rho)
    if distill_kl is not None:
        weight = distill_weight.unsqueeze(1) if distill_weight.dim() == 1 else distill_weight
        distill = distill_coef * weight * rho * distill_kl
    return (policy * aggregation.policy_weights).sum() + (distill * mask).sum() / aggregation.normalizer


def masked_totals(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(2,)`: the sum of `values` where `mask` is set, and how many places that is (the parts of `masked_mean`)."""
    mask = _float_mask(mask)
    return torch.stack([(values * mask).sum(), mask.sum()])


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Mean of `values` where `mask` is set (0 when nothing is); `reduce` sums the total and the count over processes
    (e.g. `accelerator.reduce`), so that the mean is over every process's tokens."""
    totals = masked_totals(values, mask)
    if reduce is not None:
        totals = reduce(totals)
    return totals[0] / totals[1].clamp(min=1.0)


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
    weight = gate.unsqueeze(1) * _float_mask(mask)
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
    anchor_settings: Mapping[str, Any] | Any | None = None,
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
        kl_estimator: a registered anchor estimator; anchor_settings: the config fields it reads (an `SDPGConfig`).
        ref_per_token_logps, old_per_token_logps: `(B, T)` or None.
        rlsd_lam, rlsd_clip: RLSD's scheduled `lam(k)` and `eps_w`; `rlsd_lam > 0` reweights the advantages.
        eos_token_ids, teacher_confident_only: the optional distillation token filters (`distill_token_weight`).
        outcome: GRPO's loss type, importance-sampling level and clipping (`OutcomeOptions`). anchor_ratio_weighted:
            weigh the anchor by `SG[rho]`. bias_correction_kl: multiply the anchor by the importance ratio, with its
            gradient (TRL's `use_bias_correction_kl`). max_completion_length: dr_grpo's constant (None: `T`).
    Returns: the scalar loss (the distillation term normalised by all completion tokens of the batch, the outcome and
        the anchor aggregated by `outcome.loss_type` in one accumulation step) and float metrics:
        `distill_kl`, `teacher_minus_student_logp`, `teacher_entropy` and `student_entropy` (means over the gated
        tokens),
        `gate_ratio` (fraction of rollouts distilled), `anchor` (mean surrogate) and `kl` (mean k3, importance-weighted
        with `bias_correction_kl` as GRPOTrainer logs it) when a reference is given.
    """
    mask = completion_mask.to(_upcast(student_logits).dtype)
    log_p = F.log_softmax(_upcast(student_logits), dim=-1)
    per_token_logps = log_p.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    teacher_logps = F.log_softmax(_upcast(teacher_logits), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    m = positive_advantage_gate(advantages, gate)
    terms = loss_terms(outcome_coef=outcome_coef, distill_coef=distill_coef, rlsd_lam=rlsd_lam, kl_coef=kl_coef)
    if terms.rlsd:
        old = sampler_log_probs(per_token_logps, old_per_token_logps)
        advantages = rlsd_advantages(advantages, teacher_logps, old, lam=rlsd_lam, clip=rlsd_clip)
    policy = outcome_per_token(per_token_logps, advantages, old_per_token_logps, mask=mask, options=outcome)
    distill_kl = full_vocab_reverse_kl(student_logits, teacher_logits)
    student_entropy, teacher_entropy = entropy_from_logits(student_logits), entropy_from_logits(teacher_logits)
    weight = distill_token_weight(
        mask,
        m,
        completion_ids=completion_ids,
        eos_token_ids=eos_token_ids,
        student_entropy=student_entropy.detach() if teacher_confident_only else None,
        teacher_entropy=teacher_entropy if teacher_confident_only else None,
    )
    use_anchor = ref_per_token_logps is not None and terms.anchor
    anchor = None
    if use_anchor:
        anchor = anchor_per_token(per_token_logps, ref_per_token_logps, kl_estimator, anchor_settings)
    if use_anchor and bias_correction_kl:
        anchor = anchor * policy.ratio
    tokens = loss_aggregation(mask, outcome.loss_type, mask.sum(), max_completion_length=max_completion_length)
    loss = sdpg_objective(
        policy.loss if terms.outcome else None,
        distill_kl if terms.distill else None,
        anchor,
        mask,
        weight,
        policy.rho,
        outcome_coef=outcome_coef,
        distill_coef=distill_coef,
        kl_coef=kl_coef,
        aggregation=tokens,
        anchor_ratio_weighted=anchor_ratio_weighted,
    )

    with torch.no_grad():
        distilled = mask * m.unsqueeze(1)
        metrics = {
            "distill_kl": masked_mean(distill_kl, distilled).item(),
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
