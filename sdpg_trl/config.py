"""`SDPGConfig`: GRPO's configuration plus the fields SDPG adds (SPEC sections 2.2-2.4)."""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import logging
import math
import numbers
import os
import re
import string
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.integrations import integration_utils
from trl import GRPOConfig

from .head_kernels import TOKEN_CHUNK
from .losses import ANCHOR_ESTIMATORS, LOSS_TYPES, LossTerms, clipped_loss_types, loss_terms
from .teachers import TEACHER_KINDS

logger = logging.getLogger(__name__)

# The registries themselves (`losses.py`), so that an estimator or loss type registered later is allowed too.
KL_ESTIMATORS = ANCHOR_ESTIMATORS
TEACHER_MODEL_KINDS = TEACHER_KINDS  # `teachers.py`'s registry: TRL SDPOTrainer's names, and any registered later

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


@dataclass(frozen=True)
class MethodPreset:
    """The settings of one method (SPEC 3). `defines`: the values that make the method; an explicit other value is
    refused. `fills`: the method's defaults; an explicit value wins. `positive`: fields the method needs above 0."""

    defines: Mapping[str, Any]
    fills: Mapping[str, Any] = field(default_factory=dict)
    positive: tuple[str, ...] = ()


_GRPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.default is not dataclasses.MISSING}

# Methods as presets (SPEC 3); the `SDPGConfig` docstring says which field each one defines or fills, and why.
METHODS: dict[str, MethodPreset] = {
    # The paper's SDPG with its two anchors (SPEC 2); the defaults are SDPG-URKL.
    "sdpg_urkl": MethodPreset(defines={"kl_estimator": "urkl"}),
    "sdpg_ufkl": MethodPreset(defines={"kl_estimator": "ufkl"}),
    # The paper's ablations: no distillation (beta = 0) and no anchor (alpha = 0).
    "sdpg_no_distill": MethodPreset(defines={"distill_coef": 0.0}),
    "sdpg_no_anchor": MethodPreset(defines={"beta": 0.0}),
    # TRL's GRPO: no teacher, no SDPG term or option, TRL's k3 anchor, and GRPOConfig's own defaults where SDPG's
    # differ, so that `method: grpo` is what `trl grpo` runs.
    "grpo": MethodPreset(
        defines={
            "distill_coef": 0.0,
            "rlsd_coef": 0.0,
            "outcome_coef": 1.0,
            "kl_estimator": "k3",
            "dual_clip": None,
            "anchor_ratio_weighted": False,
        },
        fills={
            **{name: _GRPO_DEFAULTS[name] for name in ("beta", "use_bias_correction_kl")},
            "on_policy_surrogate": "ratio",
        },
    ),
    # RLSD: the teacher only reweights the token advantages; no distillation term; no reference model by default.
    "rlsd": MethodPreset(
        defines={"distill_coef": 0.0},
        fills={"rlsd_coef": 0.5, "rlsd_decay_steps": 50, "rlsd_clip": 0.2, "beta": 0.0},
        positive=("rlsd_coef",),
    ),
    # OPCD / pure on-policy self-distillation: no outcome term; by default the KL on every rollout at a constant
    # weight, no gate, no anchor.
    "opcd": MethodPreset(
        defines={"outcome_coef": 0.0},
        fills={
            "distill_coef": 1.0,
            "distill_positive_only": False,
            "distill_warmup_steps": 0,
            "distill_decay_steps": 0,
            "beta": 0.0,
        },
    ),
}

# The names of the fields set explicitly, while `SDPGParser` builds an `SDPGConfig` (None otherwise: then they are the
# constructor's keyword arguments).
_PARSED_EXPLICIT_FIELDS: ContextVar[frozenset[str] | None] = ContextVar("sdpg_parsed_explicit_fields", default=None)


@contextmanager
def explicit_fields_while_parsing(names: set[str] | frozenset[str]) -> Iterator[None]:
    """Within this context, an `SDPGConfig` built from every field (as `HfArgumentParser` builds it) takes `names`
    as the fields the user set, for its method preset."""
    token = _PARSED_EXPLICIT_FIELDS.set(frozenset(names))
    try:
        yield
    finally:
        _PARSED_EXPLICIT_FIELDS.reset(token)


