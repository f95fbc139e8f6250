"""Hidden states and LM heads of a (wrapped) causal LM: what the teacher and the student forwards hand to the LM-head
kernels (`head_kernels.py`), which give log-probs, entropies and the KL without materialising logits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator

from .head_kernels import LMHead, lm_head_parameters


class LogitTransform(NamedTuple):
    """How an LM head's logits are transformed before the softmax (TRL's fused head reads the same fields): divided
    by the sampling `temperature`, times the model's `logit_scale`, soft-capped at `final_logit_softcapping`."""

    temperature: float
    logit_scale: float
    final_logit_softcapping: float | None

    @classmethod
    def of(cls, temperature: float, text_config: Any) -> LogitTransform:
        """The transform of a model with text config `text_config`, sampled at `temperature`."""
        scale = getattr(text_config, "logit_scale", None) or 1.0
        return cls(temperature, scale, getattr(text_config, "final_logit_softcapping", None))


def causal_lm(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside any accelerate/DDP/PEFT wrapping."""
    unwrapped = accelerator.unwrap_model(model)
    return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped


def lm_head(lm: torch.nn.Module, transform: LogitTransform) -> LMHead:
    """The LM head of causal LM `lm` with its logit transform: the one way a head reaches the kernels."""
    return LMHead(*lm_head_parameters(lm), *transform)


@contextmanager
def capture_hidden(lm: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the backbone's last hidden state during a forward through the (wrapped) model of causal LM `lm`.

    The forward must go through the wrapped model itself so that DDP/DeepSpeed/FSDP see it; a hook on the backbone
    hands its hidden states to the LM-head kernels, which give log-probs and the KL without a second forward.
    """
    captured: list[torch.Tensor] = []
    handle = lm.base_model.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        yield captured
    finally:
        handle.remove()


def completion_hidden(captured: list[torch.Tensor], num_completion: int) -> torch.Tensor:
    """(B, C, H) hidden states that predict the C completion tokens (position t predicts token t + 1)."""
    hidden = torch.cat(captured, dim=0)
    return hidden[:, -num_completion - 1 : -1]
