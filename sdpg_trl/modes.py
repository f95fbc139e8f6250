"""Running the policy as the teacher without switching the model's mode, and one input-gradient hook per model.

Two things transformers does on a model-wide switch, which SDPG would otherwise do once or twice per micro-batch:
- `PreTrainedModel.train`/`eval` re-run `kernelize` when the model uses Hub kernels (`use_kernels`, on by default when
  the `kernels` package is installed) and the mode changes, swapping in the inference kernel mapping, which can
  differ from the training one: the live teacher would not compute with the student's kernels.
- `gradient_checkpointing_enable` registers a new `requires_grad` hook on the input embeddings every time and drops
  the handle of the previous one without removing it (unless an adapter was loaded by transformers' own PEFT
  integration), so each disable/enable pair leaves one more hook: thousands over a run, each one run per forward.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel


@contextmanager
def inference_flags(model: torch.nn.Module) -> Iterator[None]:
    """Dropout and gradient checkpointing off in every module of `model` while the context is open, each module's
    own flags restored afterwards.

    The flags are set on the modules directly (`module.training`, `module.gradient_checkpointing`) instead of through
    `model.eval()` and `gradient_checkpointing_disable()`: those re-kernelize the model and leak an input-gradient
    hook (module docstring). Every dropout in transformers and PEFT reads its own module's `training`, attention
    dropout included (the attention module's), and transformers checkpoints a layer only where both flags are set.
    """
    saved = [(module, module.training, module.__dict__.get("gradient_checkpointing")) for module in model.modules()]
    try:
        for module, _, checkpointing in saved:
            module.training = False
            if checkpointing is not None:
                module.gradient_checkpointing = False
        yield
    finally:
        for module, training, checkpointing in saved:
            module.training = training
            if checkpointing is not None:
                module.gradient_checkpointing = checkpointing


def _enable_input_require_grads_once(self: PreTrainedModel) -> None:
    self.disable_input_require_grads()  # removes the hooks this model registered last, if any
    type(self).enable_input_require_grads(self)


def keep_one_input_grad_hook(model: PreTrainedModel) -> None:
    """Make `model.enable_input_require_grads` replace the hook it registered before instead of adding one more.

    TRL turns the policy's gradient checkpointing off and on around each generation and each no-grad log-prob pass
    (`disable_gradient_checkpointing`, `unwrap_model_for_generation`), and each `gradient_checkpointing_enable`
    calls `enable_input_require_grads`, which leaks the previous hook (module docstring). Bound on the instance, so
    that the model's class and every other model are untouched.
    """
    model.enable_input_require_grads = types.MethodType(_enable_input_require_grads_once, model)