def real_value(value: Any) -> float | None:
    """`value` as a float when it is one real number (Python's, numpy's, a 0-d tensor or array; not a bool), else
    None."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 0:
            return None
        value = value.item()  # a Python bool, int, float or complex
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _plain(value: Any) -> Any:
    """`value` with numpy and torch numbers, arrays and tensors (also inside lists) as Python's; `value` itself when it
    has none."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        items = [_plain(item) for item in value]
        return type(value)(items) if any(a is not b for a, b in zip(items, value)) else value
    return value


def _type_check(kind: Any) -> Callable[[Any], bool] | None:
    """A test that a value is of the annotated type `kind`, for plain data (numbers, text, lists, dicts, enums);
    None for a type it does not know, which is then not checked."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is type(None):
        return lambda v: v is None
    if kind is bool:
        return lambda v: isinstance(v, (bool, np.bool_))
    if kind is int:
        return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
    if kind is float:
        return lambda v: real_value(v) is not None
    if kind is str:
        return lambda v: isinstance(v, str)
    if kind is dict or origin is dict:
        return lambda v: isinstance(v, dict)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return lambda v: isinstance(v, kind)
    if origin is typing.Literal:
        return lambda v: v in args
    if origin is list:
        item = _type_check(args[0]) if args else (lambda v: True)
        sequence = (list, tuple, np.ndarray, torch.Tensor)  # an array or tensor of one dimension, e.g. reward_weights
        return (
            None
            if item is None
            else lambda v: isinstance(v, sequence) and getattr(v, "ndim", 1) == 1 and all(item(x) for x in v)
        )
    if origin in (typing.Union, types.UnionType):
        checks = [_type_check(arg) for arg in args]
        return None if None in checks else lambda v: any(check(v) for check in checks)
    return None


_NUMBERS = {int, float, bool, type(None)}  # the annotations of the numeric fields `_check_types` checks everywhere


def _type_name(kind: Any) -> str:
    """How an error names the annotated type `kind` ("float", "int or None", "list of str", ...)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in args)
    return "None" if kind is type(None) else getattr(origin or kind, "__name__", str(kind))


# `report_to` integrations (transformers' `INTEGRATION_TO_CALLBACK`): how transformers tells that each is installed,
# and the package that installs it.
_REPORTERS: dict[str, tuple[Callable[[], bool], str]] = {
    "azure_ml": (integration_utils.is_azureml_available, "azureml-core"),
    "clearml": (integration_utils.is_clearml_available, "clearml"),
    "codecarbon": (integration_utils.is_codecarbon_available, "codecarbon"),
    "comet_ml": (integration_utils.is_comet_available, "comet-ml"),
    "dagshub": (integration_utils.is_dagshub_available, "dagshub"),
    "dvclive": (integration_utils.is_dvclive_available, "dvclive"),
    "flyte": (integration_utils.is_flytekit_available, "flytekit"),
    "kubeflow": (integration_utils.is_kubeflow_available, "kubeflow"),
    "mlflow": (integration_utils.is_mlflow_available, "mlflow"),
    "neptune": (integration_utils.is_neptune_available, "neptune"),
    "swanlab": (integration_utils.is_swanlab_available, "swanlab"),
    "tensorboard": (integration_utils.is_tensorboard_available, "tensorboard"),
    "trackio": (integration_utils.is_trackio_available, "trackio"),
    "wandb": (integration_utils.is_wandb_available, "wandb"),
}


def is_installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def docstring_entries(doc: str) -> dict[str, str]:
    """The `name (type, ...):` entries of the `Parameters:` section of a TRL-style docstring, each entry's text as
    one line (the field's `help`)."""
    entries: dict[str, list[str]] = {}
    name, indent = None, 0
    for line in doc.split("Parameters:", 1)[1].splitlines():
        header = re.fullmatch(r"( *)(\w+) \(.+\):", line)
        if header:
            name, indent = header[2], len(header[1])
            entries[name] = []
        elif name and line.strip() and len(line) - len(line.lstrip()) > indent:
            entries[name].append(line.strip())
        else:
            name = None
    return {name: " ".join(lines) for name, lines in entries.items()}


