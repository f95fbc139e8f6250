"""`SDPGTrainer`: TRL's GRPOTrainer plus a privileged self-teacher (SPEC 1-2).

GRPOTrainer keeps generation (transformers or vLLM), rewards, advantages, the reference model, PEFT, gradient
accumulation and multi-process training. This class adds two things:
- `_generate_and_score_completions` also tokenises each rollout's teacher prompt (see `teacher.py`);
- `compute_loss` runs the teacher forward (no grad, only for rollouts that will be distilled), the student
  forward, and hands the per-token terms to the pure functions in `losses.py`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from peft import PeftConfig, PeftModel, get_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from trl import GRPOTrainer

from . import _trl_compat
from ._trl_compat import (
    ForwardRedirection,
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
from .checkpoints import (
    EMA_ADAPTER_NAME,
    EMA_TEACHER_NAME,
    check_resumable,
    resolve_checkpoint,
    write_settings,
)
from .config import SDPGConfig
from .guards import StepGuard, reward_fault
from .head_kernels import HeadScores, LMHead, lm_head_parameters, score_tokens
from .losses import (
    CLIPPED_LOSS_TYPES,
    Aggregation,
    LossTerms,
    Outcome,
    OutcomeOptions,
    TokenSelection,
    anchor_per_token,
    distill_coef_schedule,
    distill_token_weight,
    k3_kl,
    loss_aggregation,
    loss_terms,
    masked_mean,
    outcome_per_token,
    rlsd_advantages,
    rlsd_lambda,
    sdpg_objective,
    token_selection,
)
from .model_card import method_card
from .plotting import CurvesCallback
from .preflight import (
    DEFAULT_ARGS_NEED_CONTEXT,
    check_model_source,
    check_train_size,
    emulated_bf16_warning,
)
from .run_report import DistillScheduleReport
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


class StepCoefficients(NamedTuple):
    """One optimiser step's scheduled coefficients (SPEC 2.3, 3) and the terms they switch on."""

    distill_coef: float
    rlsd_lam: float
    terms: LossTerms


