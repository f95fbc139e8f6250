"""Teacher kinds: which weights score the privileged view (SPEC 1), as objects behind one small protocol.

A kind (`teacher_model_kind`) is a `Teacher` subclass registered in `TEACHER_KINDS`; its name is looked up once, in
`build_teacher`, and the trainer only calls the object: `setup` (once, after GRPOTrainer built the policy and the
reference model), `hidden` (the teacher's hidden states for the rows it scores), `head` (the LM head to score them
with), `save`/`load` (its state in a checkpoint), and `needs_initial_weights` and `check_peft_config` (what
`preflight` checks before a model loads). Each kind handles a full model and LoRA:

- `live` (the paper's SDPG): the policy itself; no extra memory.
- `base`: the initial weights. With PEFT, the policy with its adapter switched off; with a reference model (alpha > 0,
  not synced), that model, at no extra memory; otherwise a frozen copy (one more set of weights).
- `ema`: with pure LoRA, a second adapter kept by TRL's `PEFTAdapterEMACallback`; otherwise a copy of the weights
  that TRL's `SyncTeacherModelCallback` moves toward the policy every `teacher_sync_steps` steps.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from accelerate.utils import is_peft_model
from peft import get_peft_model_state_dict

from . import _trl_compat
from ._trl_compat import (
    create_model_from_path,
    get_config_model_id,
    prepare_deepspeed,
    prepare_fsdp,
    use_adapter,
)
from .head_kernels import LMHead
from .hidden_states import LogitTransform, capture_hidden, causal_lm, completion_hidden, lm_head
from .modes import inference_flags

if TYPE_CHECKING:
    from trl import GRPOTrainer

logger = logging.getLogger(__name__)

EMA_TEACHER_NAME = "sdpg_ema_teacher.pt"  # a full-copy EMA teacher's weights in a checkpoint folder
EMA_ADAPTER_NAME = "sdpg_ema_teacher"  # a LoRA EMA teacher's adapter (PEFT saves it with the policy's)


class Teacher:
    """A teacher kind. The base class is the policy scoring the teacher view with its own weights (`live`).

    Attributes:
        kind: the `teacher_model_kind` it is registered under. needs_initial_weights: without PEFT it loads a second
            copy of the initial weights from the model's checkpoint (`preflight.check_model_source` refuses a model
            object that names none). model: the module whose forward scores the teacher view, or None for the policy.
    """

    kind: ClassVar[str] = ""
    needs_initial_weights: ClassVar[bool] = False

    def __init__(self, trainer: GRPOTrainer) -> None:
        self.trainer = trainer
        self.model: torch.nn.Module | None = None

    @classmethod
    def check_peft_config(cls, peft_config: Any) -> None:
        """Refuse, before any model loads, a `peft_config` the kind cannot train with (`preflight`)."""

    def setup(self) -> None:
        """Build what the kind needs (a model, a callback); called once, after GRPOTrainer's `__init__`."""

    def adapter(self, policy: torch.nn.Module) -> AbstractContextManager:
        """With PEFT and `model` None: the adapter the teacher forward runs with (the policy's by default)."""
        return nullcontext()

    def module(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward scores the teacher view: `model`, or the (wrapped) policy."""
        return policy if self.model is None else self.model

    def head(self, policy: torch.nn.Module, transform: LogitTransform) -> LMHead:
        """The LM head the teacher's hidden states are scored with."""
        return lm_head(causal_lm(self.trainer.accelerator, self.module(policy)), transform)

    def hidden_size(self, policy: torch.nn.Module) -> int:
        return causal_lm(self.trainer.accelerator, self.module(policy)).config.get_text_config().hidden_size

    def hidden(self, policy: torch.nn.Module, inputs: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
        """`(R, C, H)` teacher hidden states predicting the completion tokens of `rows`.

        The input is the teacher prompt followed by the student's completion ids unchanged (SPEC 1). Dropout is off
        (eval flags) so the teacher's distribution does not depend on a dropout draw. Positions count from each row's
        first real token, so the teacher prompt's left padding does not shift them (it would for absolute-position
        models such as GPT-2; the student forward keeps GRPOTrainer's, which passes no positions).
        """
        trainer = self.trainer
        teacher = self.module(policy)
        completion_ids, completion_mask = inputs["completion_ids"][rows], inputs["completion_mask"][rows]
        ids = torch.cat([inputs["teacher_prompt_ids"][rows], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["teacher_prompt_mask"][rows], completion_mask], dim=1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        with (
            torch.no_grad(),
            self.adapter(policy),
            inference_flags(teacher),  # no model-wide mode switch: it re-kernelizes (modes.py)
            capture_hidden(causal_lm(trainer.accelerator, teacher)) as captured,
            trainer.accelerator.autocast(),
        ):
            # Only the hidden states are needed: keep one logit row instead of projecting every position.
            teacher(
                input_ids=ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=1,
            )
        return completion_hidden(captured, completion_ids.size(1))

    def save(self, folder: str) -> None:
        """Write the teacher's state into checkpoint folder `folder` (nothing to write by default)."""

    def load(self, checkpoint: str) -> None:
        """Restore the teacher's state from `checkpoint`, on resume (nothing to restore by default)."""

    def _frozen_copy(self) -> torch.nn.Module:
        """A frozen copy of the initial weights, built from the checkpoint like TRL's reference model: under ZeRO-3 a
        deep copy would clone empty shards."""
        trainer = self.trainer
        model_init_kwargs = dict(trainer.args.model_init_kwargs or {})
        if trainer.args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            model_init_kwargs["device_map"] = None
        model_init_kwargs.setdefault("dtype", trainer.model.dtype)
        teacher = create_model_from_path(get_config_model_id(trainer.model.config), **model_init_kwargs)
        teacher.requires_grad_(False)
        teacher.eval()
        if trainer.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, trainer.accelerator)
        if trainer.is_fsdp_enabled:
            return prepare_fsdp(teacher, trainer.accelerator)
        return trainer.accelerator.prepare_model(teacher, evaluation_mode=True)


TEACHER_KINDS: dict[str, type[Teacher]] = {}


def register_teacher_kind(cls: type[Teacher]) -> type[Teacher]:
    """Class decorator: register `cls` under `cls.kind` as a value of `teacher_model_kind`."""
    if not cls.kind or cls.kind in TEACHER_KINDS:
        raise ValueError(f"A teacher kind needs a new, non-empty `kind`; got {cls.kind!r}.")
    TEACHER_KINDS[cls.kind] = cls
    return cls


def build_teacher(trainer: GRPOTrainer) -> Teacher:
    """The teacher of `trainer.args.teacher_model_kind`, set up; the policy (`live`) when the method has no teacher."""
    kind = trainer.args.teacher_model_kind if trainer.args.needs_teacher else "live"
    teacher = TEACHER_KINDS[kind](trainer)
    teacher.setup()
    return teacher


@register_teacher_kind
class LiveTeacher(Teacher):
    """`live`: the current policy (the paper's SDPG), with its adapter when it has one."""

    kind = "live"


@register_teacher_kind
class BaseTeacher(Teacher):
    """`base`: the initial weights: the adapter switched off (PEFT), the reference model, or a frozen copy."""

    kind = "base"
    needs_initial_weights = True

    def setup(self) -> None:
        trainer = self.trainer
        if is_peft_model(trainer.model):
            return
        if trainer.ref_model is not None and not trainer.args.sync_ref_model:
            self.model = trainer.ref_model
        else:
            self.model = self._frozen_copy()

    def adapter(self, policy: torch.nn.Module) -> AbstractContextManager:
        unwrapped = self.trainer.accelerator.unwrap_model(policy)
        return use_adapter(unwrapped, None) if self.model is None and is_peft_model(unwrapped) else nullcontext()


@register_teacher_kind
class EmaTeacher(Teacher):
    """`ema`: an exponential moving average of the policy: with pure LoRA a second adapter (TRL's
    `PEFTAdapterEMACallback`, `callback`), otherwise a copy of the weights (TRL's `SyncTeacherModelCallback`)."""

    kind = "ema"
    needs_initial_weights = True

    @classmethod
    def check_peft_config(cls, peft_config: Any) -> None:
        # What the config shows of TRL's `is_pure_lora_training`, which `setup` checks again on the loaded model.
        if peft_config is None:
            return
        trains = {
            "a non-LoRA adapter": str(peft_config.peft_type).split(".")[-1] != "LORA",
            "modules_to_save": bool(getattr(peft_config, "modules_to_save", None)),
            f"bias={getattr(peft_config, 'bias', 'none')!r}": getattr(peft_config, "bias", "none") != "none",
            "trainable_token_indices": bool(getattr(peft_config, "trainable_token_indices", None)),
        }
        extra = [what for what, present in trains.items() if present]
        if extra:
            raise ValueError(
                f"SDPGConfig.teacher_model_kind='ema' with PEFT needs pure LoRA training (its EMA is a second LoRA "
                f"adapter), and peft_config trains {', '.join(extra)} too. Use a plain LoRA config, or another "
                "teacher kind."
            )

    def setup(self) -> None:
        trainer, args = self.trainer, self.trainer.args
        self.callback = None  # with LoRA: TRL's callback, whose state a resume restores
        if is_peft_model(trainer.model):
            if not _trl_compat.is_pure_lora_training(trainer.model):
                raise ValueError("SDPGConfig.teacher_model_kind='ema' with PEFT needs pure LoRA training.")
            self.callback = _trl_compat.PEFTAdapterEMACallback(
                trainer.model,
                teacher_adapter_name=EMA_ADAPTER_NAME,
                update_rate=args.teacher_update_rate,
                sync_steps=args.teacher_sync_steps,
                accelerator=trainer.accelerator,
            )
            trainer.add_callback(self.callback)
            return
        self.model = self._frozen_copy()
        sync = _trl_compat.SyncTeacherModelCallback(teacher_model=self.model, accelerator=trainer.accelerator)
        trainer.add_callback(sync)

    def adapter(self, policy: torch.nn.Module) -> AbstractContextManager:
        unwrapped = self.trainer.accelerator.unwrap_model(policy)
        if self.model is None and is_peft_model(unwrapped):
            return use_adapter(unwrapped, EMA_ADAPTER_NAME)
        return nullcontext()

    def save(self, folder: str) -> None:
        """The EMA teacher's weights into a checkpoint folder, when it is a full copy (a LoRA EMA teacher is the
        `sdpg_ema_teacher` adapter, which PEFT saves with the policy's)."""
        trainer = self.trainer
        if self.model is None:
            return
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            logger.warning(
                "The EMA teacher (teacher_model_kind='ema') is not saved in %s under DeepSpeed or FSDP, whose sharded "
                "weights it does not gather: a run resumed from it restarts the EMA teacher from the initial weights.",
                folder,
            )
            return
        teacher = trainer.accelerator.unwrap_model(self.model)
        torch.save(teacher.state_dict(), os.path.join(folder, EMA_TEACHER_NAME))

    def load(self, checkpoint: str) -> None:
        """Restore the EMA teacher a checkpoint holds, so that the resumed run continues the uninterrupted one."""
        if self.callback is not None:
            self._load_adapter(checkpoint)
            return
        trainer = self.trainer
        if self.model is None or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            return
        path = os.path.join(checkpoint, EMA_TEACHER_NAME)
        if not os.path.isfile(path):
            logger.warning(
                "%s has no %s (it was written by an older sdpg-trl): the resumed run restarts the EMA teacher from "
                "the initial weights.",
                checkpoint,
                EMA_TEACHER_NAME,
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        trainer.accelerator.unwrap_model(self.model).load_state_dict(state)

    def _load_adapter(self, checkpoint: str) -> None:
        # transformers loaded the checkpoint's `sdpg_ema_teacher` adapter: TRL's callback adopts it as its EMA state
        # instead of adding a zero adapter of that name at `on_train_begin` (which PEFT would refuse).
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if EMA_ADAPTER_NAME not in model.peft_config:
            logger.warning(
                "%s has no %r adapter: the resumed run restarts the LoRA EMA teacher from zero.",
                checkpoint,
                EMA_ADAPTER_NAME,
            )
            return
        weights = get_peft_model_state_dict(model, adapter_name=EMA_ADAPTER_NAME)
        self.callback.shadow_weights = {name: value.detach().clone() for name, value in weights.items()}
        self.callback.teacher_adapter_config = model.peft_config[EMA_ADAPTER_NAME]
        self.callback._initialized = True
