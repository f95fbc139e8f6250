"""`SDPGConfig`: GRPO's configuration plus the fields SDPG adds (SPEC sections 2.2-2.4)."""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from trl import GRPOConfig

KL_ESTIMATORS = ("k3", "urkl", "ufkl", "rkl", "fkl")

DEFAULT_TEACHER_TEMPLATE = (
    "\n\n---\nPrivileged hint (for you only): {context}\n\n"
    "Work the problem out yourself with rigorous reasoning, by a different route than the hint if you can. "
    "Do not mention that you were given a hint. Put the final answer in \\boxed{{}}."
)


def template_fields(template: str) -> set[str]:
    """Names of the `{placeholders}` in a `str.format` template (escaped `{{` `}}` are not fields)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


@dataclass
class SDPGConfig(GRPOConfig):
    r"""
    Configuration for [`SDPGTrainer`]: every [`trl.GRPOConfig`] field, plus the SDPG ones below.

    SDPG minimises `L_out + beta(k) * L_OPD+ + alpha * L_K` (SPEC 2). Paper symbols map to fields as follows:
    `beta_base` -> `distill_coef`, `T_warm` -> `distill_warmup_steps`, `T_decay` -> `distill_decay_steps`,
    `m_i` -> `distill_positive_only`, `alpha` -> TRL's `beta`, `L_K` -> `kl_estimator`, `c` -> `context_column`.
    Defaults follow the paper's Qwen3 runs (SPEC 4).

    Parameters:
        > SDPG: dense self-distillation (SPEC 2.2, 2.3)

        distill_coef (`float`, *optional*, defaults to `1e-3`):
            Peak weight `beta_base` of the full-vocabulary reverse KL from the student to the detached privileged
            teacher. `0.0` turns the distillation off (and skips the teacher pass), leaving GRPO with an anchor.
        distill_warmup_steps (`int`, *optional*, defaults to `50`):
            `T_warm`: optimiser steps over which `beta(k)` ramps linearly from 0 to `distill_coef`. `0` = no warmup.
        distill_decay_steps (`int`, *optional*, defaults to `350`):
            `T_decay`: `beta(k)` falls linearly to 0 over the last `T_decay` optimiser steps of the run. `0` = no
            decay. When warmup and decay overlap, the peak stays below `distill_coef`.
        distill_positive_only (`bool`, *optional*, defaults to `True`):
            The gate `m_i = 1[A_i > 0]`: distil only rollouts the verifier endorses within their group. `False`
            distils every rollout (the OPCD-style ablation).
        distill_chunk_size (`int`, *optional*, defaults to `1024`):
            Distilled tokens per call of the fused log-prob + full-vocabulary KL pass over the LM head. Its transient
            memory is a few `distill_chunk_size x 8192` fp32 vocabulary tiles, whatever the vocabulary size.

        > SDPG: privileged context (SPEC 1)

        context_column (`str`, *optional*, defaults to `"privileged_context"`):
            Dataset column holding the privileged context `c` of each prompt (a reference answer, a worked solution,
            or both, as text).
        teacher_template (`str`, *optional*):
            Text appended to the student prompt to build the teacher prompt. Must contain `{context}`, which is
            replaced by the row's privileged context; literal braces are written `{{` and `}}`. For conversational
            prompts it is appended to the last user message before the chat template is applied.

        > Reference anchor (SPEC 2.4); its coefficient `alpha` is TRL's `beta` field

        kl_estimator (`str`, *optional*, defaults to `"urkl"`):
            Per-token surrogate for the anchor to the frozen reference policy, with `w = pi_theta / pi_ref` on
            sampled tokens: `"urkl"` `0.5 * log(w)^2` (the reference code's default), `"ufkl"` `1/w + log w`,
            `"rkl"` `0.5 * (log w + 1)^2`, `"fkl"` `1/w`, or `"k3"` TRL's `1/w + log w - 1` (same gradient as
            `"ufkl"`).
        beta (`float`, *optional*, defaults to `1e-3`):
            The anchor coefficient `alpha` (TRL's name, kept so GRPO recipes keep their meaning). `0.0` skips the
            reference model entirely.
        delta (`float` or `None`, *optional*, defaults to `3.0`):
            Dual-clip constant `c` for negative advantages in the off-policy surrogate (SPEC 2.1; Ye et al., 2020).
            Only used when old log-probs differ from the current ones (`num_iterations > 1`, stale batches, vLLM).
        loss_type (`str`, *optional*, defaults to `"dapo"`):
            Must be `"dapo"`: SPEC 2 normalises every term by the number of completion tokens.
        use_bias_correction_kl (`bool`, *optional*, defaults to `False`):
            Must stay `False`: GRPO's importance-weighted KL is not one of SPEC 2.4's anchors (`kl_estimator` is).
            Off-policy, the anchor is weighted by the detached ratio as SPEC 2.4 says.

    GRPO options that add a term SDPG's loss does not carry (`importance_sampling_level="sequence"`,
    `top_entropy_quantile < 1`, an entropy bonus, `off_policy_mask_threshold`) are refused with an error.
    """

    distill_coef: float = field(
        default=1e-3, metadata={"help": "beta_base: peak weight of the gated full-vocabulary reverse KL."}
    )
    distill_warmup_steps: int = field(default=50, metadata={"help": "T_warm: linear warmup of beta(k), in steps."})
    distill_decay_steps: int = field(default=350, metadata={"help": "T_decay: linear decay of beta(k), in steps."})
    distill_positive_only: bool = field(
        default=True, metadata={"help": "Distil only rollouts with positive advantage (the gate m_i)."}
    )
    distill_chunk_size: int = field(
        default=1024, metadata={"help": "Completion tokens per chunk of the full-vocabulary KL."}
    )
    context_column: str = field(
        default="privileged_context", metadata={"help": "Dataset column with the privileged context."}
    )
    teacher_template: str = field(
        default=DEFAULT_TEACHER_TEMPLATE,
        metadata={"help": "Text appended to the student prompt for the teacher; must contain {context}."},
    )
    kl_estimator: str = field(
        default="urkl", metadata={"help": "Anchor surrogate: k3, urkl, ufkl, rkl or fkl.", "choices": KL_ESTIMATORS}
    )
    # Paper defaults for fields GRPOConfig already has.
    beta: float = field(default=1e-3, metadata={"help": "alpha: coefficient of the reference anchor."})
    delta: float | None = field(default=3.0, metadata={"help": "Dual-clip constant c for negative advantages."})
    use_bias_correction_kl: bool = field(
        default=False, metadata={"help": "Unsupported (must stay False): the anchor is chosen by kl_estimator."}
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("distill_coef", "beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"SDPGConfig.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("distill_warmup_steps", "distill_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"SDPGConfig.{name} must be >= 0 steps, got {getattr(self, name)}.")
        if self.distill_chunk_size < 1:
            raise ValueError(f"SDPGConfig.distill_chunk_size must be >= 1, got {self.distill_chunk_size}.")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"SDPGConfig.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}."
            )
        if self.loss_type != "dapo":
            raise ValueError(
                f"SDPGConfig.loss_type must be 'dapo' (SPEC 2 normalises by completion tokens), got {self.loss_type!r}."
            )
        # GRPO options whose term SDPG's loss does not carry; refuse them rather than ignore them silently.
        for name, supported in (
            ("importance_sampling_level", "token"),
            ("top_entropy_quantile", 1.0),
            ("entropy_coef", 0.0),
            ("use_adaptive_entropy", False),
            ("off_policy_mask_threshold", None),
            ("use_bias_correction_kl", False),
        ):
            if getattr(self, name) != supported:
                raise ValueError(f"SDPGConfig.{name} must stay {supported!r}: SDPG's loss does not implement it.")
        if self.delta is not None and self.delta <= 1.0:
            raise ValueError(f"SDPGConfig.delta (dual-clip c) must be > 1, got {self.delta}.")
        if not self.context_column:
            raise ValueError("SDPGConfig.context_column must name a dataset column.")
        try:
            fields = template_fields(self.teacher_template)
        except ValueError as err:  # unbalanced braces
            raise ValueError(f"SDPGConfig.teacher_template is not a valid format string: {err}") from err
        if "context" not in fields:
            raise ValueError("SDPGConfig.teacher_template must contain the placeholder {context}.")
        if fields - {"context"}:
            raise ValueError(
                f"SDPGConfig.teacher_template has unknown placeholders {sorted(fields - {'context'})}; "
                "only {context} is filled (write literal braces as {{ and }})."
            )
