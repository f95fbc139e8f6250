"""`sdpg_trl.rewards`: the binary verifier, its lenient and thinking variants, the gold column (`answer` or TRL's
`solution`), garbage input, and the name registry."""

from __future__ import annotations

import time

import pytest

from sdpg_trl.rewards import (
    REWARD_FUNCS,
    get_reward_funcs,
    lenient_math_accuracy_reward,
    math_accuracy_reward,
    think_math_accuracy_reward,
)

REWARDS = [math_accuracy_reward, lenient_math_accuracy_reward, think_math_accuracy_reward]


def _chat(*texts):
    return [[{"role": "assistant", "content": text}] for text in texts]


def test_strict_reward_checks_the_boxed_answer_against_the_answer_column():
    completions = _chat(r"3 + 4 = 7, so \boxed{7}.", r"\boxed{8}", "The answer is 7.", r"\boxed{\frac{1}{2}}")
    assert math_accuracy_reward(completions, answer=["7", "7", "7", "0.5"]) == [1.0, 0.0, 0.0, 1.0]


def test_rewards_take_plain_text_completions_and_numeric_gold():
    assert math_accuracy_reward([r"\boxed{27}", r"\boxed{26}"], answer=["27", "27"]) == [1.0, 0.0]
    assert lenient_math_accuracy_reward(["so 27", "so 26"], answer=["27", "27"]) == [1.0, 0.0]


def test_lenient_reward_reads_the_last_number_only_without_a_box():
    completions = _chat(
        "3 + 4 is 7.",  # no box: last number 7
        "7 is wrong, it is 8",  # last number wins
        r"maybe 7 but \boxed{8}",  # a box is present: judged strictly
        "1,234",  # thousands separator
        "no digits here",
    )
    assert lenient_math_accuracy_reward(completions, answer=["7", "7", "7", "1234", "7"]) == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_think_reward_verifies_only_the_text_after_the_reasoning_block():
    completions = _chat(
        r"<think>maybe \boxed{8}? no: 3 + 4 = 7</think> The answer is \boxed{7}.",  # closed block, right after it
        r"<think>surely \boxed{7}</think> The answer is \boxed{8}.",  # right only inside the block
        r"<think>3 + 4 = 7 so \boxed{7}",  # cut off while thinking: unclosed
        r"3 + 4 = 7 so \boxed{7}",  # no block closed at all (e.g. a template that opens it in the prompt)
        r"<think>a</think> wait <think>b</think> \boxed{7}",  # the last block ends the reasoning
    )
    assert think_math_accuracy_reward(completions, answer=["7"] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]
    # The same text scores 1 with the plain reward, which reads the first boxed answer anywhere.
    assert math_accuracy_reward(completions[2:4], answer=["7", "7"]) == [1.0, 1.0]
    # A response parser (a tokenizer with a response template) has already split a closed block off.
    parsed = [[{"role": "assistant", "reasoning_content": r"\boxed{8}", "content": r"\boxed{7}"}]]
    assert think_math_accuracy_reward(parsed, answer=["7"]) == [1.0]
    assert think_math_accuracy_reward([r"<think>x</think>\boxed{7}"], answer=["7"]) == [1.0]  # plain-text completion


@pytest.mark.parametrize("reward", REWARDS)
def test_rewards_read_trls_solution_column_when_there_is_no_answer_column(reward):
    completions = _chat(r"<think>.</think> \boxed{7}", r"<think>.</think> \boxed{8}")
    assert reward(completions, solution=["7", "7"]) == [1.0, 0.0]
    # `answer` wins over `solution` (e.g. AIME rows, whose `solution` is a worked solution).
    assert reward(completions, answer=["8", "8"], solution=["7", "7"]) == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"'answer' or 'solution'.*\['gold', 'prompts'\]"):
        reward(completions, prompts=["p", "p"], gold=["7", "7"])


@pytest.mark.parametrize("reward", REWARDS)
def test_garbage_scores_zero_quickly(reward):
    garbage = _chat(
        "",
        r"\boxed{",
        "}}}{{{\\frac{" * 2000,
        "9" * 200_000,
        "\x00\udcff\\\\boxed{\\boxed{\\boxed{}}}",
    ) + [[], [{"role": "assistant", "content": None}]]
    start = time.perf_counter()
    assert reward(garbage, answer=["7"] * len(garbage)) == [0.0] * len(garbage)
    assert time.perf_counter() - start < 30


def test_unparseable_gold_scores_zero_instead_of_none():
    assert math_accuracy_reward(_chat(r"\boxed{1}"), answer=["}{"]) == [0.0]


def test_registry_and_dotted_paths():
    assert get_reward_funcs(list(REWARD_FUNCS)) == REWARDS
    assert get_reward_funcs(["sdpg_trl.rewards.math_accuracy_reward"]) == [math_accuracy_reward]
    # TRL logs each reward under its function name, so registry names must match them.
    assert all(func.__name__ == name for name, func in REWARD_FUNCS.items())
    with pytest.raises(ValueError, match="Unknown reward function 'accuracy'"):
        get_reward_funcs(["accuracy"])
    with pytest.raises(ValueError, match="Cannot import reward function 'sdpg_trl.rewards.nope'"):
        get_reward_funcs(["sdpg_trl.rewards.nope"])
    with pytest.raises(ValueError, match="at least one"):
        get_reward_funcs([])
