"""Exact resume: what SDPG adds to a checkpoint, which checkpoint `resume_from_checkpoint=True` takes, and what a
resume refuses.

Each checkpoint folder gets, before transformers writes the model and, last, `trainer_state.json`:
- `sdpg_settings.json`: the settings that define the objective (`loss_settings`). A resume with other values is
  refused, naming each field that changed, since it would train on silently with another loss.
- whatever the teacher kind keeps (`teachers.Teacher.save`): with `teacher_model_kind: ema` and a full copy of the
  weights, `sdpg_ema_teacher.pt`, the EMA teacher's weights (with LoRA the EMA teacher is the `sdpg_ema_teacher`
  adapter, which PEFT saves with the policy's).

A folder without a readable `trainer_state.json` was not completely written (the run stopped while saving it);
`last_complete_checkpoint` skips it with a warning instead of resuming from it. `resolve_checkpoint` reads what
`resume_from_checkpoint` names (`true`, a checkpoint, or a run folder), and `check_resumable` refuses a checkpoint
with an unreadable file and warns about one without the optimizer, scheduler or RNG state an exact resume needs.

`hold_output_dir` is the output folder's lock: one run at a time writes into it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from safetensors import safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig

from .config import SDPGConfig
from .losses import ANCHOR_ESTIMATORS, LOSS_TYPES

logger = logging.getLogger(__name__)

SETTINGS_NAME = "sdpg_settings.json"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers writes it last into a checkpoint folder
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
LOCK_NAME = "_sdpg_train.lock"  # in output_dir, held (flock) by the run writing there; "_*" is not pushed to the Hub
# What an exact resume restores besides the weights, as transformers' Trainer names it in a checkpoint: each is found
# as one of these files (single process), or these patterns (several processes, FSDP's and DeepSpeed's folders).
_RESUME_STATE = {
    "the optimizer state": ("optimizer.pt", r"optimizer_\d+|global_step\d+|optimizer\.bin"),
    "the learning-rate scheduler": ("scheduler.pt", r"scheduler\.pt"),
    "the random-number generators": ("rng_state.pth", r"rng_state_\d+\.pth"),
}

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


def _checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """The `checkpoint-<step>` folders of `output_dir` (none if it is not a folder), as (step, path)."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return found


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-<step>` folder of `output_dir` that was completely written, or None.

    Newer folders that were not (a run stopped while saving) are skipped with a warning naming each.
    """
    for _, folder in sorted(_checkpoint_folders(output_dir), reverse=True):
        if is_complete(folder):
            return folder
        logger.warning(
            "Not resuming from %s: it has no readable %s, so it was not completely written (the run probably "
            "stopped while saving it). Resuming from the last complete checkpoint instead.",
            folder,
            TRAINER_STATE_NAME,
        )
    return None


def resume_argument(value: str | bool | None) -> str | bool | None:
    """`resume_from_checkpoint` as YAML and the command line give it: `true`/`True` (text, from a flag) is True,
    `false`/`none` and the empty text are None, anything else a path."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "none", ""):
        return True if value.strip().lower() == "true" else None
    return value or None


def resolve_checkpoint(value: str | bool | os.PathLike | None, output_dir: str) -> str | None:
    """The checkpoint folder `resume_from_checkpoint` names, or None for a fresh run.

    `True` (or `"true"`) takes the last complete checkpoint of `output_dir`; a run folder (one holding
    `checkpoint-<step>` folders, such as an earlier run's `output_dir`) its last complete one, said in the log. A path
    that does not exist, or a run folder without a complete checkpoint, is refused here, before any model loads.
    """
    value = resume_argument(os.fspath(value) if isinstance(value, os.PathLike) else value)
    if value is None:
        return None
    if value is True:
        folder = last_complete_checkpoint(output_dir)
        if folder is None:
            raise ValueError(
                f"resume_from_checkpoint=True, but output_dir ({output_dir}) has no completely written checkpoint "
                "folder."
            )
        return folder
    if not os.path.exists(value):
        raise FileNotFoundError(
            f"resume_from_checkpoint {value!r} does not exist. Give a checkpoint folder (<output_dir>/checkpoint-"
            "<step>), or true to resume from the last complete checkpoint of output_dir."
        )
    if _checkpoint_folders(value):
        folder = last_complete_checkpoint(value)
        if folder is None:
            names = sorted(os.path.basename(path) for _, path in _checkpoint_folders(value))
            raise ValueError(
                f"resume_from_checkpoint {value!r} is a run folder, and none of its checkpoint folders ({names}) was "
                "completely written. Start a new run, or pass a checkpoint."
            )
        logger.info(
            "resume_from_checkpoint %s is a run folder: resuming from its last complete checkpoint, %s.", value, folder
        )
        return folder
    return value


def _unreadable(path: str) -> str | None:
    """Why the checkpoint file `path` cannot be read back (cut short: a kill or a full disk while writing or copying
    it), or None. Only the structure is read: a safetensors header and its data size, a torch zip's directory (at its
    end), a JSON document."""
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                f.keys()
        elif path.endswith((".pt", ".pth", ".bin")):
            with zipfile.ZipFile(path):  # torch.save's format since torch 1.6
                pass
        elif path.endswith(".json"):
            with open(path) as f:
                json.load(f)
    except Exception as err:  # each library has its own error types for a cut file
        return f"{type(err).__name__}: {err}"
    return None


def check_resumable(folder: str, args: SDPGConfig) -> None:
    """Refuse to resume from `folder` when it is incomplete, has an unreadable file, or was trained with other loss
    settings than `args`; warn when it lacks state an exact resume restores (the run resumes, not exactly)."""
    named = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(folder)))
    if not named and not os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
        raise ValueError(
            f"Cannot resume from {folder}: it is not a checkpoint folder (no {TRAINER_STATE_NAME}). Pass a "
            f"{PREFIX_CHECKPOINT_DIR}-<step> folder of a run, its output_dir, or true (the last complete checkpoint "
            "of output_dir)."
        )
    if not is_complete(folder):
        raise ValueError(
            f"Cannot resume from {folder}: it has no readable {TRAINER_STATE_NAME}, so it was not completely written "
            "(the run probably stopped while saving it). Resume from an earlier checkpoint, or pass "
            "resume_from_checkpoint=True to take the last complete one."
        )
    for name in sorted(os.listdir(folder)):
        why = _unreadable(os.path.join(folder, name)) if os.path.isfile(os.path.join(folder, name)) else None
        if why:
            raise ValueError(
                f"Cannot resume from {folder}: its {name} cannot be read ({why}); the file was cut short while it was "
                "written or copied. Resume from an earlier checkpoint of the run."
            )
    names = os.listdir(folder)
    for what, (file, pattern) in _RESUME_STATE.items():
        if file not in names and not any(re.fullmatch(pattern, n) for n in names):
            logger.warning_once(
                f"RESUME NOT EXACT: {folder} has no {file}, so {what} starts afresh and the resumed run will not "
                "continue the uninterrupted one exactly (a checkpoint saved with save_only_model, or a file lost "
                "when it was copied). Resume from a checkpoint that has it for an exact resume."
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


def resolve_resume(resume_from_checkpoint: str | os.PathLike | bool | None, args: SDPGConfig) -> str | None:
    """`Trainer.train`'s `resume_from_checkpoint`, checked: the folder `resolve_checkpoint` finds (`True` or a run
    folder becomes its last *complete* checkpoint), refused when it is incomplete, has an unreadable file, or was
    trained with other loss settings than `args` (`loss_settings`), with an error naming what differs."""
    folder = resolve_checkpoint(resume_from_checkpoint, args.output_dir)
    if folder is not None:
        check_resumable(folder, args)
    return folder


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


def is_finished(folder: str, args: SDPGConfig) -> bool:
    """Whether the checkpoint `folder` is already at the end of the run `args` describes: `max_steps` reached, or
    without `max_steps`, `num_train_epochs` (Trainer would train one more step past it)."""
    with open(os.path.join(folder, TRAINER_STATE_NAME)) as f:
        state = json.load(f)
    if args.max_steps > 0:
        return state.get("global_step", 0) >= args.max_steps
    return (state.get("epoch") or 0) >= args.num_train_epochs


@contextmanager
def hold_output_dir(output_dir: str) -> Iterator[None]:
    """Hold `output_dir` for this run: it must be writable (the model is saved there at the end, whatever
    `save_strategy`), and no other run may be writing into it.

    The lock is an exclusive `flock` on `output_dir/_sdpg_train.lock`, which the operating system releases when the
    process ends, however it ends: a killed run never leaves the folder locked. Only the main process (`RANK` 0)
    takes it; the file also holds that process's id, for the error of a second run.
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
        fd = os.open(os.path.join(output_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise PermissionError(
            f"output_dir {output_dir} is not writable ({err}); the run saves its checkpoints and model there. Give "
            "an output_dir it can write to."
        ) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            raise RuntimeError(
                f"output_dir {output_dir} is in use by another run (process {holder}), which would overwrite this "
                "run's checkpoints and model. Give another output_dir, or wait for that run to end."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock
