"""Naive SDPG: the update as the paper's reference code shapes it, with full (B, T, V) logits for both views.

Written plainly from SPEC 2.1, 2.2 and 2.4 (on-policy REINFORCE outcome term, gated full-vocabulary reverse KL to the
detached teacher, `urkl` anchor, all normalised by the number of completion tokens). It is the memory foil for the
chunked trainer, not a reference for correctness (`sdpg_trl.losses.sdpg_loss_reference` is that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


def completion_logits(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """fp32 logits (B, T, V) predicting each completion token: the full-vocabulary tensor the chunked path avoids."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    t = completion_ids.size(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=t + 1, use_cache=False).logits
    return logits[:, :-1].float()


def naive_sdpg_loss(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    *,
    distill_coef: float,
    kl_coef: float,
) -> torch.Tensor:
    """`L_out + distill_coef * L_OPD+ + kl_coef * L_urkl` from materialised student and teacher logits."""
    completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"].float()
    student_logps = F.log_softmax(
        completion_logits(
            model, inputs["prompt_ids"], inputs["prompt_mask"], completion_ids, inputs["completion_mask"]
        ),
        dim=-1,
    )
    with torch.no_grad():
        teacher_logps = F.log_softmax(
            completion_logits(
                model,
                inputs["teacher_prompt_ids"],
                inputs["teacher_prompt_mask"],
                completion_ids,
                inputs["completion_mask"],
            ),
            dim=-1,
        )
    n_tokens = mask.sum().clamp(min=1.0)
    token_logps = student_logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    advantages = inputs["advantages"].unsqueeze(1)

    outcome = -(advantages * token_logps * mask).sum() / n_tokens  # SPEC 2.1, on-policy
    reverse_kl = (student_logps.exp() * (student_logps - teacher_logps)).sum(-1)  # SPEC 2.2, (B, T)
    gate = (advantages > 0).float()
    distill = (gate * reverse_kl * mask).sum() / n_tokens
    log_w = token_logps - inputs["ref_per_token_logps"]
    anchor = (0.5 * log_w.pow(2) * mask).sum() / n_tokens  # SPEC 2.4, urkl
    return outcome + distill_coef * distill + kl_coef * anchor
