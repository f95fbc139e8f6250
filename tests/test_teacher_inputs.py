"""Teacher inputs that cannot be silently wrong (issue 10, section 2): the length policy, positions, data errors."""

from __future__ import annotations

import re

import pytest
import torch
from datasets import Dataset
from test_trainer import make_args, parity_reward
from transformers import GPT2Config, GPT2LMHeadModel

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


# ---------------------------------------------------------------------------------------------------------------------
# Positions: an absolute-position model (GPT-2) scores a left-padded teacher row like the unpadded one
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tokenizer) -> str:
    """A saved GPT-2 (learned absolute positions, 64 of them); saved so the reference model loads from its path."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_left_padded_teacher_row_scores_like_the_unpadded_row_on_gpt2(tmp_path, tokenizer, tiny_gpt2):
    trainer = SDPGTrainer(model=tiny_gpt2, reward_funcs=parity_reward, args=make_args(tmp_path),
                          train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(6, len(tokenizer), (2, 9), generator=g)
    completion = torch.randint(6, len(tokenizer), (2, 5), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :4] = 0  # row 0's prompt is 5 tokens, left-padded to row 1's 9
    prompt[0, :4] = tokenizer.pad_token_id
    padded = {"teacher_prompt_ids": prompt, "teacher_prompt_mask": prompt_mask, "completion_ids": completion,
              "completion_mask": torch.ones_like(completion)}  # fmt: skip
    alone = {"teacher_prompt_ids": prompt[:1, 4:], "teacher_prompt_mask": prompt_mask[:1, 4:],
             "completion_ids": completion[:1], "completion_mask": torch.ones_like(completion[:1])}  # fmt: skip
    trainer.model.train()  # the teacher still runs without dropout
    hidden_padded = trainer.teacher.hidden(trainer.model, padded, torch.tensor([0, 1]))
    hidden_alone = trainer.teacher.hidden(trainer.model, alone, torch.tensor([0]))
    torch.testing.assert_close(hidden_padded[0], hidden_alone[0], rtol=1e-5, atol=1e-5)


def test_gpt2_teacher_prompt_longer_than_its_positions_trains(tmp_path, tokenizer, tiny_gpt2):
    """64 positions, 6 completion tokens: the default cap of 58 cuts the 80-token context (before: IndexError)."""
    rows = [{"prompt": r["prompt"], "privileged_context": " ".join(str(i % 10) for i in range(80))} for r in ROWS[:2]]
    args = make_args(tmp_path, max_steps=1, distill_positive_only=False, teacher_template=TEMPLATE)
    trainer = SDPGTrainer(
        model=tiny_gpt2, reward_funcs=parity_reward, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )  # fmt: skip
    assert trainer._max_teacher_prompt_length == 58
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert log["sdpg/teacher_context_truncated"] == 4 and log["sdpg/teacher_prompt_too_long"] == 0
    assert log["sdpg/distill_kl"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# Data errors name the row: before training for a map-style dataset, at the first bad row for a streamed one
# ---------------------------------------------------------------------------------------------------------------------
def data_rows(n: int = 4) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"what is {i} plus {i + 1} ?"}],
             "privileged_context": f"the answer is {2 * i + 1} ."} for i in range(n)]  # fmt: skip


def no_user_turn(rows):
    rows[1]["prompt"] = [{"role": "system", "content": "solve"}, {"role": "assistant", "content": "the answer is"}]
    return rows


def no_context(rows):
    rows[2]["privileged_context"] = None
    return rows


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (no_user_turn, r"train_dataset row 1 has a conversational prompt without a user message"),
        (no_context, r"train_dataset row 2 has no privileged context in column 'privileged_context'.*: None"),
        (lambda rows: [{"question": r.pop("prompt"), **r} for r in rows], r"train_dataset has no prompt column"),
    ],
    ids=["no_user_turn", "no_context", "no_prompt_column"],
)
def test_bad_map_style_rows_fail_before_training(tmp_path, tokenizer, tiny_model_dir, corrupt, message):
    with pytest.raises(ValueError, match=message):
        SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, args=make_args(tmp_path),
                    train_dataset=Dataset.from_list(corrupt(data_rows())), processing_class=tokenizer)  # fmt: skip


def test_grpo_without_teacher_still_needs_a_prompt_column(tmp_path, tokenizer, tiny_model_dir):
    rows = [{"question": r["prompt"]} for r in data_rows()]
    message = r"train_dataset has no prompt column 'prompt'; its columns are \['question'\]"
    with pytest.raises(ValueError, match=message):
        SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, processing_class=tokenizer,
                    args=make_args(tmp_path, method="grpo"),
                    train_dataset=Dataset.from_list(rows))  # fmt: skip


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (no_context, r"\(prompt .*what is 2 plus 3 \?.*\) has no privileged context in column 'privileged_context'"),
        (
            no_user_turn,
            r"\(prompt .*'system'.*\) has a conversational prompt without a user message.*"
            r"\['system', 'assistant'\]",
        ),
    ],
    ids=["no_context", "no_user_turn"],
)
def test_bad_streamed_row_fails_when_it_arrives(tmp_path, tokenizer, tiny_model_dir, corrupt, message):
    """One prompt per step (4 rollouts of it): the steps before the bad row train, the bad row stops training."""
    stream = Dataset.from_list(corrupt(data_rows())).to_iterable_dataset()
    trainer = SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, args=make_args(tmp_path, max_steps=4),
                          train_dataset=stream, processing_class=tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match=r"Row \d+ of the generation batch at step (\d+) " + message) as error:
        trainer.train()
    step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert trainer.state.global_step == step - 1


@pytest.mark.parametrize("method", ["sdpg_urkl", "grpo"])  # with a teacher, and without one
def test_a_streamed_prompt_that_is_none_names_its_row_when_it_arrives(tmp_path, tokenizer, tiny_model_dir, method):
    rows = data_rows()
    rows[2]["prompt"] = None
    stream = Dataset.from_list(rows).to_iterable_dataset()
    trainer = SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, processing_class=tokenizer,
                          args=make_args(tmp_path, max_steps=4, method=method), train_dataset=stream)  # fmt: skip
    with pytest.raises(TypeError, match=r"Row \d+ of the generation batch at step \d+ .*a prompt of type NoneType"):
        trainer.train()
