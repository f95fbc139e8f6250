"""`SDPGTrainer`: TRL's GRPOTrainer plus a privileged self-teacher (SPEC 1-2).

GRPOTrainer keeps generation (transformers or vLLM), rewards, advantages, the reference model, PEFT, gradient
accumulation and multi-process training. This class adds two things:
- `_generate_and_score_completions` also tokenises each rollout's teacher prompt (see `teacher.py`);
- `compute_loss` runs the teacher forward (no grad, only for rollouts that will be distilled), the student
  forward, and hands the per-token terms to the pure functions in `losses.py`.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from peft import PeftConfig, PeftModel
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from trl import GRPOTrainer

from . import _trl_compat
from ._trl_compat import (
    create_model_from_path,
    disable_gradient_checkpointing,
    get_config_model_id,
    off_policy_sequence_mask,
    pad,
    prepare_deepspeed,
    prepare_fsdp,
    tokenize_prompts,
    use_adapter,
)
from .config import SDPGConfig
from .guards import StepGuard, reward_fault
from .losses import (
    CLIPPED_LOSS_TYPES,
    Outcome,
    OutcomeOptions,
    anchor_per_token,
    beta_schedule,
    chunked_logps_and_entropy,
    distill_token_weight,
    fused_policy_distillation,
    k3_kl,
    loss_terms,
    outcome_per_token,
    policy_token_weights,
    positive_advantage_gate,
    rlsd_advantages,
    rlsd_lambda,
    sdpg_objective,
)
from .preflight import DEFAULT_ARGS_NEED_CONTEXT, check_model_source, check_train_size
from .teacher import (
    build_teacher_prompt,
    check_dataset,
    check_prompt_column,
    context_token_mask,
    describe_row,
    fit_teacher_prompts,
)

# LM-head output transforms TRL's fused head knows but SDPG's head kernels need passed explicitly; SDPG reads the two
# common ones and refuses the rest rather than distil from wrongly scaled logits.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("output_multiplier", "lm_head_multiplier", "logits_scaling")

logger = logging.getLogger(__name__)

# A reward function as GRPOTrainer takes it: a Hub id or path of a reward model, a model, or a callable.
RewardFunc = str | PreTrainedModel | Callable[..., list[float | None]]


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` in eval mode (dropout off) and restore its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls in hardware (AVX512-BF16 or AMX); elsewhere PyTorch emulates them."""
    # Private probes, read defensively: torch exposes no public query for this.
    probes = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
        getattr(torch.cpu, "_is_amx_tile_supported", None),
    )
    return any(probe is not None and probe() for probe in probes)


def vision_language_signs(processing_class: Any, model_config: Any) -> list[str]:
    """What marks a model as vision-language, for SDPGTrainer to refuse it: an image processor in its processing class,
    a `vision_config` in its model config. Empty for a text-only model."""
    signs = []
    if isinstance(processing_class, ProcessorMixin) and getattr(processing_class, "image_processor", None) is not None:
        signs.append(f"its processing class {type(processing_class).__name__} has an image processor")
    if getattr(model_config, "vision_config", None) is not None:
        signs.append(f"its config {type(model_config).__name__} has a vision_config")
    return signs


