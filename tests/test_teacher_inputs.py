"""Teacher inputs that cannot be silently wrong (issue 10, section 2): the length policy, positions, data errors."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from test_trainer import make_args, parity_reward

from sdpg_trl import SDPGTrainer

TEMPLATE = " hint : {context}"
CAP = 30
CONTEXT = " ".join(str(i % 10) for i in range(40))  # 40 tokens: too long for CAP with any prompt
ROWS = [
    {"prompt": [{"role": "user", "content": "what is 1 plus 2 ?"}], "privileged_context": "the answer is 3 ."},
    {"prompt": [{"role": "user", "content": "what is 4 plus 5 ?"}], "privileged_context": CONTEXT},
    # the problem alone is longer than CAP
    {"prompt": [{"role": "user", "content": "what is " + "1 plus " * 20 + "2 ?"}], "privileged_context": "3"},
]


def length_trainer(tmp_path, tokenizer, model, **overrides):
    args = make_args(
        tmp_path, per_device_train_batch_size=6, num_generations=2, teacher_template=TEMPLATE,
        max_teacher_prompt_length=CAP, distill_positive_only=False, **overrides,
    )  # fmt: skip
    return SDPGTrainer(model=model, reward_funcs=parity_reward, args=args, train_dataset=Dataset.from_list(ROWS),
                       processing_class=tokenizer)  # fmt: skip


def chat_ids(tokenizer, content: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))  # fmt: skip


def teacher_forward_inputs(trainer, batch) -> dict[str, torch.Tensor]:
    """The inputs of the teacher's forward (the first one compute_loss runs), captured by a pre-hook."""
    captured = []
    trainer.current_gradient_accumulation_steps = 1
    hook = trainer.model.register_forward_pre_hook(lambda m, args, kwargs: captured.append(kwargs), with_kwargs=True)
    try:
        trainer.compute_loss(trainer.model, batch)
    finally:
        hook.remove()
    return captured[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_long_teacher_prompt_cuts_the_context_never_the_problem_or_the_completion(
    tmp_path, tokenizer, tiny_model_dir, side
):
    trainer = length_trainer(tmp_path, tokenizer, tiny_model_dir, teacher_context_truncation_side=side)
    rows = [row for row in ROWS for _ in range(2)]
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows)
    assert batch["teacher_prompt_fits"].tolist() == [True, True, True, True, False, False]
    prompts = [batch["teacher_prompt_ids"][i][batch["teacher_prompt_mask"][i].bool()].tolist() for i in range(6)]

    # Row 0 fits: untouched.
    assert prompts[0] == chat_ids(tokenizer, ROWS[0]["prompt"][0]["content"] + " hint : the answer is 3 .")
    # Row 1: the problem and the template whole, the context cut token-wise from `side` down to the cap.
    bare = chat_ids(tokenizer, ROWS[1]["prompt"][0]["content"] + " hint : ")
    context = tokenizer(CONTEXT, add_special_tokens=False)["input_ids"]
    kept = context[len(bare) - CAP :] if side == "left" else context[: CAP - len(bare)]
    assert 0 < len(kept) < len(context)
    split = len(bare) - bare[::-1].index(tokenizer.convert_tokens_to_ids(":"))  # the context goes after "hint :"
    assert prompts[2] == bare[:split] + kept + bare[split:]
    assert len(prompts[2]) == CAP and prompts[2] == prompts[3]
    # Row 2 cannot fit: a fully masked placeholder.
    assert prompts[4] == prompts[5] == []

    logged = trainer._metrics["train"]
    assert logged["sdpg/teacher_context_truncated"][-1] == 2 and logged["sdpg/teacher_prompt_too_long"][-1] == 2

    # The teacher scores the rows that fit, and their completion tokens are exactly the student's.
    teacher = teacher_forward_inputs(trainer, batch)
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    c = completion_ids.size(1)
    assert teacher["input_ids"].size(0) == 4
    assert torch.equal(teacher["input_ids"][:, -c:], completion_ids[:4])
    assert torch.equal(teacher["attention_mask"][:, -c:], completion_mask[:4])
    for i in range(4):
        ids = teacher["input_ids"][i, :-c][teacher["attention_mask"][i, :-c].bool()].tolist()
        assert ids == prompts[i]
    # and the row that does not fit is not distilled
    assert trainer._metrics["train"]["sdpg/distilled_token_share"][-1] == 1.0


def test_default_cap_is_the_positions_left_after_the_completion(tmp_path, tokenizer, tiny_model_dir):
    trainer = SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, args=make_args(tmp_path),
                          train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)  # fmt: skip
    assert trainer._max_teacher_prompt_length == 512 - 6  # LlamaConfig(max_position_embeddings=512), 6 new tokens