def _help_from_docstring(cls: type) -> type:
    """Give each field declared in the body of dataclass `cls` its docstring entry as `help`, so that `--help` and
    the documentation say the same thing."""
    entries = docstring_entries(cls.__doc__)
    declared = cls.__dict__["__annotations__"]
    undocumented = sorted(set(declared) - set(entries))
    if undocumented:
        raise TypeError(f"{cls.__name__} declares fields its docstring does not document: {undocumented}.")
    for name in declared:
        f = cls.__dataclass_fields__[name]
        f.metadata = types.MappingProxyType({**f.metadata, "help": entries[name]})
    return cls


def template_fields(template: str) -> set[str]:
    """Names of the `{placeholders}` in a `str.format` template (escaped `{{` `}}` are not fields)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


@_help_from_docstring
@dataclass
class SDPGConfig(GRPOConfig):
    r"""
    Configuration for [`SDPGTrainer`]: every [`trl.GRPOConfig`] field, plus the SDPG ones below.

    SDPG minimises `L_out + beta(k) * L_OPD+ + alpha * L_K` (SPEC 2). Paper symbols map to fields as follows:
    `beta_base` -> `distill_coef`, `T_warm` -> `distill_warmup_steps`, `T_decay` -> `distill_decay_steps`,
    `m_i` -> `distill_positive_only`, `alpha` -> TRL's `beta`, `L_K` -> `kl_estimator`, `c` -> `context_column`.
    Defaults follow the paper's Qwen3 runs (SPEC 4). Schedules count optimiser steps from 0 (the reference code counts
    from 1): with warmup, the first update has `beta(0) = 0` and skips the teacher pass.

    Values are checked when the config is built, each error naming the field: the type (SDPG's fields and every
    numeric field; numpy and torch numbers count as Python's), finite numbers only (also in lists), each field's
    range, and the method preset. What the run needs installed (`missing_packages`: `report_to` trackers, vLLM,
    DeepSpeed, Liger) is checked by `SDPGTrainer` before it loads the model.

    Parameters:
        > Method (SPEC 3)

        A method is a preset over the fields below. Each preset *defines* some fields (what makes the method; a
        recipe, flag or keyword argument that sets one of them to another value is refused, naming both) and *fills*
        others with the method's defaults (a value set explicitly wins). Every other field keeps its own default.
        When `method` is not given, the default method's settings are plain defaults, so any field may be set (e.g.
        `kl_estimator: rkl` trains SDPG with that anchor). `METHODS` holds the presets:

        - `sdpg_urkl` defines `kl_estimator="urkl"`, `sdpg_ufkl` defines `kl_estimator="ufkl"`; all else is SDPG's.
        - `sdpg_no_distill` defines `distill_coef=0`; `sdpg_no_anchor` defines `beta=0`.
        - `grpo` (TRL's GRPO) defines `distill_coef=0`, `rlsd_coef=0`, `outcome_coef=1`, `kl_estimator="k3"`,
          `dual_clip=None` and `anchor_ratio_weighted=False`, and fills GRPOConfig's defaults where SDPG's differ
          (`beta=0`, `use_bias_correction_kl=True`): `SDPGConfig(method="grpo")` is `GRPOConfig()` on every field
          they share.
        - `rlsd` defines `distill_coef=0` and needs `rlsd_coef > 0`; it fills `rlsd_coef=0.5`, `rlsd_decay_steps=50`,
          `rlsd_clip=0.2` and `beta=0` (the reference code's settings).
        - `opcd` defines `outcome_coef=0`; it fills `distill_coef=1`, `distill_positive_only=False`,
          `distill_warmup_steps=0`, `distill_decay_steps=0` and `beta=0`.

        The fields set explicitly are the keyword arguments given to the constructor, or, through `SDPGParser`
        (`sdpg-train`), the keys of the `--config` YAML and the flags on the command line (`explicit_fields`).

        method (`str`, *optional*, defaults to `"sdpg_urkl"`):
            The method, a preset (`METHODS`) that defines some fields and fills others: `"sdpg_urkl"`, `"sdpg_ufkl"`,
            `"sdpg_no_distill"` (beta = 0), `"sdpg_no_anchor"` (alpha = 0), `"grpo"` (TRL's GRPO), `"rlsd"` or
            `"opcd"`. A field set explicitly keeps its value; one that contradicts what defines the method is refused.
        outcome_coef (`float`, *optional*, defaults to `1.0`):
            Weight of the outcome term `L_out`. `0.0` switches it off (pure self-distillation, OPCD).

        > SDPG: dense self-distillation (SPEC 2.2, 2.3)

        distill_coef (`float`, *optional*, defaults to `1e-3`):
            Peak weight `beta_base` of the full-vocabulary reverse KL from the student to the detached privileged
            teacher. `0.0` turns the distillation off (and skips the teacher pass), leaving GRPO with an anchor.
        distill_warmup_steps (`int`, *optional*, defaults to `50`):
            `T_warm`: optimiser steps over which `beta(k)` ramps linearly from 0 to `distill_coef`. `0` = no warmup.
            `beta(k)` reaches `distill_coef` only in a run of at least `distill_warmup_steps + distill_decay_steps`
            optimiser steps (400 by default); a shorter run warns when training starts, with the peak it reaches.
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
        distill_chunk_size (`int`, *optional*, defaults to `512`):
            Tokens per block of vocabulary tiles in the LM-head pass (log-probs, entropies and the full-vocabulary
            KL). Its transient memory is `distill_chunk_size x 32768` logits in 2 compute-dtype and 3 fp32 tiles
            (`head_kernels.chunk_transient_bytes`), whatever the vocabulary size; the default is the largest power
            of two within the tile of GRPO's own LM head (256 MiB, docs/PERFORMANCE.md).

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
            student's own sequence limit, `vllm_max_model_length` when vLLM generates (room for the student's
            longest prompt plus a context as long as `max_completion_length`), at most the model's
            `max_position_embeddings` minus `max_completion_length`, so that the teacher prompt and the completion
            fit the positions the model has (`teacher.default_teacher_prompt_length`; no cap for a model config
            without `max_position_embeddings` and no vLLM limit).
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
            sampled tokens: an estimator registered in `sdpg_trl.losses.ANCHOR_ESTIMATORS` (the choices `--help`
            lists; docs/ALGORITHM.md gives each one's formula). `"urkl"` is the reference code's default, `"k3"`
            TRL's.
        beta (`float`, *optional*, defaults to `1e-3`; GRPOConfig: `0.0`):
            The anchor coefficient `alpha` (TRL's name, kept so GRPO recipes keep their meaning). `0.0` skips the
            reference model entirely. The `"grpo"` method fills GRPOConfig's `0.0`.
        anchor_ratio_weighted (`bool`, *optional*, defaults to `True`):
            Off-policy, weigh the anchor by the detached ratio `rho` (SPEC 2.4). GRPO does not (the `"grpo"` preset).
        use_bias_correction_kl (`bool`, *optional*, defaults to `False`; GRPOConfig: `True`):
            GRPO's bias-corrected KL (DeepSeek-V3.2): the anchor times the importance ratio at
            `importance_sampling_level`, with its gradient, so it changes the gradient even on-policy. Off by default,
            as SPEC 2.4 weighs the anchor by the detached ratio instead (`anchor_ratio_weighted`); turning it on needs
            `anchor_ratio_weighted=False`, since both would weigh the anchor by the ratio: left unset, it is turned off
            with a warning (set both explicitly and the contradiction is refused). The `"grpo"` method fills
            GRPOConfig's `True`.

        > The outcome term: GRPO's options (SPEC 2.1)

        The outcome term is GRPO's policy loss, with every option GRPOTrainer has for it, under GRPOConfig's names and
        meanings: `loss_type`, `importance_sampling_level`, `epsilon`, `epsilon_high`, `delta`, `sapo_temperature_*`,
        `vespo_*`, `top_entropy_quantile` and `off_policy_mask_threshold` (the last two filter the outcome term only,
        as in GRPO). vLLM's `importance_sampling_ratio` corrects it as in GRPO. With the teacher off (the `"grpo"`
        preset, or `distill_coef=0` with the same settings) SDPGTrainer's loss and gradient are GRPOTrainer's.

        loss_type (`str`, *optional*, defaults to `"dapo"`, as GRPOConfig):
            A loss type registered in `sdpg_trl.losses.LOSS_TYPES` (GRPO's, the choices `--help` lists;
            docs/ALGORITHM.md gives each one's surrogate and aggregation): GRPO's surrogate and aggregation of the
            outcome term and the anchor (GRPO's per-token loss is its policy term plus its KL term). The
            distillation term is always summed over tokens and divided by the number of completion tokens `N` (SPEC
            2, DAPO-style), whatever the loss type; with `"dapo"` every term is over `N`, as in SPEC 2.
            On-policy the outcome is the REINFORCE surrogate `-A log pi` (SPEC 2.1), which has the gradient of the
            clipped and soft surrogates at ratio 1 (cispo and vespo keep their form with ratio 1); see
            `on_policy_surrogate`.
        on_policy_surrogate (`str`, *optional*, defaults to `"reinforce"`):
            The outcome term on-policy (no old log-probs): `"reinforce"`, SPEC 2.1's `-A log pi`, or `"ratio"`,
            GRPOTrainer's `loss_type` surrogate at the ratio `pi / SG[pi] = 1` (for the clipped types its value is
            `-A`). Both have the same gradient; the logged `loss` differs. The `"grpo"` preset fills `"ratio"`, so
            that a `method: grpo` run logs what `trl grpo` logs.
        dual_clip (`float` or `None`, *optional*, defaults to `3.0`):
            Dual-clip constant `c` for negative advantages in the off-policy surrogate (SPEC 2.1; Ye et al., 2020).
            Only used when old log-probs differ from the current ones (`num_iterations > 1`, stale batches, vLLM).
            `None` turns it off (GRPO). It floors PPO's clipped ratio, so it must be `None` for `"cispo"`, `"sapo"`
            and `"vespo"`, which bound the ratio their own way: left unset, it becomes `None` there with a warning
            (set explicitly, it is refused). TRL's `delta` keeps its own meaning (the two-sided
            upper clip, default off).

    SDPG's terms stay SDPG's whatever the outcome options: off-policy the distillation term (and the anchor, with
    `anchor_ratio_weighted`) is weighted by the detached per-token ratio `rho` (SPEC 2.2, 2.4), also with
    `importance_sampling_level="sequence"`, and neither is masked by `top_entropy_quantile` or
    `off_policy_mask_threshold`. GRPO's entropy bonus (`entropy_coef`, `use_adaptive_entropy` and its controller's
    `entropy_target`, `entropy_coef_min/max/delta`) is GRPOTrainer's: `loss - coef * H`, with `H` the mean entropy of
    the tokens the outcome term trains (after `top_entropy_quantile`), the entropy's gradient computed by SDPG's
    LM-head pass (`sdpg_trl.head_kernels`), and the adaptive coefficient saved in checkpoints as GRPOTrainer saves
    it. `use_liger_kernel` does what it does in
    GRPOTrainer: Liger's layer kernels (RMSNorm, RoPE, SwiGLU) on the policy; its fused linear cross-entropy, which
    would replace the LM-head pass SDPG computes itself, is refused by GRPOTrainer.
    """

    # Every field's `help` (what `--help` prints) is its entry in the docstring above (`_help_from_docstring`).

    # Method (SPEC 3)
    method: str = field(default="sdpg_urkl", metadata={"choices": METHODS})  # the registry: a preset added later too
    outcome_coef: float = 1.0

    # SDPG: dense self-distillation (SPEC 2.2, 2.3)
    distill_coef: float = 1e-3
    distill_warmup_steps: int = 50
    distill_decay_steps: int = 350
    distill_positive_only: bool = True
    distill_exclude_eos: bool = False
    distill_teacher_confident_only: bool = False
    distill_chunk_size: int = TOKEN_CHUNK

    # RLSD (SPEC 3)
    rlsd_coef: float = 0.0
    rlsd_decay_steps: int = 50
    rlsd_clip: float = 0.2

    # The teacher's weights
    teacher_model_kind: str = field(default="live", metadata={"choices": TEACHER_MODEL_KINDS})
    teacher_update_rate: float = 0.05
    teacher_sync_steps: int = 1

    # SDPG: privileged context (SPEC 1)
    context_column: str = "privileged_context"
    teacher_template: str = DEFAULT_TEACHER_TEMPLATE
    max_teacher_prompt_length: int | None = None
    teacher_context_truncation_side: str = field(default="left", metadata={"choices": ["left", "right"]})

    # Non-finite values
    max_consecutive_skipped_steps: int = 5

    # Diagnostics
    log_term_grad_norms: bool = False

    # Reference anchor (SPEC 2.4); `beta` and `use_bias_correction_kl` are GRPOConfig's, with SDPG's defaults
    kl_estimator: str = field(default="urkl", metadata={"choices": KL_ESTIMATORS})
    beta: float = 1e-3
    anchor_ratio_weighted: bool = True
    use_bias_correction_kl: bool = False

    # The outcome term (SPEC 2.1); `loss_type` is GRPOConfig's, with its default
    loss_type: str = field(default="dapo", metadata={"choices": LOSS_TYPES})
    on_policy_surrogate: str = field(default="reinforce", metadata={"choices": ["reinforce", "ratio"]})
    dual_clip: float | None = 3.0

    def __new__(cls, *args: Any, **kwargs: Any) -> SDPGConfig:
        # The dataclass __init__ receives every field from a parser and only the given ones from Python code, so the
        # fields set explicitly are known here, before __post_init__ applies the method preset.
        config = super().__new__(cls)
        given = _PARSED_EXPLICIT_FIELDS.get()
        if given is None:
            positional = [f.name for f in dataclasses.fields(cls) if f.init][: len(args)]
            given = frozenset([*positional, *kwargs])
        config._explicit_fields = given
        return config

    @property
    def explicit_fields(self) -> frozenset[str]:
        """Names of the fields the user set (keyword arguments, or `--config` keys and flags through `SDPGParser`)."""
        return self._explicit_fields

    @property
    def generation_cycle_steps(self) -> int:
        """Optimizer steps from one generation to the next one that starts exactly at an optimizer step.

        GRPOTrainer generates every `steps_per_generation * num_iterations` micro-batches and takes an optimizer step
        every `gradient_accumulation_steps`; only where both line up can a checkpoint be resumed exactly.
        """
        micro_batches = self.steps_per_generation * self.num_iterations
        return micro_batches // math.gcd(micro_batches, self.gradient_accumulation_steps)

    @property
    def method_terms(self) -> LossTerms:
        """The terms the method has at all, from its unscheduled coefficients (a step has those its schedules leave
        on: `step_terms.step_coefficients`)."""
        return loss_terms(
            outcome_coef=self.outcome_coef, distill_coef=self.distill_coef, rlsd_lam=self.rlsd_coef, kl_coef=self.beta
        )

    @property
    def needs_teacher(self) -> bool:
        """Whether the method scores the teacher view at all (and so needs the privileged context)."""
        return self.method_terms.teacher

    @property
    def teacher_context_column(self) -> str | None:
        """The dataset column the method reads the privileged context from: `context_column` when it has a teacher,
        None when it has none (GRPO, `distill_coef=0` without RLSD)."""
        return self.context_column if self.needs_teacher else None

    def _apply_method_preset(self) -> None:
        """Fill the fields of `method`'s preset that the user left unset; refuse a set one that contradicts it."""
        if self.method not in METHODS:
            raise ValueError(f"SDPGConfig.method must be one of {sorted(METHODS)}, got {self.method!r}.")
        preset = METHODS[self.method]
        if "method" in self.explicit_fields:  # with the default method, its settings are plain defaults
            for name, value in preset.defines.items():
                if name in self.explicit_fields and getattr(self, name) != value:
                    raise ValueError(
                        f"SDPGConfig.{name}={getattr(self, name)!r} contradicts method={self.method!r}, which is "
                        f"defined by {name}={value!r}. Remove {name}, or choose the method that has it (see "
                        "SDPGConfig.method)."
                    )
        for name, value in {**preset.defines, **preset.fills}.items():
            if name not in self.explicit_fields:
                setattr(self, name, value)
        for name in preset.positive:
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"SDPGConfig.{name}={getattr(self, name)!r} contradicts method={self.method!r}, which needs "
                    f"{name} > 0 (the preset fills {preset.fills.get(name)!r})."
                )

    def _check_types(self) -> None:
        """Refuse a value of the wrong type (e.g. a list or None for a float, a float for an int), naming the field:
        SDPG's and GRPO's fields, and TrainingArguments' numbers and switches. Numbers, arrays and tensors of numpy or
        torch become Python's numbers and lists (`_plain`)."""
        # GRPOConfig's own fields too (reward_weights, generation_kwargs): a recipe's YAML reaches them unconverted.
        own = {**GRPOConfig.__dict__["__annotations__"], **SDPGConfig.__dict__["__annotations__"]}
        for f in dataclasses.fields(self):
            kind = _FIELD_TYPES[f.name]
            if not f.init or f.name not in own and not set(typing.get_args(kind) or [kind]) <= _NUMBERS:
                continue  # TrainingArguments' richer fields (enums, dicts, ...) are checked by transformers
            accepts = _type_check(kind)
            value = getattr(self, f.name)
            if accepts is None:
                continue
            if accepts(value):
                if kind in (float, int) and not isinstance(value, (int, float)):  # np.float32(0.1), a 0-d tensor
                    setattr(self, f.name, kind(real_value(value)))
                elif _plain(value) is not value:  # checkpoints write the settings as JSON
                    setattr(self, f.name, _plain(value))
                continue
            raise TypeError(
                f"SDPGConfig.{f.name} must be {_type_name(kind)}, got {value!r} of type {type(value).__name__}."
            )

    def _check_finite(self) -> None:
        """nan/inf anywhere (Python, numpy or torch numbers, also inside lists) would silently poison the loss."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim > 0:
                value = value.tolist()
            values = value if isinstance(value, (list, tuple)) else [value]  # e.g. reward_weights
            if any(real_value(v) is not None and not math.isfinite(real_value(v)) for v in values):
                raise ValueError(f"SDPGConfig.{f.name} must hold finite numbers only, got {value}.")

    def missing_packages(self) -> list[str]:
        """What this configuration needs that is not installed: one line per package, naming the field that needs it
        and how to install it. `SDPGTrainer` checks it before loading any model; `check_installed` raises."""
        missing = []
        report_to = self.report_to if isinstance(self.report_to, list) else [self.report_to]
        for name in report_to:
            if name in _REPORTERS and not _REPORTERS[name][0]():
                package = _REPORTERS[name][1]
                missing.append(
                    f"report_to={name!r} needs the {package} package (`pip install {package}`, or report_to none)"
                )
        uses_deepspeed = self.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
        needs = [  # (what needs it, whether this config uses it, the module, how to install it)
            ("use_vllm=True", self.use_vllm, "vllm", 'pip install "sdpg-trl[vllm]"'),
            (
                "DeepSpeed (the deepspeed field or an accelerate config)",
                uses_deepspeed,
                "deepspeed",
                'pip install "sdpg-trl[deepspeed]"',
            ),
            ("use_liger_kernel=True", self.use_liger_kernel, "liger_kernel", "pip install liger-kernel"),
        ]
        for what, used, module, install in needs:
            if used and not is_installed(module):
                missing.append(f"{what} needs the {module} package (`{install}`)")
        return missing

    def check_installed(self) -> None:
        """Raise an ImportError listing `missing_packages`, if any: a run would fail on them after loading the
        model."""
        missing = self.missing_packages()
        if missing:
            raise ImportError("SDPGConfig needs packages that are not installed: " + "; ".join(missing) + ".")

    def _check_outcome_options(self) -> None:
        """GRPO's options for the outcome term: each is supported, unless it conflicts with SDPG's own terms."""
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"SDPGConfig.loss_type must be one of {tuple(LOSS_TYPES)}, got {self.loss_type!r}.")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                "SDPGConfig.importance_sampling_level must be 'token' or 'sequence', "
                f"got {self.importance_sampling_level!r}."
            )
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"SDPGConfig.top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}.")
        # A value SDPG only filled gives way to the option the user chose; two values the user wrote are refused.
        if self.dual_clip is not None and self.loss_type not in clipped_loss_types():
            self._give_way("dual_clip", None, f"loss_type={self.loss_type!r} has no clipped ratio to floor")
        if self.use_bias_correction_kl and self.anchor_ratio_weighted:
            self._give_way("anchor_ratio_weighted", False, "use_bias_correction_kl weighs the anchor by the ratio")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"SDPGConfig.dual_clip (c) must be > 1, got {self.dual_clip}.")
        if self.dual_clip is not None and self.loss_type not in clipped_loss_types():
            raise ValueError(
                f"SDPGConfig.dual_clip must be None with loss_type={self.loss_type!r}: the dual clip floors PPO's "
                f"clipped ratio (loss types {clipped_loss_types()}), which {self.loss_type} replaces with its own "
                "bound."
            )
        if self.use_bias_correction_kl and self.anchor_ratio_weighted:
            raise ValueError(
                "SDPGConfig.use_bias_correction_kl and anchor_ratio_weighted both weigh the anchor by the importance "
                "ratio (GRPO's with its gradient, SPEC 2.4's detached); applying both would weigh it twice. Set "
                "anchor_ratio_weighted=False to use GRPO's bias-corrected KL."
            )
        if self.on_policy_surrogate not in ("reinforce", "ratio"):
            raise ValueError(
                f"SDPGConfig.on_policy_surrogate must be 'reinforce' or 'ratio', got {self.on_policy_surrogate!r}."
            )

    def _give_way(self, name: str, value: Any, why: str) -> None:
        """Set `name`, a field the user did not set, to `value`, and say so; one the user set is left for the check
        that follows to refuse."""
        if name in self.explicit_fields:
            return
        logger.warning(
            "SDPGConfig.%s=%r is set to %r: %s (set %s to silence this).", name, getattr(self, name), value, why, name
        )
        setattr(self, name, value)

    def __post_init__(self):
        self._check_types()
        self._check_finite()
        self._apply_method_preset()
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
                f"SDPGConfig.teacher_model_kind must be one of {tuple(TEACHER_MODEL_KINDS)}, got "
                f"{self.teacher_model_kind!r}."
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
            raise ValueError(
                f"SDPGConfig.kl_estimator must be one of {tuple(KL_ESTIMATORS)}, got {self.kl_estimator!r}."
            )
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
        unused = sorted(self.explicit_fields & set(_TEACHER_FIELDS)) if not self.needs_teacher else []
        if unused:
            logger.warning(
                "SDPGConfig.%s has no effect: method=%r has no teacher here (distill_coef and rlsd_coef are 0).",
                ", ".join(unused),
                self.method,
            )


# The settings of the teacher, which a method without one (no distillation, no RLSD) does not read.
_TEACHER_FIELDS = (
    "teacher_model_kind",
    "teacher_update_rate",
    "teacher_sync_steps",
    "teacher_template",
    "max_teacher_prompt_length",
    "teacher_context_truncation_side",
)
_FIELD_TYPES = typing.get_type_hints(SDPGConfig)  # the annotations resolved, for `_check_types`
