"""`SDPGTrainer`: TRL's GRPOTrainer plus a privileged self-teacher (SPEC 1-2).

GRPOTrainer keeps generation (transformers or vLLM), rewards, advantages, the reference model, PEFT, gradient
accumulation and multi-process training. This class adds two things:
- `_generate_and_score_completions` also tokenises each rollout's teacher prompt (see `teacher.py`);
- `compute_loss` runs the teacher forward (no grad, only for rollouts that will be distilled), the student
  forward, and hands the per-token terms to the pure functions in `losses.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import pad

from .config import SDPGConfig
from .losses import (
    anchor_per_token,
    beta_schedule,
    chunked_logps_and_entropy,
    fused_policy_distillation,
    k3_kl,
    outcome_per_token,
    positive_advantage_gate,
    sdpg_objective,
)
from .teacher import build_teacher_prompt, check_context_column

# LM-head output transforms TRL's fused head knows but SDPG's head kernels need passed explicitly; SDPG reads the two
# common ones and refuses the rest rather than distil from wrongly scaled logits.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("output_multiplier", "lm_head_multiplier", "logits_scaling")

logger = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls in hardware (AVX512-BF16 or AMX); elsewhere PyTorch emulates them."""
    # Private probes, read defensively: torch exposes no public query for this.
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


