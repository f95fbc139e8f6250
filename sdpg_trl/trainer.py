"""`SDPGTrainer`: TRL's GRPOTrainer plus a privileged self-teacher (SPEC 1-2).

GRPOTrainer keeps generation (transformers or vLLM), rewards, advantages, the reference model, PEFT, gradient
accumulation and multi-process training. This class is the data path and TRL's hooks:
- `_generate_and_score_completions` also tokenises each rollout's teacher prompt (see `teacher.py`);
- `compute_loss` runs the teacher forward (no grad, only for rollouts that will be distilled; `teachers.py`), the
  student forward, and hands the per-token terms (`step_terms.py`) to the pure functions in `losses.py`; its
  metrics are `train_metrics.py`'s, its checkpoint state `checkpoints.py`'s.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from trl import GRPOTrainer

from ._trl_compat import ForwardRedirection, tokenize_prompts
from .checkpoints import at_cycle_end, resolve_resume, write_settings
from .config import SDPGConfig
from .guards import StepGuard, reward_fault
from .head_kernels import HeadScores, LMHead, score_tokens
from .hidden_states import LogitTransform, capture_hidden, causal_lm, completion_hidden, lm_head
from .losses import Aggregation, TokenSelection, loss_aggregation, sdpg_objective, token_selection
from .model_card import method_card
from .modes import keep_one_input_grad_hook
from .plotting import CurvesCallback
from .preflight import (
    DEFAULT_ARGS_NEED_CONTEXT,
    check_loaded_model,
    check_model_config,
    check_model_source,
    check_train_size,
    model_config_before_loading,
)
from .run_report import DistillScheduleReport
from .step_terms import PerTokenTerms, StepCoefficients, per_token_terms, step_coefficients
from .teacher import (
    build_teacher_prompt,
    check_dataset,
    check_prompt_column,
    context_token_mask,
    default_teacher_prompt_length,
    describe_row,
    fit_teacher_prompts,
    teacher_prompt_inputs,
)
from .teachers import build_teacher
from .train_metrics import LossMetrics

logger = logging.getLogger(__name__)

# A reward function as GRPOTrainer takes it: a Hub id or path of a reward model, a model, or a callable.
RewardFunc = str | PreTrainedModel | Callable[..., list[float | None]]


class SDPGTrainer(GRPOTrainer):
    """Self-Distilled Policy Gradient trainer: GRPO + gated full-vocabulary self-distillation + a reference anchor.

    Takes the same arguments as [`trl.GRPOTrainer`], with `args` an [`SDPGConfig`]. The training dataset must have
    a `prompt` column and the privileged-context column named by `args.context_column`.
    """

    # TRL's model card and model tags name the method that runs (`args.method`) and cite its paper (model_card.py):
    # GRPOTrainer would otherwise supply GRPO's for every method.
    @property
    def _name(self) -> str:
        return method_card(self.args.method).name

    @property
    def _paper(self) -> dict[str, str]:
        return method_card(self.args.method).paper

    @property
    def _tag_names(self) -> list[str]:
        return method_card(self.args.method).tags

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
        args = self._check_inputs(model, args, train_dataset, eval_dataset, peft_config, processing_class)
        super().__init__(
            model,
            reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
            **kwargs,
        )
        config = causal_lm(self.accelerator, self.model).config
        text_config = check_loaded_model(
            config, self.processing_class, self.args, self.accelerator.device, self.accelerator.mixed_precision
        )
        keep_one_input_grad_hook(causal_lm(self.accelerator, self.model))  # TRL's checkpointing toggles add none
        self.teacher = build_teacher(self)  # the kind's name is looked up here, once
        self.add_callback(DistillScheduleReport())  # warns when beta(k) never reaches distill_coef in the run
        self.add_callback(CurvesCallback())  # the run's curves as PNGs in output_dir (with the plots extra)
        # Non-finite steps are skipped (guards.py); under DeepSpeed by DeepSpeed's own check, which the guard feeds.
        self._reward_fault: str | None = None  # why the current generation batch's rewards are unusable
        self._step_guard = StepGuard(self.args.max_consecutive_skipped_steps, deepspeed=self.is_deepspeed_enabled)
        self.add_callback(self._step_guard)
        self._max_teacher_prompt_length = self._teacher_prompt_cap(text_config)
        self._warned_teacher_prompt_too_long = False
        self._logit_transform = LogitTransform.of(self.temperature, text_config)  # for both LM heads' kernels
        self._loss_metrics = LossMetrics(self.accelerator, self.args)
        self._forward_redirection = ForwardRedirection()

    @staticmethod
    def _check_inputs(model, args, train_dataset, eval_dataset, peft_config, processing_class) -> SDPGConfig:
        """The config to train with (`SDPGConfig`'s defaults when `args` is None); everything that can be wrong with
        the inputs is checked here, before GRPOTrainer loads a model."""
        default_args = args is None
        if default_args:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = SDPGConfig(f"{str(model_name).split('/')[-1]}-SDPG")
        if not isinstance(args, SDPGConfig):
            raise TypeError(f"SDPGTrainer needs args of type SDPGConfig, got {type(args).__name__}.")
        args.check_installed()
        check_model_source(model, args, peft_config)
        config = model_config_before_loading(model, args)
        if config is not None:  # a VLM or an unsupported logit transform, refused before the weights load
            check_model_config(config, processing_class, args)
        why = DEFAULT_ARGS_NEED_CONTEXT if default_args else None
        for dataset, name in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
            check_dataset(dataset, name, args.teacher_context_column, args.teacher_template, why)
        check_train_size(train_dataset, args)
        return args

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
            ]
        output = super()._generate_and_score_completions(inputs)
        if not self.args.needs_teacher:
            return output
        # At most max_teacher_prompt_length tokens: the context is cut, never the problem; a row that cannot fit gets
        # a one-pad placeholder, fully masked, and `teacher_prompt_fits` keeps it away from the teacher.
        teacher_ids, fits, cut = fit_teacher_prompts(
            teacher_prompts,
            [x["prompt"] for x in inputs],
            contexts,
            self.args.teacher_template,
            tokenize=lambda prompts: tokenize_prompts(self, prompts)[0],
            tokenizer=self._tokenizer,
            max_length=self._max_teacher_prompt_length,
            side=self.args.teacher_context_truncation_side,
        )
        output |= teacher_prompt_inputs(
            teacher_ids,
            fits,
            pad_id=self._tokenizer.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
            device=output["prompt_ids"].device,
        )
        self._log_teacher_prompt_fit(cut, fits)
        # Completion tokens that also occur in the row's privileged context: where the KL could teach guessing.
        output["context_token_mask"] = context_token_mask(output["completion_ids"], contexts, self._tokenizer)
        return output

    def _teacher_prompt_cap(self, text_config) -> int | None:
        """`max_teacher_prompt_length`, or by default the student's sequence limit (`teacher.py`)."""
        if self.args.max_teacher_prompt_length is not None or not self.args.needs_teacher:
            return self.args.max_teacher_prompt_length
        return default_teacher_prompt_length(
            getattr(text_config, "max_position_embeddings", None),
            self.args.max_completion_length or 0,
            self.args.vllm_max_model_length if self.args.use_vllm else None,
        )

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
                too_long,
                self._max_teacher_prompt_length,
            )

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
        self._step_guard.observe(loss, self._reward_fault)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._step_guard.rewrite_logs(logs)  # training logs only: eval logs carry `eval_loss`, not `loss`
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        if not at_cycle_end(self.state.global_step, self.args):
            return
        # SDPG's files first: transformers writes trainer_state.json last, so a folder that has it is complete.
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            write_settings(folder, self.args)
            self.teacher.save(folder)
        super()._save_checkpoint(model, trial)

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """`Trainer.train`, with a resume that continues the same run or says why it cannot.

        `resume_from_checkpoint=True` takes the last *complete* checkpoint in `output_dir`, skipping (with a warning)
        any newer folder a stopped run left half-written, and a run folder its last complete checkpoint
        (`checkpoints.resolve_resume`); a checkpoint that is incomplete, has an unreadable file, or was trained
        with other loss settings than `args` (`checkpoints.loss_settings`), is refused with an error naming what.
        """
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Called on resume (every backend) after the weights and adapters are loaded and before `on_train_begin`.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.teacher.load(checkpoint)

    def _get_grad_norm(
        self, model: torch.nn.Module, grad_norm: torch.Tensor | float | None = None
    ) -> torch.Tensor | float | None:
        # transformers' total gradient norm before clipping: the step guard skips a step whose norm is not finite.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._step_guard.observe_grad_norm(grad_norm)
        return grad_norm

    # ----------------------------------------------------------------------------------------------------------------
    # Loss: one batch from `inputs` to the loss, one named step at a time
    # ----------------------------------------------------------------------------------------------------------------
    def coefficients_at(self, step: int) -> StepCoefficients:
        """The coefficients at optimiser step `step` of this run: the paper's beta(k) (SPEC 2.3), RLSD's lam(k)
        (SPEC 3), and the terms they switch on."""
        return step_coefficients(self.args, step, self.state.max_steps, self.beta)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The SDPGTrainer does not support returning outputs")
        mode = "train" if self.model.training else "eval"
        step = self.coefficients_at(self.state.global_step)
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)  # GRPO's: tool-call tokens are not trained
        selection = token_selection(
            inputs["advantages"],
            mask,
            step.terms,
            gate_enabled=self.args.distill_positive_only,
            fits=inputs.get("teacher_prompt_fits", True),  # rows whose teacher prompt fits max_teacher_prompt_length
        )
        teacher_hidden, teacher_head = self._teacher_pass(model, inputs, selection, step)
        scores, hidden, aux_loss = self._student_pass(model, inputs, selection, teacher_hidden, teacher_head, step)
        terms = per_token_terms(
            self.args,
            inputs,
            mask,
            scores,
            selection,
            step,
            eos_token_ids=self.eos_token_ids,
            high_entropy_mask=self.get_high_entropy_mask,
        )
        training = mode == "train"
        tokens = loss_aggregation(
            mask,
            self.args.loss_type,
            inputs["num_items_in_batch"],
            num_processes=self.accelerator.num_processes,
            accumulation_steps=self.current_gradient_accumulation_steps if training else 1,
            steps_per_generation=self.args.steps_per_generation if training else 1,
            max_completion_length=self.args.max_completion_length,
        )
        loss = self._objective(terms, mask, tokens, step)
        if self._entropy_bonus_enabled:
            loss = self._apply_entropy_bonus(loss, scores.entropy, terms.trained_mask, mode, tokens)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / tokens.accumulation_steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        if self.args.log_term_grad_norms and torch.is_grad_enabled():
            term_loss = lambda name: self._objective(terms, mask, tokens, step, only=name)  # noqa: E731
            self._loss_metrics.term_grad_norms(self._metrics[mode], term_loss, hidden)
        with torch.no_grad():
            self._loss_metrics.log(self._metrics[mode], mode, inputs, mask, scores, selection, terms, step)
        if self.is_deepspeed_enabled and training:  # DeepSpeed steps in the backward: skip a bad batch there
            loss = self._step_guard.deepspeed_loss(loss, self._reward_fault)
        return loss

    def _teacher_pass(
        self, model: torch.nn.Module, inputs: dict[str, Any], selection: TokenSelection, step: StepCoefficients
    ) -> tuple[torch.Tensor, LMHead]:
        """`(R, C, H)` teacher hidden states of the rows the teacher scores (`R` may be 0), and the teacher's LM head.

        Runs under no_grad, only on the rows a term needs (`selection.teacher_rows`), plus the padding row that keeps
        the processes' forwards in step (`_teacher_forward_rows`).
        """
        head = self.teacher.head(model, self._logit_transform)
        rows = self._teacher_forward_rows(selection.rows, step.terms.teacher)
        if rows.numel() > 0:
            return self.teacher.hidden(model, inputs, rows), head
        hidden_size = self.teacher.hidden_size(model)
        return head.weight.new_zeros(0, inputs["completion_ids"].size(1), hidden_size), head

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

    def _student_pass(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        selection: TokenSelection,
        teacher_hidden: torch.Tensor,
        teacher_head: LMHead,
        step: StepCoefficients,
    ) -> tuple[HeadScores, torch.Tensor, torch.Tensor | None]:
        """The student forward and the LM head on its tokens: `(HeadScores, (B, C, H) hidden states, aux loss)`.

        The head kernels run inside the wrapped model's forward (TRL's forward redirection), as TRL's fused head does:
        there DDP prepares its reduction, and ZeRO-3 keeps the forward's gathered parameters consistent and routes the
        head's gradient to its partitions.
        """
        unwrapped = self.accelerator.unwrap_model(model)
        # Bound here, not passed through the wrapper's forward: ZeRO-3 replaces the tensors in a forward's arguments
        # (the teacher's head parameters among them) by autograd wrappers.
        score = functools.partial(
            self._score_student, unwrapped, inputs, selection, teacher_hidden, teacher_head, step
        )
        *scores, hidden, aux_loss = self._forward_redirection(model, unwrapped, score)
        return HeadScores(*scores), hidden, aux_loss

    def _score_student(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        selection: TokenSelection,
        teacher_hidden: torch.Tensor,
        teacher_head: LMHead,
        step: StepCoefficients,
    ) -> tuple:
        """`_student_pass` inside the forward: one forward for the hidden states (one logit row, like the teacher's),
        then the LM head once per token (`score_tokens`). A plain tuple, which DDP and ZeRO-3 walk for tensors."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        lm = causal_lm(self.accelerator, model)
        with capture_hidden(lm) as captured, self.accelerator.autocast():
            outputs = model.forward(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1, **router
            )
        hidden = completion_hidden(captured, inputs["completion_ids"].size(1))
        # The head kernels run as TRL's fused head does inside GRPO's forward: under the accelerator's autocast, so
        # that mixed precision projects bf16/fp16 tiles (into fp32 logits), or in fp32 with `cast_lm_head_to_fp32`.
        # Outside the forward's autocast they would always project in the hidden states' dtype, fp32 by default.
        head_hidden, head_teacher_hidden, autocast = hidden, teacher_hidden, self.accelerator.autocast()
        if self.args.cast_lm_head_to_fp32:
            head_hidden, head_teacher_hidden, autocast = hidden.float(), teacher_hidden.float(), nullcontext()
        with autocast:
            scores = score_tokens(
                head_hidden,
                head_teacher_hidden,
                inputs["completion_ids"],
                selection,
                lm_head(lm, self._logit_transform),
                teacher_head,
                distill=step.terms.distill,
                rlsd=step.terms.rlsd,
                entropy_grad=self._entropy_bonus_enabled,
                chunk_size=self.args.distill_chunk_size,
            )
        return (*scores, hidden, outputs.aux_loss if self.aux_loss_enabled else None)

    def _objective(
        self,
        terms: PerTokenTerms,
        mask: torch.Tensor,
        tokens: Aggregation,
        step: StepCoefficients,
        only: str | None = None,
    ) -> torch.Tensor:
        """SPEC 2's loss from the per-token terms (`sdpg_objective`); `only` keeps one term (`"outcome"`,
        `"distill"` or `"anchor"`), for the per-term gradient norms."""
        keep = lambda name, value: value if only in (None, name) else None  # noqa: E731
        return sdpg_objective(
            keep("outcome", terms.outcome),
            keep("distill", terms.distill_kl),
            keep("anchor", terms.anchor),
            mask,
            terms.distill_weight,
            terms.policy.rho,
            outcome_coef=self.args.outcome_coef,
            distill_coef=step.distill_coef,
            kl_coef=self.beta,
            aggregation=tokens,
            anchor_ratio_weighted=self.args.anchor_ratio_weighted,
        )

    def _apply_entropy_bonus(
        self, loss: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, mode: str, tokens: Aggregation
    ) -> torch.Tensor:
        """GRPO's entropy bonus, `loss - coef * H` with `H` the mean entropy of the trained tokens, and its adaptive
        controller, as `GRPOTrainer.compute_loss` (TRL 1.16) applies them inline there; the state (`entropy_coef`,
        `_last_world_entropy`, `_entropy_window_stats`) and its checkpointing are GRPOTrainer's."""
        args, metrics, accumulation = self.args, self._metrics[mode], tokens.accumulation_steps
        # GRPO's `policy_loss`: the loss before the bonus, per accumulation window for the per-sequence loss types
        policy_loss = loss.detach() * (1.0 if tokens.spans_accumulation else accumulation)
        entropy_loss = (entropy * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
        # The coefficient and gate of the previous optimizer step, so that a window's micro-batches apply the same.
        coef = self.entropy_coef
        if self.use_adaptive_entropy and self._last_world_entropy > args.entropy_target:
            coef = 0.0
        loss = loss - coef * entropy_loss
        metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":  # the window's entropy over every process's tokens
            stats = torch.stack([(entropy * mask).sum(), mask.sum()]).detach()
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                self._last_world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                if self._last_world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)
        return loss
