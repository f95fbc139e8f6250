"""Exact resume: what SDPG adds to a checkpoint, which checkpoint `resume_from_checkpoint=True` takes, and what a
resume refuses.

Each checkpoint folder gets, before transformers writes the model and, last, `trainer_state.json`:
- `sdpg_settings.json`: the settings that define the objective (`loss_settings`). A resume with other values is
  refused, naming each field that changed, since it would train on silently with another loss.
- whatever the teacher kind keeps (`teachers.Teacher.save`): with `teacher_model_kind: ema` and a full copy of the
  weights, `sdpg_ema_teacher.pt`, the EMA teacher's weights (with LoRA the EMA teacher is the `sdpg_ema_teacher`
  adapter, which PEFT saves with the policy's).

A folder without a readable `trainer_state.json` was not completely written (the run stopped while saving it);
`last_complete_checkpoint` skips it with a warning instead of resuming from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig

from .config import SDPGConfig
from .losses import ANCHOR_ESTIMATORS, LOSS_TYPES

logger = logging.getLogger(__name__)

SETTINGS_NAME = "sdpg_settings.json"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers writes it last into a checkpoint folder

# SDPG's own fields that do not change what is optimised (logging, memory, the skip guard's patience).
_OPERATIONAL_FIELDS = frozenset({"max_consecutive_skipped_steps", "log_term_grad_norms", "distill_chunk_size"})
# GRPOConfig's fields that shape every outcome term, the anchor, the advantages or the generation cycle; the fields
# each registered loss type and anchor estimator reads are added from the registries (`loss_shaping_fields`).
_GRPO_LOSS_FIELDS = (
    "beta",
    "loss_type",
    "importance_sampling_level",
    "temperature",
    "num_generations",
    "scale_rewards",
    "reward_weights",
    "top_entropy_quantile",
    "off_policy_mask_threshold",
    "use_bias_correction_kl",
    "num_iterations",
    "steps_per_generation",
)


def loss_shaping_fields() -> tuple[str, ...]:
    """GRPO's fields that shape the loss: `_GRPO_LOSS_FIELDS` and every field a registered loss type or anchor
    estimator declares it reads (`losses.LOSS_TYPES`, `losses.ANCHOR_ESTIMATORS`)."""
    registered = [name for entry in (*LOSS_TYPES.values(), *ANCHOR_ESTIMATORS.values()) for name in entry.reads]
    return tuple(dict.fromkeys([*_GRPO_LOSS_FIELDS, *registered]))


def loss_settings(args: SDPGConfig) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint: every field SDPGConfig adds to GRPOConfig (the
    method, the coefficients and schedules, the teacher) except the operational ones, and GRPO's loss fields."""
    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    names = [f.name for f in dataclasses.fields(SDPGConfig) if f.name not in grpo_fields | _OPERATIONAL_FIELDS]
    # Through JSON, so that the values compare as they are read back (tuples become lists).
    return json.loads(json.dumps({name: getattr(args, name) for name in [*names, *loss_shaping_fields()]}))


def write_settings(folder: str, args: SDPGConfig) -> None:
    with open(os.path.join(folder, SETTINGS_NAME), "w") as f:
        json.dump(loss_settings(args), f, indent=2, sort_keys=True)


def is_complete(folder: str) -> bool:
    """Whether transformers finished writing this checkpoint: its last file, `trainer_state.json`, is readable."""
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME)) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-<step>` folder of `output_dir` that was completely written, or None.

    Newer folders that were not (a run stopped while saving) are skipped with a warning naming each.
    """
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = pattern.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, folder in sorted(found, reverse=True):
        if is_complete(folder):
            return folder
        logger.warning(
            "Not resuming from %s: it has no readable %s, so it was not completely written (the run probably "
            "stopped while saving it). Resuming from the last complete checkpoint instead.",
            folder,
            TRAINER_STATE_NAME,
        )
    return None


def check_resumable(folder: str, args: SDPGConfig) -> None:
    """Refuse to resume from `folder` when it is incomplete, or was trained with other loss settings than `args`."""
    if not is_complete(folder):
        raise ValueError(
            f"Cannot resume from {folder}: it has no readable {TRAINER_STATE_NAME}, so it was not completely written "
            "(the run probably stopped while saving it). Resume from an earlier checkpoint, or pass "
            "resume_from_checkpoint=True to take the last complete one."
        )
    path = os.path.join(folder, SETTINGS_NAME)
    if not os.path.isfile(path):
        logger.warning(
            "%s has no %s (it was written by an older sdpg-trl): whether this run has the checkpoint's method and "
            "loss settings cannot be checked.",
            folder,
            SETTINGS_NAME,
        )
        return
    with open(path) as f:
        saved = json.load(f)
    current = loss_settings(args)
    changed = [
        f"{name}: {value!r} -> {current.get(name)!r}"
        for name, value in sorted(saved.items())
        if value != current.get(name)
    ]
    if changed:
        raise ValueError(
            f"Cannot resume from {folder} with other settings than it was trained with (checkpoint -> this run): "
            f"{'; '.join(changed)}. Resume with the checkpoint's settings ({path}), or start a new run from its "
            f"weights (model_name_or_path={folder}) to train with these."
        )


def resolve_resume(resume_from_checkpoint: str | os.PathLike | bool | None, args: SDPGConfig) -> Any:
    """`Trainer.train`'s `resume_from_checkpoint`, checked: `True` becomes the last *complete* checkpoint in
    `output_dir` (an error when there is none), and a folder that is incomplete, or was trained with other loss
    settings than `args` (`loss_settings`), is refused with an error naming what differs."""
    if resume_from_checkpoint is True:
        resume_from_checkpoint = last_complete_checkpoint(args.output_dir)
        if resume_from_checkpoint is None:
            raise ValueError(
                f"resume_from_checkpoint=True, but output_dir ({args.output_dir}) has no completely written "
                "checkpoint folder."
            )
    if isinstance(resume_from_checkpoint, str | os.PathLike):
        check_resumable(os.fspath(resume_from_checkpoint), args)
    return resume_from_checkpoint


def at_cycle_end(global_step: int, args: SDPGConfig) -> bool:
    """Whether a checkpoint at `global_step` resumes exactly; warns when not. A resume restarts GRPOTrainer's
    generation cycle, so only a checkpoint at a cycle's end resumes exactly."""
    cycle = args.generation_cycle_steps
    if global_step % cycle == 0:
        return True
    logger.warning(
        "SDPG did not save a checkpoint at step %d: it falls inside a generation cycle of %d optimizer steps "
        "(steps_per_generation x num_iterations), and resuming from it would generate again mid-cycle and "
        "replay prompts. Checkpoints are written at multiples of %d steps.",
        global_step,
        cycle,
        cycle,
    )
    return False