class PerTokenTerms(NamedTuple):
    """The `(B, C)` terms `sdpg_objective` sums (None: a term this step does not use), and what their metrics read.

    Attributes:
        outcome: GRPO's policy term after its token filters. distill_kl: the reverse KL to the teacher. anchor: the
            reference anchor. distill_weight: `(B, C)` gate times the distillation filters. policy: the outcome's
            ratios (`Outcome`). options: GRPO's options it was formed with. token_advantages: `(B,)`, or `(B, C)`
            with RLSD. trained_mask: `(B, C)` the tokens the outcome term trains (after `top_entropy_quantile`).
    """

    outcome: torch.Tensor | None
    distill_kl: torch.Tensor | None
    anchor: torch.Tensor | None
    distill_weight: torch.Tensor
    policy: Outcome
    options: OutcomeOptions
    token_advantages: torch.Tensor
    trained_mask: torch.Tensor


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
        for dataset, name in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
            check_dataset(dataset, name, args.teacher_context_column, args.teacher_template, why)
        check_train_size(train_dataset, args)
        super().__init__(
            model, reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, reward_processing_classes=reward_processing_classes,
            callbacks=callbacks, optimizers=optimizers, peft_config=peft_config, **kwargs,
        )  # fmt: skip
        text_config = self._check_model()
        self.teacher_model = self._setup_teacher_model()
        self.add_callback(DistillScheduleReport())  # warns when beta(k) never reaches distill_coef in the run
        self.add_callback(CurvesCallback())  # the run's curves as PNGs in output_dir (with the plots extra)
        # Non-finite steps are skipped (guards.py); under DeepSpeed by DeepSpeed's own check, which the guard feeds.
        self._reward_fault: str | None = None  # why the current generation batch's rewards are unusable
        self._step_guard = StepGuard(self.args.max_consecutive_skipped_steps, deepspeed=self.is_deepspeed_enabled)
        self.add_callback(self._step_guard)
        self._max_teacher_prompt_length = self._teacher_prompt_cap(text_config)
        self._warned_teacher_prompt_too_long = False
        # How the LM head's logits are transformed, for the head kernels (TRL's fused head reads the same fields).
        self._logit_transform = dict(
            temperature=self.temperature, logit_scale=getattr(text_config, "logit_scale", None) or 1.0,
            final_logit_softcapping=getattr(text_config, "final_logit_softcapping", None),
        )  # fmt: skip
        self._forward_redirection = ForwardRedirection()

    def _check_model(self) -> Any:
        """Refuse what SDPG's loss cannot train (a vision-language model, an LM-head output transform the kernels do
        not apply), warn about emulated bf16, and return the model's text config."""
        config = self._causal_lm(self.model).config
        vision = vision_language_signs(self.processing_class, config)
        if vision:
            teacher = (
                ", and the teacher prompts would be tokenised without their images" if self.args.needs_teacher else ""
            )
            raise NotImplementedError(
                f"SDPGTrainer is text-only, and this is a vision-language model ({'; '.join(vision)}). Image inputs "
                "are not supported: SDPGTrainer's loss runs the student forward on token ids alone, so GRPO's image "
                f"inputs (pixel_values, image_grid_thw, ...) would be dropped{teacher}. Train vision-language models "
                "with trl.GRPOTrainer."
            )
        text_config = config.get_text_config()
        for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
            if getattr(text_config, name, None) is not None:
                raise NotImplementedError(f"SDPGTrainer does not support models whose config sets {name!r}.")
        if self.accelerator.device.type == "cpu" and not cpu_has_native_bf16():
            # GRPOConfig turns bf16 on by default; emulated bf16 made a SmolLM2-135M step 11x slower (283 s vs 25 s).
            warning = emulated_bf16_warning(self.args, self.accelerator.mixed_precision)  # the effective precision
            if warning:
                logger.warning(warning)
        return text_config

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
        self._step_guard.observe(loss, self._reward_fault)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._step_guard.rewrite_logs(logs)  # training logs only: eval logs carry `eval_loss`, not `loss`
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
        # SDPG's files first: transformers writes trainer_state.json last, so a folder that has it is complete.
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            write_settings(folder, self.args)
            self._save_ema_teacher(folder)
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
        (`checkpoints.resolve_checkpoint`); a checkpoint that is incomplete, has an unreadable file, or was trained
        with other loss settings than `args` (`checkpoints.loss_settings`), is refused with an error naming what.
        """
        resume_from_checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is not None:
            check_resumable(resume_from_checkpoint, self.args)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _save_ema_teacher(self, folder: str) -> None:
        """The EMA teacher's weights into a checkpoint folder, when it is a full copy (a LoRA EMA teacher is the
        `sdpg_ema_teacher` adapter, which PEFT saves with the policy's)."""
        if self.args.teacher_model_kind != "ema" or self.teacher_model is None:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            logger.warning(
                "The EMA teacher (teacher_model_kind='ema') is not saved in %s under DeepSpeed or FSDP, whose sharded "
                "weights it does not gather: a run resumed from it restarts the EMA teacher from the initial weights.",
                folder,
            )
            return
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        torch.save(teacher.state_dict(), os.path.join(folder, EMA_TEACHER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Called on resume (every backend) after the weights and adapters are loaded and before `on_train_begin`.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.args.needs_teacher and self.args.teacher_model_kind == "ema":
            self._load_ema_teacher(checkpoint)

    def _load_ema_teacher(self, checkpoint: str) -> None:
        """Restore the EMA teacher a checkpoint holds, so that the resumed run continues the uninterrupted one."""
        callback = self._ema_adapter_callback
        if callback is not None:
            # transformers loaded the checkpoint's `sdpg_ema_teacher` adapter: TRL's callback adopts it as its EMA
            # state instead of adding a zero adapter of that name at `on_train_begin` (which PEFT would refuse).
            model = self.accelerator.unwrap_model(self.model)
            if EMA_ADAPTER_NAME not in model.peft_config:
                logger.warning(
                    "%s has no %r adapter: the resumed run restarts the LoRA EMA teacher from zero.",
                    checkpoint, EMA_ADAPTER_NAME,
                )  # fmt: skip
                return
            weights = get_peft_model_state_dict(model, adapter_name=EMA_ADAPTER_NAME)
            callback.shadow_weights = {name: value.detach().clone() for name, value in weights.items()}
            callback.teacher_adapter_config = model.peft_config[EMA_ADAPTER_NAME]
            callback._initialized = True
            return
        if self.teacher_model is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return
        path = os.path.join(checkpoint, EMA_TEACHER_NAME)
        if not os.path.isfile(path):
            logger.warning(
                "%s has no %s (it was written by an older sdpg-trl): the resumed run restarts the EMA teacher from "
                "the initial weights.",
                checkpoint, EMA_TEACHER_NAME,
            )  # fmt: skip
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.accelerator.unwrap_model(self.teacher_model).load_state_dict(state)

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
    def distill_coef_at(self, step: int) -> float:
        """The distillation coefficient at optimiser step `step` of this run, the paper's beta(k) (SPEC 2.3)."""
        return distill_coef_schedule(
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
        step = self._step_coefficients()
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)  # GRPO's: tool-call tokens are not trained
        selection = token_selection(
            inputs["advantages"], mask, step.terms, gate_enabled=self.args.distill_positive_only,
            fits=inputs.get("teacher_prompt_fits", True),  # rows whose teacher prompt fits max_teacher_prompt_length
        )  # fmt: skip
        teacher_hidden, teacher_head = self._teacher_pass(model, inputs, selection, step.terms)
        scores, hidden, aux_loss = self._student_pass(model, inputs, selection, teacher_hidden, teacher_head, step)
        terms = self._per_token_terms(inputs, mask, scores, selection, step)
        tokens = loss_aggregation(
            mask, self.args.loss_type, inputs["num_items_in_batch"], num_processes=self.accelerator.num_processes,
            accumulation_steps=self.current_gradient_accumulation_steps if mode == "train" else 1,
            steps_per_generation=self.args.steps_per_generation if mode == "train" else 1,
            max_completion_length=self.args.max_completion_length,
        )  # fmt: skip
        loss = self._objective(terms, mask, tokens, step)
        if self._entropy_bonus_enabled:
            loss = self._apply_entropy_bonus(loss, scores.entropy, terms.trained_mask, mode)
        if self.aux_loss_enabled:
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        if self.args.log_term_grad_norms and torch.is_grad_enabled():
            self._log_term_grad_norms(self._metrics[mode], terms, mask, tokens, step, hidden)
        with torch.no_grad():
            self._log_loss_metrics(self._metrics[mode], inputs, mask, scores, selection, terms, step)
        if self.is_deepspeed_enabled and mode == "train":  # DeepSpeed steps in the backward: skip a bad batch there
            loss = self._step_guard.deepspeed_loss(loss, self._reward_fault)
        return loss

    def _step_coefficients(self) -> StepCoefficients:
        """This optimiser step's scheduled coefficients, and the terms they switch on."""
        distill_coef = self.distill_coef_at(self.state.global_step)
        rlsd_lam = self.rlsd_lambda_at(self.state.global_step)
        terms = loss_terms(outcome_coef=self.args.outcome_coef, distill_coef=distill_coef, rlsd_lam=rlsd_lam,
                           kl_coef=self.beta)  # fmt: skip
        return StepCoefficients(distill_coef, rlsd_lam, terms)

    def _teacher_pass(
        self, model: torch.nn.Module, inputs: dict[str, Any], selection: TokenSelection, terms: LossTerms
    ) -> tuple[torch.Tensor, LMHead]:
        """`(R, C, H)` teacher hidden states of the rows the teacher scores (`R` may be 0), and the teacher's LM head.

        Runs under no_grad, only on the rows a term needs (`selection.teacher_rows`), plus the padding row that keeps
        the processes' forwards in step (`_teacher_forward_rows`).
        """
        teacher = model if self.teacher_model is None else self.teacher_model
        weight, bias = self._lm_head_params(teacher)
        head = LMHead(weight, bias, **self._logit_transform)
        rows = self._teacher_forward_rows(selection.rows, terms.teacher)
        if rows.numel() > 0:
            return self._teacher_hidden(model, inputs, rows), head
        hidden_size = self._causal_lm(teacher).config.get_text_config().hidden_size
        return weight.new_zeros(0, inputs["completion_ids"].size(1), hidden_size), head

    def _student_pass(
        self, model: torch.nn.Module, inputs: dict[str, Any], selection: TokenSelection, teacher_hidden: torch.Tensor,
        teacher_head: LMHead, step: StepCoefficients,
    ) -> tuple[HeadScores, torch.Tensor, torch.Tensor | None]:  # fmt: skip
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
        self, model: torch.nn.Module, inputs: dict[str, Any], selection: TokenSelection, teacher_hidden: torch.Tensor,
        teacher_head: LMHead, step: StepCoefficients,
    ) -> tuple:  # fmt: skip
        """`_student_pass` inside the forward: one forward for the hidden states (one logit row, like the teacher's),
        then the LM head once per token (`score_tokens`). A plain tuple, which DDP and ZeRO-3 walk for tensors."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self._capture_hidden(model) as captured, self.accelerator.autocast():
            outputs = model.forward(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1, **router
            )
        hidden = self._completion_hidden(captured, inputs["completion_ids"].size(1))
        weight, bias = self._lm_head_params(model)
        # The head kernels run as TRL's fused head does inside GRPO's forward: under the accelerator's autocast, so
        # that mixed precision projects bf16/fp16 tiles (into fp32 logits), or in fp32 with `cast_lm_head_to_fp32`.
        # Outside the forward's autocast they would always project in the hidden states' dtype, fp32 by default.
        head_hidden, head_teacher_hidden, autocast = hidden, teacher_hidden, self.accelerator.autocast()
        if self.args.cast_lm_head_to_fp32:
            head_hidden, head_teacher_hidden, autocast = hidden.float(), teacher_hidden.float(), nullcontext()
        with autocast:
            scores = score_tokens(
                head_hidden, head_teacher_hidden, inputs["completion_ids"], selection,
                LMHead(weight, bias, **self._logit_transform), teacher_head, distill=step.terms.distill,
                rlsd=step.terms.rlsd, entropy_grad=self._entropy_bonus_enabled,
                chunk_size=self.args.distill_chunk_size,
            )  # fmt: skip
        return (*scores, hidden, outputs.aux_loss if self.aux_loss_enabled else None)

    def _per_token_terms(
        self, inputs: dict[str, Any], mask: torch.Tensor, scores: HeadScores, selection: TokenSelection,
        step: StepCoefficients,
    ) -> PerTokenTerms:  # fmt: skip
        """The `(B, C)` terms of SPEC 2 and 3 from the head's scores: GRPO's policy term for its loss type (with RLSD's
        reweighted advantages and GRPO's token filters), the anchor, the distillation KL and its token weights."""
        args, terms = self.args, step.terms
        advantages, old_logps = inputs["advantages"], inputs.get("old_per_token_logps")
        token_advantages = advantages
        if terms.rlsd:
            sampler_logps = scores.logps.detach() if old_logps is None else old_logps
            token_advantages = rlsd_advantages(advantages, scores.teacher_logps, sampler_logps, lam=step.rlsd_lam,
                                               clip=args.rlsd_clip, scored=selection.teacher_rows)  # fmt: skip
        # GRPO's policy loss for its loss_type; vLLM's `importance_sampling_ratio` corrects the sampler mismatch.
        options = OutcomeOptions.from_config(args)
        policy = outcome_per_token(
            scores.logps, token_advantages, old_logps, mask=mask, options=options,
            sampler_ratio=inputs.get("importance_sampling_ratio"),
        )  # fmt: skip
        outcome = policy.loss
        # GRPO's filters of its policy term (not of SDPG's terms): DeepSeek-V3.2's off-policy sequence mask, measured
        # against the sampler's log-probs, and the top-entropy-quantile token mask ("Beyond the 80/20 Rule").
        if args.off_policy_mask_threshold is not None:
            old = scores.logps.detach() if old_logps is None else old_logps
            outcome = outcome * off_policy_sequence_mask(
                advantages.unsqueeze(1), scores.logps, inputs.get("sampling_per_token_logps", old), mask,
                args.off_policy_mask_threshold,
            )  # fmt: skip
        trained_mask = mask
        if args.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(scores.entropy.detach(), mask, 1 - args.top_entropy_quantile)
            outcome, trained_mask = outcome * entropy_mask, mask * entropy_mask
        anchor = None
        if terms.anchor:
            anchor = anchor_per_token(scores.logps, inputs["ref_per_token_logps"], args.kl_estimator)
            if args.use_bias_correction_kl:  # DeepSeek-V3.2: times the importance ratio, with its gradient
                anchor = anchor * policy.ratio
        confident_only = args.distill_teacher_confident_only
        distill_weight = distill_token_weight(
            mask, selection.gate * selection.distill_rows, completion_ids=inputs["completion_ids"],
            eos_token_ids=self.eos_token_ids if args.distill_exclude_eos else None,
            student_entropy=scores.entropy if confident_only else None,
            teacher_entropy=scores.teacher_entropy if confident_only else None,
        )  # fmt: skip
        return PerTokenTerms(
            outcome=outcome if terms.outcome else None, distill_kl=scores.distill_kl if terms.distill else None,
            anchor=anchor, distill_weight=distill_weight, policy=policy, options=options,
            token_advantages=token_advantages, trained_mask=trained_mask,
        )  # fmt: skip

    def _objective(
        self, terms: PerTokenTerms, mask: torch.Tensor, tokens: Aggregation, step: StepCoefficients,
        only: str | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """SPEC 2's loss from the per-token terms (`sdpg_objective`); `only` keeps one term (`"outcome"`,
        `"distill"` or `"anchor"`), for the per-term gradient norms."""
        keep = lambda name, value: value if only in (None, name) else None  # noqa: E731
        return sdpg_objective(
            keep("outcome", terms.outcome), keep("distill", terms.distill_kl), keep("anchor", terms.anchor), mask,
            terms.distill_weight, terms.policy.rho, outcome_coef=self.args.outcome_coef,
            distill_coef=step.distill_coef, kl_coef=self.beta, aggregation=tokens,
            anchor_ratio_weighted=self.args.anchor_ratio_weighted,
        )  # fmt: skip

    def _apply_entropy_bonus(
        self, loss: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, mode: str
    ) -> torch.Tensor:
        """GRPO's entropy bonus, `loss - coef * H` with `H` the mean entropy of the trained tokens, and its adaptive
        controller, as `GRPOTrainer.compute_loss` (TRL 1.16) applies them inline there; the state (`entropy_coef`,
        `_last_world_entropy`, `_entropy_window_stats`) and its checkpointing are GRPOTrainer's."""
        args, metrics = self.args, self._metrics[mode]
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        # GRPO's `policy_loss`: the loss before the bonus, per accumulation window for the per-sequence loss types
        policy_loss = loss.detach() * (1.0 if args.loss_type in ("dapo", "cispo", "vespo") else accumulation)
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

    # ----------------------------------------------------------------------------------------------------------------
    # Metrics of the loss
    # ----------------------------------------------------------------------------------------------------------------
    def _log_term_grad_norms(
        self, metrics: dict, terms: PerTokenTerms, mask: torch.Tensor, tokens: Aggregation, step: StepCoefficients,
        hidden: torch.Tensor,
    ) -> None:  # fmt: skip
        """`grad_norm/{outcome,distill,anchor}`: each term's gradient norm at the final hidden states, over all
        processes; one extra LM-head backward per term (`log_term_grad_norms`)."""
        for name in ("outcome", "distill", "anchor"):
            part = self._objective(terms, mask, tokens, step, only=name)
            grad = None
            if part.requires_grad:  # a term this step does not use is a constant 0
                grad = torch.autograd.grad(part, hidden, retain_graph=True, allow_unused=True)[0]
            norm = torch.zeros((), device=hidden.device) if grad is None else grad.float().square().sum()
            metrics[f"grad_norm/{name}"].append(self.accelerator.reduce(norm, reduction="sum").sqrt().item())

    def _log_loss_metrics(
        self, metrics: dict, inputs: dict[str, Any], mask: torch.Tensor, scores: HeadScores,
        selection: TokenSelection, terms: PerTokenTerms, step: StepCoefficients,
    ) -> None:  # fmt: skip
        """The step's metrics, each a mean over every process's tokens, whatever this process's data (every process
        takes part in every reduction, in the same order)."""
        mean = self._global_masked_mean
        metrics["entropy"].append(mean(scores.entropy, mask))
        metrics["sdpg/distill_coef"].append(step.distill_coef)
        metrics["sdpg/gate_ratio"].append(self.accelerator.gather(selection.gate).mean().item())
        if self.args.distill_coef > 0:  # the method distils: logged from step 0, also while the schedule is at 0
            self._log_distill_metrics(metrics, inputs, scores, terms.distill_weight, selection.distilled)
        if self.args.rlsd_coef > 0:
            scored = selection.distilled | selection.teacher_only
            metrics["rlsd/lambda"].append(step.rlsd_lam)
            if step.terms.rlsd:
                advantages = inputs["advantages"].unsqueeze(1)
                ratio = terms.token_advantages / advantages.where(advantages != 0, 1.0)
                metrics["rlsd/advantage_weight"].append(mean(ratio, scored))
                old_logps = inputs.get("old_per_token_logps")
                sampler_logps = scores.logps if old_logps is None else old_logps
                metrics["rlsd/teacher_minus_sampler_logp"].append(mean(scores.teacher_logps - sampler_logps, scored))
        if terms.anchor is not None:
            metrics["sdpg/anchor"].append(mean(terms.anchor, mask))
            kl = k3_kl(scores.logps, inputs["ref_per_token_logps"])
            if self.args.use_bias_correction_kl:  # GRPOTrainer logs the importance-weighted estimate
                kl = kl * terms.policy.ratio
            metrics["kl"].append(mean(kl, mask))
        self._log_ratio_metrics(metrics, terms.policy, terms.options, terms.token_advantages, mask)

    def _log_distill_metrics(
        self, metrics: dict, inputs: dict[str, Any], scores: HeadScores, distill_weight: torch.Tensor,
        distilled: torch.Tensor,
    ) -> None:  # fmt: skip
        """The distillation term's metrics over the distilled tokens, and the leakage signal: the share of the KL on
        completion tokens that also occur in the privileged context."""
        mean = self._global_masked_mean
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
        self._ema_adapter_callback = None  # with LoRA and `ema`: TRL's callback, whose state a resume restores
        if not self.args.needs_teacher or kind == "live":
            return None
        if is_peft_model(self.model):
            if kind == "ema":
                if not _trl_compat.is_pure_lora_training(self.model):
                    raise ValueError("SDPGConfig.teacher_model_kind='ema' with PEFT needs pure LoRA training.")
                self._ema_adapter_callback = _trl_compat.PEFTAdapterEMACallback(
                    self.model, teacher_adapter_name=EMA_ADAPTER_NAME, update_rate=self.args.teacher_update_rate,
                    sync_steps=self.args.teacher_sync_steps, accelerator=self.accelerator,
                )  # fmt: skip
                self.add_callback(self._ema_adapter_callback)
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
        return use_adapter(self.accelerator.unwrap_model(model), None if kind == "base" else EMA_ADAPTER_NAME)

    def _teacher_hidden(self, model: torch.nn.Module, inputs: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
        """`(R, C, H)` teacher hidden states predicting the completion tokens of `rows`.

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
        return self._completion_hidden(captured, completion_ids.size(1))

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
        return lm_head_parameters(self._causal_lm(model))

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
        """Mean of `values` over every process's tokens where `mask` is set."""
        return masked_mean(values, mask, reduce=lambda totals: self.accelerator.reduce(totals, reduction="sum")).item()
