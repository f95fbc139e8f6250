"""The privileged teacher's prompt (SPEC 1): the student prompt with the privileged context appended.

The teacher's full input is this prompt followed by the student's completion token ids unchanged; the trainer
tokenises the prompt with the same chat template as the student's and never re-tokenises the completion.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ._trl_compat import pad
from .config import template_fields


def build_teacher_prompt(
    prompt: str | list[dict[str, Any]], context: Any, template: str, column: str, row: str = "A row"
) -> Any:
    """Student prompt + `template.format(context=context)`.

    Conversational prompts (a list of messages) get the hint appended to their last user message, so the chat
    template still closes the turn and opens the assistant's; plain-text prompts get it appended to the text.

    Args:
        prompt: the row's `prompt` (text or messages); not modified.
        context: the row's privileged context.
        template: `SDPGConfig.teacher_template`, containing `{context}`.
        column: the context column's name, for the error message.
        row: which row this is, for the error message (e.g. "train_dataset row 3").
    """
    check_prompt_type(prompt, row)
    if context is not None and not isinstance(context, str):
        raise TypeError(
            f"{row} has a privileged context of type {type(context).__name__} in column {column!r} "
            f"(SDPGConfig.context_column): {_preview(context)}; the context is text. Convert the column first, e.g. "
            f"dataset.map(lambda row: {{{column!r}: str(row[{column!r}])}}), or name a text column as context_column."
        )
    if context is None or not context.strip():
        raise ValueError(
            f"{row} has no privileged context in column {column!r} (SDPGConfig.context_column): {context!r}."
        )
    if not isinstance(prompt, str) and not any(_role(message) == "user" for message in prompt):
        raise ValueError(
            f"{row} has a conversational prompt without a user message, which the privileged hint is appended to "
            f"(its roles: {[_role(message) for message in prompt]})."
        )
    return _append_hint(prompt, template.format(context=context))


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _preview(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _append_hint(prompt: str | list[dict[str, Any]], hint: str) -> Any:
    if isinstance(prompt, str):
        return prompt + hint
    last_user = max(i for i, message in enumerate(prompt) if _role(message) == "user")
    message = prompt[last_user]
    content = message["content"]
    content = content + hint if isinstance(content, str) else [*content, {"type": "text", "text": hint}]
    return [*prompt[:last_user], {**message, "content": content}, *prompt[last_user + 1 :]]


def describe_row(index: int, row: dict[str, Any], where: str) -> str:
    """How an error names a row that has no dataset index (a streamed dataset): its position and its prompt."""
    return f"Row {index} of {where} (prompt {_preview(row.get('prompt'), 80)})"


def missing_column(where: str, role: str, column: str, columns: Any, hint: str = "") -> ValueError:
    """The one wording of a missing column, for datasets, splits and rows alike: the place, the column's role and
    name, and the columns there are."""
    return ValueError(f"{where} has no {role} column {column!r}; its columns are {list(columns)}.{hint}")


def check_prompt_type(prompt: Any, row: str) -> None:
    """Refuse a prompt that is neither text nor a list of chat messages (e.g. None), naming the row."""
    if not isinstance(prompt, (str, list)):
        raise TypeError(
            f"{row} has a prompt of type {type(prompt).__name__} ({_preview(prompt)}): a prompt is text or a list of "
            "chat messages. Fix or drop the row (e.g. dataset.filter(lambda row: row['prompt'] is not None))."
        )


def check_prompt_column(row: dict[str, Any], row_name: str) -> None:
    """Refuse a row without a `prompt`, or whose prompt is not text or chat messages, naming it."""
    if "prompt" not in row:
        raise missing_column(row_name, "prompt", "prompt", sorted(row))
    check_prompt_type(row["prompt"], row_name)


def default_teacher_prompt_length(
    max_positions: int | None, max_completion_length: int, max_model_length: int | None = None
) -> int | None:
    """The default `max_teacher_prompt_length`: the student's own sequence limit, within the model's positions.

    The student's sequences (prompt + completion) are at most `max_model_length` tokens when vLLM generates them
    (`vllm_max_model_length`), else `max_positions` (`max_position_embeddings`); its prompts are at most that minus
    `max_completion_length`. A teacher prompt is the student prompt plus the filled template, so the cap leaves room
    for the student's longest prompt and a privileged context as long as its longest completion (a worked solution
    of the problem, which is what a completion is): `(limit - max_completion_length) + max_completion_length`, the
    limit itself. With the completion the teacher's sequences are then at most `max_completion_length` tokens longer
    than the student's, and never longer than the positions: the cap is at most `max_positions -
    max_completion_length`. On the Qwen3-4B recipes (6,144-token vLLM limit, 4,096 completion tokens, 40,960
    positions) that is 6,144 (2,048 of prompt and 4,096 of context) instead of 36,864. None: no limit known.
    """
    limit = max_model_length or max_positions
    if max_positions is None:
        return limit
    room = max_positions - max_completion_length
    if room < 1:
        raise ValueError(
            f"SDPGConfig.max_completion_length ({max_completion_length}) leaves no room for a teacher prompt within "
            f"the model's max_position_embeddings ({max_positions})."
        )
    return min(limit, room)


def fit_teacher_prompts(
    teacher_prompts: list[Any],
    prompts: list[Any],
    contexts: list[str],
    template: str,
    *,
    tokenize: Callable[[list[Any]], list[list[int]]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    side: str,
) -> tuple[list[list[int]], list[bool], list[bool]]:
    """Token ids of each row's teacher prompt, at most `max_length` long (`SDPGConfig.max_teacher_prompt_length`).

    A prompt that is too long keeps the student prompt and the template whole and loses privileged-context tokens
    from `side` ("left": the context's beginning, "right": its end). A row whose prompt is too long even with an
    empty context cannot be scored: it gets no ids. Decoding a cut context and tokenising it again inside the prompt
    can merge tokens differently, so each row is re-measured and cut further until it fits.

    Args:
        teacher_prompts: `build_teacher_prompt` of each row (which validates the row).
        prompts: the student prompts (text or messages). contexts: their privileged contexts.
        template: `SDPGConfig.teacher_template`.
        tokenize: the trainer's prompt tokenisation (chat template included) of a whole batch of prompts.
        tokenizer: the text tokenizer, to count and cut the context's own tokens.
    Returns: the ids (`[]` for a row that cannot fit), whether each row fits, whether its context was cut.
    """
    ids = tokenize(teacher_prompts)
    fits = [True] * len(ids)
    over = [i for i, x in enumerate(ids) if max_length is not None and len(x) > max_length]
    if not over:
        return ids, fits, [False] * len(ids)
    bare = tokenize([_append_hint(p, template.format(context="")) for p in prompts])
    keep = {}  # row -> how many context tokens to try next
    context_ids = {}
    for i in over:
        if len(bare[i]) > max_length:
            fits[i] = False
            continue
        context_ids[i] = tokenizer(contexts[i], add_special_tokens=False)["input_ids"]
        keep[i] = len(context_ids[i]) - (len(ids[i]) - max_length)
    while keep:  # every round shortens each pending row by at least one token, so this ends
        for i in [i for i, k in keep.items() if k < 1]:  # nothing of the context would be left
            fits[i] = False
            del keep[i]
        candidates = list(teacher_prompts)
        for i, k in keep.items():
            kept = context_ids[i][-k:] if side == "left" else context_ids[i][:k]
            candidates[i] = _append_hint(prompts[i], template.format(context=tokenizer.decode(kept)))
        measured = tokenize(candidates) if keep else []
        for i in list(keep):
            if len(measured[i]) <= max_length:
                ids[i] = measured[i]
                del keep[i]
            else:
                keep[i] -= len(measured[i]) - max_length
    for i in over:
        if not fits[i]:
            ids[i] = []
    return ids, fits, [i in over and fits[i] for i in range(len(ids))]


def check_dataset(
    dataset: Any, name: str, context_column: str | None = None, template: str = "{context}", why: str | None = None
) -> None:
    """Fail before training, naming the row, when `dataset` cannot be trained on.

    Every dataset needs a `prompt` column; with a teacher (`context_column` given) also the context column, a
    non-empty context in every row and a user message in every conversational prompt. A map-style `Dataset` has
    every row checked now; a streamed one has its columns checked when they are known, and its rows as they arrive
    (`SDPGTrainer._generate_and_score_completions`).

    Args:
        dataset: a Dataset, an IterableDataset, a dict of them, or None.
        name: how errors name it ("train_dataset").
        context_column: `SDPGConfig.context_column`, or None for a method without a teacher.
        template: `SDPGConfig.teacher_template`.
        why: the sentence the error adds when the context column is missing (default: which setting names it).
    """
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for split, part in dataset.items():
            check_dataset(part, f"{name}[{split!r}]", context_column, template, why)
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None and isinstance(dataset, Sized) and len(dataset) > 0:
        columns = list(dataset[0])
    if columns is not None and "prompt" not in columns:
        raise missing_column(name, "prompt", "prompt", columns)
    if context_column is None:
        if isinstance(dataset, Dataset):
            for index, prompt in enumerate(dataset["prompt"]):
                check_prompt_type(prompt, f"{name} row {index}")
        return
    if columns is not None and context_column not in columns:
        why = why or "The column is named by SDPGConfig.context_column (sdpg-evaluate: --context_column)"
        raise missing_column(name, "privileged-context", context_column, columns, f" {why}.")
    if isinstance(dataset, Dataset):  # map-style: cheap to check every row now rather than mid-training
        for index, (prompt, context) in enumerate(zip(dataset["prompt"], dataset[context_column])):
            build_teacher_prompt(prompt, context, template, context_column, row=f"{name} row {index}")


def teacher_view_dataset(dataset: Dataset, template: str, column: str, name: str = "dataset") -> Dataset:
    """`dataset` as the teacher sees it: each row's `prompt` replaced by `build_teacher_prompt` of that row.

    Every other column is kept, so the answer the verifier reads is unchanged. `template` and the context column are
    checked on every row first, so a wrong column fails here, naming `name`, not halfway through an evaluation.
    """
    fields = template_fields(template)  # ValueError on unbalanced braces
    if fields != {"context"}:
        raise ValueError(
            f"The teacher template must contain {{context}} and no other placeholder (write literal braces as {{{{ "
            f"and }}}}); its placeholders are {sorted(fields)}: {template!r}."
        )
    check_dataset(dataset, name, column, template)
    return dataset.map(
        lambda row: {"prompt": build_teacher_prompt(row["prompt"], row[column], template, column)},
        desc="teacher prompts",
    )


def context_token_mask(
    completion_ids: torch.Tensor, contexts: list[Any], tokenizer: PreTrainedTokenizerBase
) -> torch.Tensor:
    """`(B, T)` bool: which completion tokens also occur in their row's privileged context.

    The context is tokenised on its own and after a space (BPE vocabularies spell a word differently there), and
    a completion token counts when its id is among either's. The share of the distillation KL on these tokens is the
    leakage signal: a teacher that only pushes the answer's digits teaches the student to guess.
    """
    mask = torch.zeros_like(completion_ids, dtype=torch.bool)
    for row, context in enumerate(contexts):
        if not isinstance(context, str):
            continue
        ids = {i for text in (context, " " + context) for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
        mask[row] = torch.isin(completion_ids[row], torch.tensor(sorted(ids), device=completion_ids.device))
    return mask


def teacher_prompt_inputs(
    teacher_ids: list[list[int]],
    fits: list[bool],
    *,
    pad_id: int,
    pad_to_multiple_of: int | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The batch's teacher prompts as GRPOTrainer pads its prompts (left): `teacher_prompt_ids`, `teacher_prompt_mask`
    (all 0 for a row that does not fit) and `teacher_prompt_fits` `(B,)`. A row without ids gets one pad token."""
    ids = [torch.tensor(list(row) or [pad_id], dtype=torch.long) for row in teacher_ids]
    masks = [torch.full_like(row, int(ok)) for row, ok in zip(ids, fits)]
    left = dict(padding_side="left", pad_to_multiple_of=pad_to_multiple_of)
    return {
        "teacher_prompt_ids": pad(ids, padding_value=pad_id, **left).to(device),
        "teacher_prompt_mask": pad(masks, padding_value=0, **left).to(device),
        "teacher_prompt_fits": torch.tensor(fits, device=device),
    }
