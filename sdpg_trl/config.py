"""`SDPGConfig`: GRPO's configuration plus the fields SDPG adds (SPEC sections 2.2-2.4)."""

from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from .losses import CLIPPED_LOSS_TYPES, LOSS_TYPES

KL_ESTIMATORS = ("k3", "urkl", "ufkl", "rkl", "fkl")
TEACHER_MODEL_KINDS = ("live", "base", "ema")  # TRL SDPOTrainer's names

DEFAULT_TEACHER_TEMPLATE = (
    "\n\n---\nPrivileged hint (for you only): {context}\n\n"
    "Work the problem out yourself with rigorous reasoning, by a different route than the hint if you can. "
    "Do not mention that you were given a hint. Put the final answer in \\boxed{{}}."
)


# The reference code's later choice (off by default): only the final answer, and an instruction to check against it.
# Use it with `context_column` naming the answer column (the built-in data sets call it `answer`).
ANSWER_CHECK_TEACHER_TEMPLATE = (
    "\n\nThe final answer is {context}. Reason step by step, check your reasoning against that answer, and put the "
    "final answer in \\boxed{{}}."
)

# Templates by name, so that a recipe or flag can write `teacher_template: answer_check` instead of the text.
TEACHER_TEMPLATES = {"default": DEFAULT_TEACHER_TEMPLATE, "answer_check": ANSWER_CHECK_TEACHER_TEMPLATE}


def resolve_teacher_template(template: str) -> str:
    """The text of a teacher template given by name (a key of `TEACHER_TEMPLATES`) or as text (returned as is)."""
    return TEACHER_TEMPLATES.get(template, template)


# Methods as presets (SPEC 3): each names the settings that make it; every other field keeps its value. A preset only
# fills fields left at their default, so a recipe or flag that sets a field explicitly always wins.
METHODS: dict[str, dict[str, Any]] = {
    # The paper's SDPG with its two anchors (SPEC 2); the defaults are SDPG-URKL.
    "sdpg_urkl": {"kl_estimator": "urkl"},
    "sdpg_ufkl": {"kl_estimator": "ufkl"},
    # The paper's ablations: no distillation (beta = 0) and no anchor (alpha = 0).
    "sdpg_no_distill": {"distill_coef": 0.0},
    "sdpg_no_anchor": {"beta": 0.0},
    # GRPO: no teacher, TRL's k3 anchor with alpha = 1e-3, the clipped surrogate (SPEC 3).
    "grpo": {
        "distill_coef": 0.0,
        "kl_estimator": "k3",
        "beta": 1e-3,
        "dual_clip": None,
        "anchor_ratio_weighted": False,
    },
    # RLSD: the teacher only reweights the token advantages; no distillation term, no reference model (SPEC 3).
    "rlsd": {"distill_coef": 0.0, "beta": 0.0, "rlsd_coef": 0.5, "rlsd_decay_steps": 50, "rlsd_clip": 0.2},
    # OPCD / pure on-policy self-distillation: the KL on every rollout, no outcome term, no gate, no anchor (SPEC 3).
    "opcd": {
        "outcome_coef": 0.0,
        "distill_coef": 1.0,
        "distill_positive_only": False,
        "distill_warmup_steps": 0,
        "distill_decay_steps": 0,
        "beta": 0.0,
    },  # fmt: skip
}


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
    Defaults follow the paper's Qwen3 runs (SPEC 4). Schedules count optimiser steps from 0 (the reference code counts
    from 1): with warmup, the first update has `beta(0) = 0` and skips the teacher pass.

    Parameters:
        > Method (SPEC 3)

        method (`str`, *optional*, defaults to `"sdpg_urkl"`):
            Preset that fills the settings of one method: `"sdpg_urkl"`, `"sdpg_ufkl"`, `"sdpg_no_distill"` (beta = 0),
            `"sdpg_no_anchor"` (alpha = 0), `"grpo"`, `"rlsd"` or `"opcd"` (see `METHODS`). It only fills fields left
            at their default, so any field set in a recipe or on the command line overrides it.
        outcome_coef (`float`, *optional*, defaults to `1.0`):
            Weight of the outcome term `L_out`. `0.0` switches it off (pure self-distillation, OPCD).

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
        distill_exclude_eos (`bool`, *optional*, defaults to `False`):
            Leave EOS tokens out of the distillation term (the reference code's authors found EOS carried about 2.5x
            the mean per-token KL and taught the model not to stop). Off by default: SPEC 2.2 distils every token.
        distill_teacher_confident_only (`bool`, *optional*, defaults to `False`):
            Distil only tokens where the teacher's entropy is below the student's, so the student is pulled only
            where the privileged view is more certain. Off by default (SPEC 2.2 distils every token).
        distill_chunk_size (`int`, *optional*, defaults to `1024`):
            Distilled tokens per call of the fused log-prob + full-vocabulary KL pass over the LM head. Its transient
            memory is a few `distill_chunk_size x 8192` fp32 vocabulary tiles, whatever the vocabulary size.

        > RLSD (SPEC 3): the teacher reweights the advantages of sampled tokens

        rlsd_coef (`float`, *optional*, defaults to `0.0`):
            Start value of RLSD's mixing weight `lam`; `0.0` turns RLSD off (the `"rlsd"` preset sets 0.5).
        rlsd_decay_steps (`int`, *optional*, defaults to `50`):
            Optimiser steps over which `lam` falls linearly to 0 (counted from 0 like `beta(k)`); `0` keeps it.
        rlsd_clip (`float`, *optional*, defaults to `0.2`):
            `eps_w`: the token weight `exp(sign(A) * Delta)` is clipped to `[1 - eps_w, 1 + eps_w]`.

        > The teacher's weights (TRL `SDPOTrainer`'s names)

        teacher_model_kind (`str`, *optional*, defaults to `"live"`):
            `"live"`: the current policy (the paper's SDPG). `"base"`: the frozen initial weights (the reference
            model when there is one, so it costs no memory; with PEFT, the adapter switched off; otherwise a frozen
            copy). `"ema"`: an exponential moving average of the policy (a second copy of the weights; with LoRA, a
            second adapter).
        teacher_update_rate (`float`, *optional*, defaults to `0.05`):
            EMA rate: every `teacher_sync_steps` steps the teacher becomes `(1 - rate) * teacher + rate * policy`.
        teacher_sync_steps (`int`, *optional*, defaults to `1`):
            Optimiser steps between two EMA updates.

        > SDPG: privileged context (SPEC 1)

        context_column (`str`, *optional*, defaults to `"privileged_context"`):
            Dataset column holding the privileged context `c` of each prompt (a reference answer, a worked solution,
            or both, as text).
        teacher_template (`str`, *optional*):
            Text appended to the student prompt to build the teacher prompt. Must contain `{context}`, which is
            replaced by the row's privileged context; literal braces are written `{{` and `}}`. For conversational
            prompts it is appended to the last user message before the chat template is applied.
            A name from `TEACHER_TEMPLATES` stands for its text: `"default"` (`DEFAULT_TEACHER_TEMPLATE`) or
            `"answer_check"` (`ANSWER_CHECK_TEACHER_TEMPLATE`, the reference code's answer-only alternative; give it
            the answer column as `context_column`).
        max_teacher_prompt_length (`int` or `None`, *optional*, defaults to `None`):
            Longest teacher prompt in tokens (student prompt + filled template, chat template included). `None`: the
            model's `max_position_embeddings` minus `max_completion_length`, so that the teacher prompt and the
            completion fit the positions the model has (no cap for a model config without `max_position_embeddings`).
            A longer teacher prompt gets its privileged context shortened token-wise, never the problem or the
            template; a row that does not fit even with an empty context is not scored by the teacher (no
            distillation, no RLSD reweighting; its outcome and anchor terms are unchanged), counted in
            `sdpg/teacher_prompt_too_long`. Either way the teacher scores the student's completion tokens unchanged.
        teacher_context_truncation_side (`str`, *optional*, defaults to `"left"`):
            Which end of a too-long privileged context is cut: `"left"` drops its beginning and keeps its end (where a
            worked solution states its final answer), `"right"` drops its end. Counted in
            `sdpg/teacher_context_truncated`.

        > Checkpoints

        Checkpoints are written only where a generation cycle ends (`generation_cycle_steps`: `steps_per_generation x
        num_iterations` micro-batches, in optimizer steps), since GRPOTrainer cannot resume exactly inside one.
        `save_steps` must be a multiple of it; any other save (the last step, `save_strategy="epoch"`) that falls
        inside a cycle is not written, with a warning.

        > Non-finite values (`sdpg_trl.guards`)

        max_consecutive_skipped_steps (`int`, *optional*, defaults to `5`):
            An optimizer step whose loss or gradient is not finite, or whose generation batch has an infinite reward
            (or no reward at all), is skipped: no optimizer step and no scheduler step, a warning with the step number,
            and `skipped_steps` in the logs. After this many skipped steps in a row training stops with an error.
            The logged `loss` averages only the optimised steps of its window (`None` when all were skipped). Not
            available under DeepSpeed, which applies the update inside the backward pass.

        > Diagnostics

        log_term_grad_norms (`bool`, *optional*, defaults to `False`):
            Log the norm of each term's gradient with respect to the final hidden states of the completion
            (`grad_norm/outcome`, `grad_norm/distill`, `grad_norm/anchor`), to see which term moves the model. Costs
            one extra LM-head backward per term.

        > Reference anchor (SPEC 2.4); its coefficient `alpha` is TRL's `beta` field

        kl_estimator (`str`, *optional*, defaults to `"urkl"`):
            Per-token surrogate for the anchor to the frozen reference policy, with `w = pi_theta / pi_ref` on
            sampled tokens: `"urkl"` `0.5 * log(w)^2` (the reference code's default), `"ufkl"` `1/w + log w`,
            `"rkl"` `0.5 * (log w + 1)^2`, `"fkl"` `1/w`, or `"k3"` TRL's `1/w + log w - 1` (same gradient as
            `"ufkl"`).
        beta (`float`, *optional*, defaults to `1e-3`; GRPOConfig: `0.0`):
            The anchor coefficient `alpha` (TRL's name, kept so GRPO recipes keep their meaning). `0.0` skips the
            reference model entirely.
        anchor_ratio_weighted (`bool`, *optional*, defaults to `True`):
            Off-policy, weigh the anchor by the detached ratio `rho` (SPEC 2.4). GRPO does not (the `"grpo"` preset).
        use_bias_correction_kl (`bool`, *optional*, defaults to `False`; GRPOConfig: `True`):
            GRPO's bias-corrected KL (DeepSeek-V3.2): the anchor times the importance ratio at
            `importance_sampling_level`, with its gradient, so it changes the gradient even on-policy. Off by default,
            as SPEC 2.4 weighs the anchor by the detached ratio instead (`anchor_ratio_weighted`); turning it on needs
            `anchor_ratio_weighted=False`, since both would weigh the anchor by the ratio.

        > The outcome term: GRPO's options (SPEC 2.1)

        The outcome term is GRPO's policy loss, with every option GRPOTrainer has for it, under GRPOConfig's names and
        meanings: `loss_type`, `importance_sampling_level`, `epsilon`, `epsilon_high`, `delta`, `sapo_temperature_*`,
        `vespo_*`, `top_entropy_quantile` and `off_policy_mask_threshold` (the last two filter the outcome term only,
        as in GRPO). vLLM's `importance_sampling_ratio` corrects it as in GRPO. With the teacher off (the `"grpo"`
        preset, or `distill_coef=0` with the same settings) SDPGTrainer's loss and gradient are GRPOTrainer's.

        loss_type (`str`, *optional*, defaults to `"dapo"`, as GRPOConfig):
            `"grpo"`, `"bnpo"`, `"dr_grpo"`, `"dapo"`, `"cispo"`, `"sapo"`, `"luspo"` or `"vespo"`: GRPO's surrogate
            and aggregation of the outcome term and the anchor (GRPO's per-token loss is its policy term plus its KL
            term). The distillation term is always summed over tokens and divided by the number of completion tokens
            `N` (SPEC 2, DAPO-style), whatever the loss type; with `"dapo"` every term is over `N`, as in SPEC 2.
            On-policy the outcome is the REINFORCE surrogate `-A log pi` (SPEC 2.1), which has the gradient of the
            clipped and soft surrogates at ratio 1 (cispo and vespo keep their form with ratio 1).
        dual_clip (`float` or `None`, *optional*, defaults to `3.0`):
            Dual-clip constant `c` for negative advantages in the off-policy surrogate (SPEC 2.1; Ye et al., 2020).
            Only used when old log-probs differ from the current ones (`num_iterations > 1`, stale batches, vLLM).
            `None` turns it off (GRPO). It floors PPO's clipped ratio, so it must be `None` for `"cispo"`, `"sapo"`
            and `"vespo"`, which bound the ratio their own way. TRL's `delta` keeps its own meaning (the two-sided
            upper clip, default off).

    SDPG's terms stay SDPG's whatever the outcome options: off-policy the distillation term (and the anchor, with
    `anchor_ratio_weighted`) is weighted by the detached per-token ratio `rho` (SPEC 2.2, 2.4), also with
    `importance_sampling_level="sequence"`, and neither is masked by `top_entropy_quantile` or
    `off_policy_mask_threshold`. GRPO's entropy bonus (`entropy_coef`,
    `use_adaptive_entropy`) is refused with an error: it is not implemented. `use_liger_kernel` does what it does in
    GRPOTrainer: Liger's layer kernels (RMSNorm, RoPE, SwiGLU) on the policy; its fused linear cross-entropy, which
    would replace the LM-head pass SDPG computes itself, is refused by GRPOTrainer.
    """

    method: str = field(
        default="sdpg_urkl",
        metadata={"help": "Method preset (fills fields left at their default).", "choices": list(METHODS)},
    )
    outcome_coef: float = field(default=1.0, metadata={"help": "Weight of the outcome term; 0 = pure distillation."})
    distill_coef: float = field(
        default=1e-3, metadata={"help": "beta_base: peak weight of the gated full-vocabulary reverse KL."}
    )
    distill_warmup_steps: int = field(default=50, metadata={"help": "T_warm: linear warmup of beta(k), in steps."})
    distill_decay_steps: int = field(default=350, metadata={"help": "T_decay: linear decay of beta(k), in steps."})
    distill_positive_only: bool = field(
        default=True, metadata={"help": "Distil only rollouts with positive advantage (the gate m_i)."}
    )
    distill_exclude_eos: bool = field(default=False, metadata={"help": "Leave EOS tokens out of the distillation."})
    distill_teacher_confident_only: bool = field(
        default=False, metadata={"help": "Distil only where the teacher's entropy is below the student's."}
    )
    rlsd_coef: float = field(default=0.0, metadata={"help": "RLSD: start value of lam; 0 = off."})
    rlsd_decay_steps: int = field(default=50, metadata={"help": "RLSD: steps over which lam decays to 0."})
    rlsd_clip: float = field(default=0.2, metadata={"help": "RLSD: eps_w, clip of the token weight."})
    teacher_model_kind: str = field(
        default="live", metadata={"help": "Teacher weights: live, base or ema.", "choices": TEACHER_MODEL_KINDS}
    )
    teacher_update_rate: float = field(default=0.05, metadata={"help": "EMA teacher update rate."})
    teacher_sync_steps: int = field(default=1, metadata={"help": "Steps between EMA teacher updates."})
    max_consecutive_skipped_steps: int = field(
        default=5, metadata={"help": "Stop training after this many non-finite (skipped) steps in a row."}
    )
    log_term_grad_norms: bool = field(
        default=False, metadata={"help": "Log each loss term's gradient norm at the final hidden states."}
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
    max_teacher_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Longest teacher prompt in tokens; None = max_position_embeddings - max_completion_length."},
    )
    teacher_context_truncation_side: str = field(
        default="left",
        metadata={"help": "Which end of a too-long privileged context is cut.", "choices": ["left", "right"]},
    )
    kl_estimator: str = field(
        default="urkl", metadata={"help": "Anchor surrogate: k3, urkl, ufkl, rkl or fkl.", "choices": KL_ESTIMATORS}
    )
    # Paper defaults for fields GRPOConfig already has.
    beta: float = field(default=1e-3, metadata={"help": "alpha: coefficient of the reference anchor."})
    dual_clip: float | None = field(default=3.0, metadata={"help": "Dual-clip constant c for negative advantages."})
    anchor_ratio_weighted: bool = field(
        default=True, metadata={"help": "Weigh the anchor by the detached ratio off-policy (SPEC 2.4)."}
    )
    use_bias_correction_kl: bool = field(
        default=False, metadata={"help": "Weigh the anchor by the importance ratio, with its gradient (GRPO's)."}
    )

    @property
    def generation_cycle_steps(self) -> int:
        """Optimizer steps from one generation to the next one that starts exactly at an optimizer step.

        GRPOTrainer generates every `steps_per_generation * num_iterations` micro-batches and takes an optimizer step
        every `gradient_accumulation_steps`; only where both line up can a checkpoint be resumed exactly.
        """
        micro_batches = self.steps_per_generation * self.num_iterations
        return micro_batches // math.gcd(micro_batches, self.gradient_accumulation_steps)

    @property
    def needs_teacher(self) -> bool:
        """Whether the method scores the teacher view at all (and so needs the privileged context)."""
        return self.distill_coef > 0 or self.rlsd_coef > 0

    def _apply_method_preset(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"SDPGConfig.method must be one of {sorted(METHODS)}, got {self.method!r}.")
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        for name, value in METHODS[self.method].items():
            if getattr(self, name) == defaults[name]:
                setattr(self, name, value)

    def _check_outcome_options(self) -> None:
        """GRPO's options for the outcome term: each is supported, unless it conflicts with SDPG's own terms."""
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"SDPGConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                "SDPGConfig.importance_sampling_level must be 'token' or 'sequence', "
                f"got {self.importance_sampling_level!r}."
            )
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"SDPGConfig.top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}.")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"SDPGConfig.dual_clip (c) must be > 1, got {self.dual_clip}.")
        if self.dual_clip is not None and self.loss_type not in CLIPPED_LOSS_TYPES:
            raise ValueError(
                f"SDPGConfig.dual_clip must be None with loss_type={self.loss_type!r}: the dual clip floors PPO's "
                f"clipped ratio (loss types {CLIPPED_LOSS_TYPES}), which {self.loss_type} replaces with its own bound."
            )
        if self.use_bias_correction_kl and self.anchor_ratio_weighted:
            raise ValueError(
                "SDPGConfig.use_bias_correction_kl and anchor_ratio_weighted both weigh the anchor by the importance "
                "ratio (GRPO's with its gradient, SPEC 2.4's detached); applying both would weigh it twice. Set "
                "anchor_ratio_weighted=False to use GRPO's bias-corrected KL."
            )
        for name in ("entropy_coef", "use_adaptive_entropy"):
            if getattr(self, name):
                raise ValueError(
                    f"SDPGConfig.{name} must stay off: GRPO's entropy bonus is not implemented (SDPG's LM-head "
                    "kernels return the entropy without its gradient, and the adaptive controller is GRPOTrainer's "
                    "own state)."
                )

    def __post_init__(self):
        self._apply_method_preset()
        for f in dataclasses.fields(self):  # nan/inf anywhere would silently poison the loss or its schedule
            value = getattr(self, f.name)
            values = value if isinstance(value, (list, tuple)) else [value]  # e.g. reward_weights
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"SDPGConfig.{f.name} must hold finite numbers only, got {value}.")
        super().__post_init__()
        cycle = self.generation_cycle_steps
        if self.save_strategy == "steps" and self.save_steps >= 1 and self.save_steps % cycle:
            raise ValueError(
                f"SDPGConfig.save_steps ({self.save_steps}) must be a multiple of the generation cycle, {cycle} "
                f"optimizer steps (steps_per_generation={self.steps_per_generation} x num_iterations="
                f"{self.num_iterations} micro-batches, gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}): resuming from a checkpoint inside a cycle would generate again "
                "mid-cycle and replay prompts, so such checkpoints are not written."
            )
        for name in ("distill_coef", "beta", "outcome_coef", "rlsd_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"SDPGConfig.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("distill_warmup_steps", "distill_decay_steps", "rlsd_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"SDPGConfig.{name} must be >= 0 steps, got {getattr(self, name)}.")
        if not 0.0 <= self.rlsd_clip < 1.0:
            raise ValueError(f"SDPGConfig.rlsd_clip (eps_w) must be in [0, 1), got {self.rlsd_clip}.")
        if self.teacher_model_kind not in TEACHER_MODEL_KINDS:
            raise ValueError(
                f"SDPGConfig.teacher_model_kind must be one of {TEACHER_MODEL_KINDS}, got {self.teacher_model_kind!r}."
            )
        if not 0.0 < self.teacher_update_rate <= 1.0:
            raise ValueError(f"SDPGConfig.teacher_update_rate must be in (0, 1], got {self.teacher_update_rate}.")
        if self.teacher_sync_steps < 1:
            raise ValueError(f"SDPGConfig.teacher_sync_steps must be >= 1, got {self.teacher_sync_steps}.")
        if self.outcome_coef == 0.0 and self.distill_coef == 0.0:
            raise ValueError("SDPGConfig.outcome_coef and distill_coef are both 0: the loss would train nothing.")
        if self.max_consecutive_skipped_steps < 1:
            raise ValueError(
                f"SDPGConfig.max_consecutive_skipped_steps must be >= 1, got {self.max_consecutive_skipped_steps}."
            )
        if self.distill_chunk_size < 1:
            raise ValueError(f"SDPGConfig.distill_chunk_size must be >= 1, got {self.distill_chunk_size}.")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"SDPGConfig.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}.")
        self._check_outcome_options()
        if self.max_teacher_prompt_length is not None and self.max_teacher_prompt_length < 1:
            raise ValueError(
                f"SDPGConfig.max_teacher_prompt_length must be >= 1 or None, got {self.max_teacher_prompt_length}."
            )
        if self.teacher_context_truncation_side not in ("left", "right"):
            raise ValueError(
                "SDPGConfig.teacher_context_truncation_side must be 'left' or 'right', "
                f"got {self.teacher_context_truncation_side!r}."
            )
        if not self.context_column:
            raise ValueError("SDPGConfig.context_column must name a dataset column.")
        self.teacher_template = resolve_teacher_template(self.teacher_template)
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