class SDPGTrainer(GRPOTrainer):
    """Self-Distilled Policy Gradient trainer: GRPO + gated full-vocabulary self-distillation + a reference anchor.

    Takes the same arguments as [`trl.GRPOTrainer`], with `args` an [`SDPGConfig`]. The training dataset must have
    a `prompt` column and the privileged-context column named by `args.context_column`.
    """

    _tag_names = ["trl", "sdpg"]
    _name = "SDPG"

    def __init__(self, model: Any, reward_funcs: Any = None, args: SDPGConfig | None = None, **kwargs: Any):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = SDPGConfig(f"{str(model_name).split('/')[-1]}-SDPG")
        if not isinstance(args, SDPGConfig):
            raise TypeError(f"SDPGTrainer needs args of type SDPGConfig, got {type(args).__name__}.")
        check_context_column(kwargs.get("train_dataset"), args.context_column, "train_dataset")
        check_context_column(kwargs.get("eval_dataset"), args.context_column, "eval_dataset")
        super().__init__(model, reward_funcs, args=args, **kwargs)

        text_config = self._causal_lm(self.model).config.get_text_config()
        for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
            if getattr(text_config, name, None) is not None:
                raise NotImplementedError(f"SDPGTrainer does not support models whose config sets {name!r}.")
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
        output = super()._generate_and_score_completions(inputs)
        teacher_prompts = [
            build_teacher_prompt(x["prompt"], x.get(self.args.context_column), self.args.teacher_template,
                                 self.args.context_column)
            for x in inputs
        ]  # fmt: skip
        teacher_ids, _, _ = self._tokenize_prompts(teacher_prompts)
        teacher_ids = [torch.tensor(ids) for ids in teacher_ids]
        device = output["prompt_ids"].device
        output["teacher_prompt_ids"] = pad(
            teacher_ids, padding_value=self._tokenizer.pad_token_id, padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)  # fmt: skip
        output["teacher_prompt_mask"] = pad(
            [torch.ones_like(ids) for ids in teacher_ids], padding_value=0, padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)  # fmt: skip
        return output

    # ----------------------------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------------------------
    def distill_coef_at(self, step: int) -> float:
        """beta(k) at optimiser step `step` of this run (SPEC 2.3)."""
        return beta_schedule(
            step, self.state.max_steps, self.args.distill_coef,
            self.args.distill_warmup_steps, self.args.distill_decay_steps,
        )  # fmt: skip

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The SDPGTrainer does not support returning outputs")
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        num_completion = completion_ids.size(1)
        advantages = inputs["advantages"]
        gate = positive_advantage_gate(advantages, self.args.distill_positive_only)
        distill_coef = self.distill_coef_at(self.state.global_step)

        # Teacher first, under no_grad: only rollouts that the gate keeps, and none while beta(k) is 0.
        rows, teacher_rows = self._teacher_rows(gate, distill_coef)
        if teacher_rows.numel() > 0:
            teacher_ids = torch.cat([inputs["teacher_prompt_ids"][teacher_rows], completion_ids[teacher_rows]], dim=1)
            teacher_mask = torch.cat([inputs["teacher_prompt_mask"][teacher_rows], completion_mask[teacher_rows]], 1)
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                self._capture_hidden(model) as teacher_hidden,
                self.accelerator.autocast(),
            ):
                # Only the hidden states are needed: keep one logit row instead of projecting every position.
                model(input_ids=teacher_ids, attention_mask=teacher_mask, use_cache=False, logits_to_keep=1)

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

        distilled = torch.zeros_like(mask, dtype=torch.bool)
        distilled[rows] = mask[rows].bool()
        # Zeros attached to the graph, so a batch with no valid token still backpropagates (as TRL's fused head does).
        per_token_logps = hidden[..., 0].float() * 0.0
        entropies, opd, gap = (torch.zeros_like(per_token_logps, requires_grad=False) for _ in range(3))
        scored = mask.bool() & ~distilled
        if scored.any():
            where = scored.nonzero(as_tuple=True)
            logps, entropy = chunked_logps_and_entropy(hidden[where], weight, bias, completion_ids[where], **head)
            per_token_logps = per_token_logps.index_put(where, logps)
            entropies = entropies.index_put(where, entropy)
        if distilled.any():
            where = distilled.nonzero(as_tuple=True)  # row-major, so it lines up with the teacher rows `rows`
            logps, entropy, kl, teacher_logps = fused_policy_distillation(
                hidden[where], self._completion_hidden(teacher_hidden, num_completion)[distilled[rows]],
                weight, bias, completion_ids[where], chunk_size=self.args.distill_chunk_size, **head,
            )  # fmt: skip
            per_token_logps = per_token_logps.index_put(where, logps)
            entropies = entropies.index_put(where, entropy)
            opd = opd.index_put(where, kl)
            gap = gap.index_put(where, teacher_logps - logps.detach())

        outcome, rho = outcome_per_token(
            per_token_logps, advantages, inputs.get("old_per_token_logps"),
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, dual_clip=self.args.delta,
        )  # fmt: skip
        if self.use_vllm and self.vllm_importance_sampling_correction:
            outcome = outcome * inputs["importance_sampling_ratio"]  # sampler/trainer mismatch, as in GRPO
        anchor = None
        if self.beta != 0.0:
            anchor = anchor_per_token(per_token_logps, inputs["ref_per_token_logps"], self.args.kl_estimator)

        # DAPO aggregation exactly as GRPOTrainer: `num_items_in_batch` spans the generation batch on all processes.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss = sdpg_objective(
            outcome, opd, anchor, mask, gate, rho,
            distill_coef=distill_coef, kl_coef=self.beta, normalizer=normalizer,
        )  # fmt: skip
        if self.aux_loss_enabled:
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        with torch.no_grad():
            metrics = self._metrics[mode]
            metrics["entropy"].append(self._global_masked_mean(entropies, mask))
            metrics["sdpg/distill_coef"].append(distill_coef)
            metrics["sdpg/gate_ratio"].append(self.accelerator.gather(gate).mean().item())
            metrics["sdpg/opd_kl"].append(self._global_masked_mean(opd, distilled))
            metrics["sdpg/teacher_minus_student_logp"].append(self._global_masked_mean(gap, distilled))
            if anchor is not None:
                metrics["sdpg/anchor"].append(self._global_masked_mean(anchor, mask))
                metrics["kl"].append(
                    self._global_masked_mean(k3_kl(per_token_logps, inputs["ref_per_token_logps"]), mask)
                )
        return loss

    # ----------------------------------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------------------------------
    def _teacher_rows(self, gate: torch.Tensor, distill_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows to distil on this process, and rows to run the teacher on.

        Every process must run the same number of forwards (DDP broadcasts buffers, FSDP and ZeRO-3 gather weights
        in each one), so a process with nothing to distil while another has something runs the teacher on one row
        and discards it.
        """
        rows = gate.nonzero().squeeze(1) if distill_coef > 0 else gate.new_zeros(0, dtype=torch.long)
        if self.accelerator.num_processes > 1 and distill_coef > 0:
            total = self.accelerator.reduce(rows.new_tensor([rows.numel()]), reduction="sum")
            if rows.numel() == 0 and total.item() > 0:
                return rows, rows.new_zeros(1)
        return rows, rows

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
