"""The privileged teacher's prompt (SPEC 1): the student prompt with the privileged context appended.

The teacher's full input is this prompt followed by the student's completion token ids unchanged; the trainer
tokenises the prompt with the same chat template as the student's and never re-tokenises the completion.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .config import template_fields


def build_teacher_prompt(prompt: str | list[dict[str, Any]], context: Any, template: str, column: str) -> Any:
    """Student prompt + `template.format(context=context)`.

    Conversational prompts (a list of messages) get the hint appended to their last user message, so the chat
    template still closes the turn and opens the assistant's; plain-text prompts get it appended to the text.

    Args:
        prompt: the row's `prompt` (text or messages); not modified.
        context: the row's privileged context.
        template: `SDPGConfig.teacher_template`, containing `{context}`.
        column: the context column's name, for the error message.
    """
    if not isinstance(context, str) or not context.strip():
        raise ValueError(
            f"Every row needs a non-empty string in the privileged-context column {column!r}; got {context!r}."
        )
    hint = template.format(context=context)
    if isinstance(prompt, str):
        return prompt + hint
    last_user = max((i for i, message in enumerate(prompt) if message["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("A conversational prompt needs a user message to carry the privileged hint.")
    message = prompt[last_user]
    content = message["content"]
    content = content + hint if isinstance(content, str) else [*content, {"type": "text", "text": hint}]
    return [*prompt[:last_user], {**message, "content": content}, *prompt[last_user + 1 :]]


def check_context_column(dataset: Any, column: str, name: str) -> None:
    """Fail before training when `dataset` (a Dataset, IterableDataset or dict of them) lacks `column`."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for split, part in dataset.items():
            check_context_column(part, column, f"{name}[{split!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None and isinstance(dataset, Sized) and len(dataset) > 0:
        columns = list(dataset[0])
    if columns is not None and column not in columns:
        raise ValueError(
            f"{name} has no privileged-context column {column!r} (SDPGConfig.context_column, or "
            f"sdpg-evaluate's --context_column); "
            f"its columns are {list(columns)}."
        )
    if isinstance(dataset, Dataset):  # map-style: cheap to check every value now rather than mid-training
        for index, context in enumerate(dataset[column]):
            if not isinstance(context, str) or not context.strip():
                raise ValueError(
                    f"{name} row {index} has no privileged context in column {column!r}: {context!r}."
                )


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
    check_context_column(dataset, column, name)
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