class SDPGTrainer(GRPOTrainer):
    """Self-Distilled Policy Gradient trainer: GRPO + gated full-vocabulary self-distillation + a reference anchor.

    Takes the same arguments as [`trl.GRPOTrainer`], with `args` an [`SDPGConfig`]. The training dataset must have
    a `prompt` column and the privileged-context column named by `args.context_column`.
    """

    _tag_names = ["trl", "sdpg"]
    _name = "SDPG"
    # The model card's citation: SDPG's paper, not GRPO's (DeepSeekMath), which GRPOTrainer would otherwise supply.
    _paper = {
        "title": "Self-Distilled Policy Gradient",
        "id": "2606.04036",
        "citation": textwrap.dedent("""\
            @article{liu2026self,
                title        = {{Self-Distilled Policy Gradient}},
                author       = {Yifeng Liu and Shiyuan Zhang and Yifan Zhang and Quanquan Gu},
                year         = 2026,
                eprint       = {arXiv:2606.04036},
            }"""),
    }

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: SDPGConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        peft_config: PeftConfig | None = None,
        **kwargs: Any,
    ):
        """Same arguments as [`trl.GRPOTrainer`]; those not named here (`quantization_config`, `tools`, ...) are passed
        through unchanged. `args` must be an [`SDPGConfig`]; when the method has a teacher, the datasets need the
        privileged-context column `args.context_column`."""
        default_args = args is None
        if default_args:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = SDPGConfig(f"{str(model_name).split('/')[-1]}-SDPG")
        if not isinstance(args, SDPGConfig):
            raise TypeError(f"SDPGTrainer needs args of type SDPGConfig, got {type(args).__name__}.")
        # Everything that can be wrong with the inputs is checked before GRPOTrainer loads a model.
        args.check_installed()
        check_model_source(model, args, peft_config)
        why = DEFAULT_ARGS_NEED_CONTEXT if default_args else None
        check_dataset(train_dataset, "train_dataset", args.teacher_context_column, args.teacher_template, why)
        check_dataset(eval_dataset, "eval_dataset", args.teacher_context_column, args.teacher_template, why)
        check_train_size(train_dataset, args)
        super().__init__(
            model, reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, reward_processing_classes=reward_processing_classes,
            callbacks=callbacks, optimizers=optimizers, peft_config=peft_config, **kwargs,
        )  # fmt: skip
        vision = vision_language_signs(self.processing_class, self._causal_lm(self.model).config)
        if vision:
            teacher = ", and the teacher prompts would be tokenised without their images" if args.needs_teacher else ""
            raise NotImplementedError(
                f"SDPGTrainer is text-only, and this is a vision-language model ({'; '.join(vision)}). Image inputs "
                "are not supported: SDPGTrainer's loss runs the student forward on token ids alone, so GRPO's image "
                f"inputs (pixel_values, image_grid_thw, ...) would be dropped{teacher}. Train vision-language models "
                "with trl.GRPOTrainer."
            )
        self.teacher_model = self._setup_teacher_model()
        # Non-finite steps are skipped (guards.py); DeepSpeed steps inside backward, before any callback could.
        self._reward_fault: str | None = None  # why the current generation batch's rewards are unusable
        self._step_guard = None
        if self.is_deepspeed_enabled:
            logger.warning("SDPG's step guard is off under DeepSpeed: a non-finite step cannot be skipped there.")
        else:
            self._step_guard = StepGuard(self.args.max_consecutive_skipped_steps)
            self.add_callback(self._step_guard)

        text_config = self._causal_lm(self.model).config.get_text_config()
        for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
            if getattr(text_config, name, None) is not None:
                raise NotImplementedError(f"SDPGTrainer does not support models whose config sets {name!r}.")
        self._max_teacher_prompt_length = self._teacher_prompt_cap(text_config)
        self._warned_teacher_prompt_too_long = False
        self._logit_scale = getattr(text_config, "logit_scale", None) or 1.0
        self._final_logit_softcapping = getattr(text_config, "final_logit_softcapping", None)
        if self.args.bf16 and self.accelerator.device.type == "cpu" and not cpu_has_native_bf16():
            # GRPOConfig turns bf16 on by default; emulated bf16 made a SmolLM2-135M step 11x slower (283 s vs 25 s).
            logger.warning(
                "SDPGConfig.bf16 is on, but this CPU has no native bf16: autocast matmuls are emulated and training "
                "runs about 10x slower. Set bf16=False (`--bf16 false`) to train in float32."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Data: the teacher prompt of each rollout, built next to GRPO's student prompt
    # ----------------------------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        # Rows of a streamed dataset are first seen here: check them before generating, and name the bad one.
        where = f"the generation batch at step {self.state.global_step + 1}"
        rows = [describe_row(i, x, where) for i, x in enumerate(inputs)]
        for x, row in zip(inputs, rows):
            check_prompt_column(x, row)
        if self.args.needs_teacher:
            contexts = [x.get(self.args.context_column) for x in inputs]
            teacher_prompts = [
                build_teacher_prompt(x["prompt"], context, self.args.teacher_template, self.args.context_column, row)
                for x, context, row in zip(inputs, contexts, rows)
            ]  # fmt: skip
        output = super()._generate_and_score_completions(inputs)
        if not self.args.needs_teacher:
            return output
        # At most max_teacher_prompt_length tokens: the context is cut, never the problem; a row that cannot fit gets
        # a one-pad placeholder, fully masked, and `teacher_prompt_fits` keeps it away from the teacher.
        teacher_ids, fits, cut = fit_teacher_prompts(
            teacher_prompts, [x["prompt"] for x in inputs], contexts, self.args.teacher_template,
            tokenize=lambda prompts: tokenize_prompts(self, prompts)[0], tokenizer=self._tokenizer,
            max_length=self._max_teacher_prompt_length, side=self.args.teacher_context_truncation_side,
        )  # fmt: skip
        pad_id = self._tokenizer.pad_token_id
        teacher_ids = [torch.tensor(list(ids) or [pad_id], dtype=torch.long) for ids in teacher_ids]
        device = output["prompt_ids"].device
        output["teacher_prompt_ids"] = pad(
            teacher_ids, padding_value=pad_id, padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)  # fmt: skip
        output["teacher_prompt_mask"] = pad(
            [torch.full_like(ids, int(ok)) for ids, ok in zip(teacher_ids, fits)], padding_value=0,
            padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)  # fmt: skip
        output["teacher_prompt_fits"] = torch.tensor(fits, device=device)
        self._log_teacher_prompt_fit(cut, fits)
        # Completion tokens that also occur in the row's privileged context: where the KL could teach guessing.
        output["context_token_mask"] = context_token_mask(output["completion_ids"], contexts, self._tokenizer)
        return output

    def _teacher_prompt_cap(self, text_config) -> int | None:
        """`max_teacher_prompt_length`, or by default the positions the model has left after the completion."""
        if self.args.max_teacher_prompt_length is not None or not self.args.needs_teacher:
            return self.args.max_teacher_prompt_length
        max_positions = getattr(text_config, "max_position_embeddings", None)
        if max_positions is None:
            return None
        cap = max_positions - (self.args.max_completion_length or 0)
        if cap < 1:
            raise ValueError(
                f"SDPGConfig.max_completion_length ({self.args.max_completion_length}) leaves no room for a teacher "
                f"prompt within the model's max_position_embeddings ({max_positions})."
            )
        return cap

    def _log_teacher_prompt_fit(self, cut: list[bool], fits: list[bool]) -> None:
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        counts = self.accelerator.reduce(torch.tensor([sum(cut), len(fits) - sum(fits)], device=device), "sum")
        truncated, too_long = counts.tolist()
        self._metrics[mode]["sdpg/teacher_context_truncated"].append(float(truncated))
        self._metrics[mode]["sdpg/teacher_prompt_too_long"].append(float(too_long))
        if too_long and not self._warned_teacher_prompt_too_long:
            self._warned_teacher_prompt_too_long = True
            logger.warning(
                "%d teacher prompts are longer than max_teacher_prompt_length (%d tokens) even without their "
                "privileged context: those rows are not scored by the teacher (counted in "
                "sdpg/teacher_prompt_too_long).",
                too_long, self._max_teacher_prompt_length,
            )  # fmt: skip

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.model.training:  # gathered over processes, so every process records the same fault
            self._reward_fault = reward_fault(rewards_per_func, self.reward_func_names)
        return rewards_per_func

    # ----------------------------------------------------------------------------------------------------------------
    # Training loop: the step guard sees every micro-batch's loss and rewrites the logged loss; checkpoints
    # ----------------------------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._step_guard is not None:
            self._step_guard.observe(loss, self._reward_fault)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._step_guard is not None:  # training logs only: eval logs carry `eval_loss`, not `loss`
            self._step_guard.rewrite_logs(logs)
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        # A resume restarts GRPOTrainer's generation cycle, so only a checkpoint at a cycle's end resumes exactly.
        cycle = self.args.generation_cycle_steps
        if self.state.global_step % cycle:
            logger.warning(
                "SDPG did not save a checkpoint at step %d: it falls inside a generation cycle of %d optimizer steps "
                "(steps_per_generation x num_iterations), and resuming from it would generate again mid-cycle and "
                "replay prompts. Checkpoints are written at multiples of %d steps.",
                self.state.global_step, cycle, cycle,
            )  # fmt: skip
            return
        super()._save_checkpoint(model, trial)

    # ----------------------------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------------------------
    def distill_coef_at(self, step: int) -> float:
        """beta(k) at optimiser step `step` of this run (SPEC 2.3)."""
        return beta_schedule(
            step, self.state.max_steps, self.args.distill_coef,
            self.args.distill_warmup_steps, self.args.distill_decay_steps,
        )  # fmt: skip

    def rlsd_lambda_at(self, step: int) -> float:
        """RLSD's lam(k) at optimiser step `step` (SPEC 3)."""
        return rlsd_lambda(step, self.args.rlsd_coef, self.args.rlsd_decay_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The SDPGTrainer does not support returning outputs")
        mode = "train" if self.model.training else "eval"
        args = self.args
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        num_completion = completion_ids.size(1)
        advantages = inputs["advantages"]
        distill_coef = self.distill_coef_at(self.state.global_step)
        rlsd_lam = self.rlsd_lambda_at(self.state.global_step)
        terms = loss_terms(outcome_coef=args.outcome_coef, distill_coef=distill_coef, rlsd_lam=rlsd_lam,
                           kl_coef=self.beta)  # fmt: skip
        gate = positive_advantage_gate(advantages, args.distill_positive_only)

        # Teacher first, under no_grad, only on the rows a term needs: the distilled rows (the gate) and, for RLSD,
        # every row whose advantage is not 0 (A_hat is 0 where A is).
        fits = inputs.get("teacher_prompt_fits", True)  # rows whose teacher prompt fits max_teacher_prompt_length
        distill_rows = gate.bool() & terms.distill & fits
        teacher_rows = distill_rows | ((advantages != 0) & terms.rlsd & fits)
        rows = teacher_rows.nonzero().squeeze(1)
        teacher_hidden = None
        forward_rows = self._teacher_forward_rows(rows, terms.teacher)
        if forward_rows.numel() > 0:
            teacher_hidden, teacher_weight, teacher_bias = self._teacher_hidden(model, inputs, forward_rows)
        # Position of each rollout among the teacher's rows (-1: not scored by the teacher).
        teacher_index = torch.full_like(advantages, -1, dtype=torch.long)
        teacher_index[rows] = torch.arange(rows.numel(), device=rows.device)

        # Student: one forward for its hidden states (one logit row, like the teacher). The LM head then runs once
        # per token: TRL's chunked log-prob kernel on the tokens that are not distilled, and on the distilled ones
        # the fused pass that takes the log-prob, the entropy and the KL from one projection of each view.
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self._capture_hidden(model) as student_hidden, self.accelerator.autocast():
            outputs = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1, **router
            )
        aux_loss = outputs.aux_loss if self.aux_loss_enabled else None
        hidden = self._completion_hidden(student_hidden, num_completion)
        weight, bias = self._lm_head_params(model)
        head = dict(temperature=self.temperature, logit_scale=self._logit_scale,
                    final_logit_softcapping=self._final_logit_softcapping)  # fmt: skip

        valid = mask.bool()
        distilled = valid & distill_rows.unsqueeze(1)
        # Zeros attached to the graph, so a batch with no valid token still backpropagates (as TRL's fused head does).
        per_token_logps = hidden[..., 0].float() * 0.0
        entropies, opd, teacher_logps, teacher_entropies = (torch.zeros_like(per_token_logps) for _ in range(4))
        # The head kernels run as TRL's fused head does inside GRPO's forward: under the accelerator's autocast, so
        # that mixed precision projects bf16/fp16 tiles (into fp32 logits), or in fp32 with `cast_lm_head_to_fp32`.
        # Outside the forward's autocast they would always project in the hidden states' dtype, fp32 by default.
        if args.cast_lm_head_to_fp32:
            hidden = hidden.float()
            teacher_hidden = None if teacher_hidden is None else teacher_hidden.float()
        with nullcontext() if args.cast_lm_head_to_fp32 else self.accelerator.autocast():
            if (valid & ~distilled).any():
                where = (valid & ~distilled).nonzero(as_tuple=True)
                logps, entropy = chunked_logps_and_entropy(hidden[where], weight, bias, completion_ids[where], **head)
                per_token_logps = per_token_logps.index_put(where, logps)
                entropies = entropies.index_put(where, entropy)
            if distilled.any():
                where = distilled.nonzero(as_tuple=True)
                logps, entropy, kl, t_logps, t_entropy = fused_policy_distillation(
                    hidden[where], teacher_hidden[teacher_index[where[0]], where[1]], weight, bias,
                    completion_ids[where], teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                    chunk_size=args.distill_chunk_size, **head,
                )  # fmt: skip
                per_token_logps = per_token_logps.index_put(where, logps)
                entropies = entropies.index_put(where, entropy)
                opd = opd.index_put(where, kl)
                teacher_logps = teacher_logps.index_put(where, t_logps)
                teacher_entropies = teacher_entropies.index_put(where, t_entropy)
            rlsd_only = valid & teacher_rows.unsqueeze(1) & ~distilled
            if terms.rlsd and rlsd_only.any():  # RLSD needs the teacher's sampled-token log-prob, not its KL
                where = rlsd_only.nonzero(as_tuple=True)
                with torch.no_grad():
                    t_logps, t_entropy = chunked_logps_and_entropy(
                        teacher_hidden[teacher_index[where[0]], where[1]], teacher_weight, teacher_bias,
                        completion_ids[where], **head,
                    )  # fmt: skip
                teacher_logps = teacher_logps.index_put(where, t_logps)
                teacher_entropies = teacher_entropies.index_put(where, t_entropy)

        old_per_token_logps = inputs.get("old_per_token_logps")
        token_advantages = advantages
        if terms.rlsd:
            sampler_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
            token_advantages = rlsd_advantages(advantages, teacher_logps, sampler_logps, lam=rlsd_lam,
                                               clip=args.rlsd_clip, scored=teacher_rows)  # fmt: skip
        # GRPO's policy loss for its loss_type; vLLM's `importance_sampling_ratio` corrects the sampler mismatch.
        options = OutcomeOptions.from_config(args)
        policy = outcome_per_token(
            per_token_logps, token_advantages, old_per_token_logps, mask=mask, options=options,
            sampler_ratio=inputs.get("importance_sampling_ratio"),
        )  # fmt: skip
        outcome = policy.loss
        # GRPO's filters of its policy term (not of SDPG's terms): DeepSeek-V3.2's off-policy sequence mask, measured
        # against the sampler's log-probs, and the top-entropy-quantile token mask ("Beyond the 80/20 Rule").
        if args.off_policy_mask_threshold is not None:
            old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
            outcome = outcome * off_policy_sequence_mask(
                advantages.unsqueeze(1), per_token_logps, inputs.get("sampling_per_token_logps", old), mask,
                args.off_policy_mask_threshold,
            )  # fmt: skip
        if args.top_entropy_quantile < 1.0:
            outcome = outcome * self.get_high_entropy_mask(entropies.detach(), mask, 1 - args.top_entropy_quantile)
        anchor = None
        if terms.anchor:
            anchor = anchor_per_token(per_token_logps, inputs["ref_per_token_logps"], args.kl_estimator)
            if args.use_bias_correction_kl:  # DeepSeek-V3.2: times the importance ratio, with its gradient
                anchor = anchor * policy.ratio
        distill_weight = distill_token_weight(
            mask, gate * distill_rows, completion_ids=completion_ids,
            eos_token_ids=self.eos_token_ids if args.distill_exclude_eos else None,
            student_entropy=entropies if args.distill_teacher_confident_only else None,
            teacher_entropy=teacher_entropies if args.distill_teacher_confident_only else None,
        )  # fmt: skip

        # SPEC 2's N as GRPOTrainer's DAPO computes it: `num_items_in_batch` spans the generation batch on all
        # processes. The distillation term is over N; the outcome and the anchor are aggregated by loss_type.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / args.steps_per_generation
        policy_weights = policy_token_weights(
            mask, args.loss_type, token_normalizer=normalizer, max_completion_length=args.max_completion_length,
            accumulation_steps=self.current_gradient_accumulation_steps if mode == "train" else 1.0,
        )  # fmt: skip
        objective = dict(mask=mask, distill_weight=distill_weight, rho=policy.rho, normalizer=normalizer,
                         policy_weights=policy_weights)  # fmt: skip
        coefs = dict(outcome_coef=args.outcome_coef, distill_coef=distill_coef, kl_coef=self.beta,
                     anchor_ratio_weighted=args.anchor_ratio_weighted)  # fmt: skip
        outcome = outcome if terms.outcome else None
        opd_term = opd if terms.distill else None
        loss = sdpg_objective(outcome, opd_term, anchor, **objective, **coefs)
        if self.aux_loss_enabled:
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        metrics = self._metrics[mode]
        if args.log_term_grad_norms and torch.is_grad_enabled():
            parts = {
                "outcome": (outcome, None, None),
                "distill": (None, opd_term, None),
                "anchor": (None, None, anchor),
            }
            for name, (o, d, a) in parts.items():
                part = sdpg_objective(o, d, a, **objective, **coefs)
                grad = None
                if part.requires_grad:  # a term this step does not use is a constant 0
                    grad = torch.autograd.grad(part, hidden, retain_graph=True, allow_unused=True)[0]
                norm = torch.zeros((), device=hidden.device) if grad is None else grad.float().square().sum()
                metrics[f"grad_norm/{name}"].append(self.accelerator.reduce(norm, reduction="sum").sqrt().item())

        with torch.no_grad():
            metrics["entropy"].append(self._global_masked_mean(entropies, mask))
            metrics["sdpg/distill_coef"].append(distill_coef)
            metrics["sdpg/gate_ratio"].append(self.accelerator.gather(gate).mean().item())
            if args.distill_coef > 0:  # the distillation metrics (RLSD has a teacher but no KL term)
                metrics["sdpg/opd_kl"].append(self._global_masked_mean(opd, distilled))
                metrics["sdpg/teacher_minus_student_logp"].append(
                    self._global_masked_mean(teacher_logps - per_token_logps, distilled)
                )
                metrics["sdpg/teacher_entropy"].append(self._global_masked_mean(teacher_entropies, distilled))
                metrics["sdpg/student_entropy"].append(self._global_masked_mean(entropies, distilled))
                metrics["sdpg/distilled_token_share"].append(self._global_masked_mean(distill_weight, distilled))
                if "context_token_mask" in inputs:
                    # Leakage: the share of the KL on completion tokens that also occur in the privileged context.
                    on_context = inputs["context_token_mask"] & distilled
                    totals = self.accelerator.reduce(torch.stack([(opd * on_context).sum(), (opd * distilled).sum()]))
                    metrics["sdpg/kl_share_on_context_tokens"].append((totals[0] / totals[1].clamp(min=1e-12)).item())
                    metrics["sdpg/context_token_share"].append(self._global_masked_mean(on_context.float(), distilled))
            if self.args.rlsd_coef > 0:
                scored = valid & teacher_rows.unsqueeze(1)
                metrics["rlsd/lambda"].append(rlsd_lam)
                if terms.rlsd:
                    ratio = token_advantages / advantages.unsqueeze(1).where(advantages.unsqueeze(1) != 0, 1.0)
                    metrics["rlsd/advantage_weight"].append(self._global_masked_mean(ratio, scored))
                    gap = teacher_logps - (per_token_logps if old_per_token_logps is None else old_per_token_logps)
                    metrics["rlsd/teacher_minus_sampler_logp"].append(self._global_masked_mean(gap, scored))
            if anchor is not None:
                metrics["sdpg/anchor"].append(self._global_masked_mean(anchor, mask))
                kl = k3_kl(per_token_logps, inputs["ref_per_token_logps"])
                if args.use_bias_correction_kl:  # GRPOTrainer logs the importance-weighted estimate
                    kl = kl * policy.ratio
                metrics["kl"].append(self._global_masked_mean(kl, mask))
            self._log_ratio_metrics(metrics, policy, options, token_advantages, mask)
        return loss

    def _log_ratio_metrics(
        self, metrics: dict, policy: Outcome, options: OutcomeOptions, advantages: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """GRPOTrainer's importance-ratio metrics for the loss type, under its names, so SDPG runs read like GRPO
        runs: `clip_ratio/*` (PPO's clip), `cispo_clip_ratio`, `vespo/phi_seq_mean` (sapo logs none)."""
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        ratio, loss_type = policy.ratio.detach(), options.loss_type

        def mean(values: torch.Tensor) -> float:  # `(B, 1)`: one value per sequence, averaged over sequences (TRL)
            return self._global_masked_mean(values, torch.ones_like(values) if values.size(1) == 1 else mask)

        if loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(mean(((ratio > options.epsilon_high) & (adv > 0)).float()))
        if loss_type == "vespo":
            metrics["vespo/phi_seq_mean"].append(mean(policy.vespo_weight))
        if loss_type not in CLIPPED_LOSS_TYPES:
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

    # ----------------------------------------------------------------------------------------------------------------
    # The teacher: which weights score the privileged view
    # ----------------------------------------------------------------------------------------------------------------
    def _setup_teacher_model(self) -> torch.nn.Module | None:
        """The model whose weights score the teacher view; None when it is the policy itself.

        - `live` (the paper's SDPG): the policy; no extra memory.
        - `base`: the initial weights. With PEFT, the policy with its adapter switched off; with a reference model
          (alpha > 0, not synced), that model, at no extra memory; otherwise a frozen copy (one more set of weights).
        - `ema`: with pure LoRA, a second adapter kept by TRL's `PEFTAdapterEMACallback`; otherwise a copy of the
          weights that TRL's `SyncTeacherModelCallback` moves toward the policy every `teacher_sync_steps` steps.
        """
        # TRL keeps its EMA teacher callbacks in its experimental package; `_trl_compat` loads them on first use.
        kind = self.args.teacher_model_kind
        if not self.args.needs_teacher or kind == "live":
            return None
        if is_peft_model(self.model):
            if kind == "ema":
                if not _trl_compat.is_pure_lora_training(self.model):
                    raise ValueError("SDPGConfig.teacher_model_kind='ema' with PEFT needs pure LoRA training.")
                self.add_callback(_trl_compat.PEFTAdapterEMACallback(
                    self.model, teacher_adapter_name="sdpg_ema_teacher", update_rate=self.args.teacher_update_rate,
                    sync_steps=self.args.teacher_sync_steps, accelerator=self.accelerator,
                ))  # fmt: skip
            return None
        if kind == "base" and self.ref_model is not None and not self.args.sync_ref_model:
            return self.ref_model
        model_init_kwargs = dict(self.args.model_init_kwargs or {})
        if self.args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            model_init_kwargs["device_map"] = None
        model_init_kwargs.setdefault("dtype", self.model.dtype)
        # Built from the checkpoint like TRL's reference model: under ZeRO-3 a deep copy would clone empty shards.
        teacher = create_model_from_path(get_config_model_id(self.model.config), **model_init_kwargs)
        teacher.requires_grad_(False)
        teacher.eval()
        if self.is_deepspeed_enabled:
            teacher = prepare_deepspeed(teacher, self.accelerator)
        elif self.is_fsdp_enabled:
            teacher = prepare_fsdp(teacher, self.accelerator)
        else:
            teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        if kind == "ema":
            self.add_callback(
                _trl_compat.SyncTeacherModelCallback(teacher_model=teacher, accelerator=self.accelerator)
            )
        return teacher

    def _teacher_adapter(self, model: torch.nn.Module):
        """With PEFT, the adapter the teacher runs with: none (`base`), the EMA one (`ema`), the policy's (`live`)."""
        kind = self.args.teacher_model_kind
        if self.teacher_model is not None or kind == "live" or not is_peft_model(self.accelerator.unwrap_model(model)):
            return nullcontext()
        return use_adapter(self.accelerator.unwrap_model(model), None if kind == "base" else "sdpg_ema_teacher")

    def _teacher_hidden(
        self, model: torch.nn.Module, inputs: dict[str, Any], rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(R, C, H)` teacher hidden states predicting the completion tokens of `rows`, and the teacher's LM head.

        The input is the teacher prompt followed by the student's completion ids unchanged (SPEC 1). Dropout is off
        (eval mode) so the teacher's distribution does not depend on a dropout draw. Positions count from each row's
        first real token, so the teacher prompt's left padding does not shift them (it would for absolute-position
        models such as GPT-2; the student forward keeps GRPOTrainer's, which passes no positions).
        """
        teacher = model if self.teacher_model is None else self.teacher_model
        completion_ids, completion_mask = inputs["completion_ids"][rows], inputs["completion_mask"][rows]
        ids = torch.cat([inputs["teacher_prompt_ids"][rows], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["teacher_prompt_mask"][rows], completion_mask], dim=1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._teacher_adapter(model),
            _eval_mode(teacher),
            self._capture_hidden(teacher) as captured,
            self.accelerator.autocast(),
        ):
            # Only the hidden states are needed: keep one logit row instead of projecting every position.
            teacher(
                input_ids=ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=1,
            )
        weight, bias = self._lm_head_params(teacher)
        return self._completion_hidden(captured, completion_ids.size(1)), weight, bias

    # ----------------------------------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------------------------------
    def _teacher_forward_rows(self, rows: torch.Tensor, needed: bool) -> torch.Tensor:
        """Rows to run the teacher on in this process: `rows`, or one throw-away row.

        Every process must run the same number of forwards (DDP broadcasts buffers, FSDP and ZeRO-3 gather weights
        in each one), so a process with nothing to score while another has something runs the teacher on one row
        and discards it.
        """
        if self.accelerator.num_processes > 1 and needed:
            total = self.accelerator.reduce(rows.new_tensor([rows.numel()]), reduction="sum")
            if rows.numel() == 0 and total.item() > 0:
                return rows.new_zeros(1)
        return rows

    def _causal_lm(self, model: torch.nn.Module) -> torch.nn.Module:
        """The transformers CausalLM inside any accelerate/DDP/PEFT wrapping."""
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped

    def _lm_head_params(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        lm_head = self._causal_lm(model).get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if isinstance(weight, DTensor):  # FSDP2 shards the head; the divergence needs it whole, like TRL's fused head
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        return weight, bias

    @contextmanager
    def _capture_hidden(self, model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
        """Collect the backbone's last hidden state during a forward through the (wrapped) model.

        The forward must go through `model` itself so that DDP/DeepSpeed/FSDP see it; a hook on the backbone hands
        its hidden states to the LM-head kernels, which give log-probs and the KL without a second forward.
        """
        captured: list[torch.Tensor] = []
        backbone = self._causal_lm(model).base_model
        handle = backbone.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
        try:
            yield captured
        finally:
            handle.remove()

    @staticmethod
    def _completion_hidden(captured: list[torch.Tensor], num_completion: int) -> torch.Tensor:
        """(B, C, H) hidden states that predict the C completion tokens (position t predicts token t + 1)."""
        hidden = torch.cat(captured, dim=0)
        return hidden[:, -num_completion - 1 : -1]

    def _global_masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        mask = mask.float()
        totals = self.accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()
