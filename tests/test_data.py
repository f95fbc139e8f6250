"""`sdpg_trl.data`: the built-in generator and the real loaders, on local fixtures written here."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from sdpg_trl.data import (
    BOXED_INSTRUCTION,
    COLUMNS,
    LEVELS,
    SOURCES,
    DataArguments,
    arithmetic_dataset,
    held_out_dataset,
    load_math_dataset,
    train_dataset,
)


@pytest.mark.parametrize("level", range(1, len(LEVELS) + 1))
def test_generated_problems_have_exact_answers_and_worked_solutions(level):
    splits = arithmetic_dataset(num_train=40, num_test=10, level=level, seed=3)
    assert len(splits["train"]) == 40 and len(splits["test"]) == 10
    for row in splits["train"]:
        assert list(row) == list(COLUMNS)
        [message] = row["prompt"]
        assert message["role"] == "user" and message["content"].endswith(BOXED_INSTRUCTION)
        # The worked solution ends with "= <answer>": recompute every "x op y = z" in it to check the arithmetic.
        for a, op, b, result in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", row["reference_solution"]):
            assert eval(f"{a} {op} {b}") == int(result)  # noqa: S307 - digits and one operator only
        assert row["reference_solution"].rstrip(".").endswith(f"= {row['answer']}")
        assert row["privileged_context"] == (
            f"The correct answer is {row['answer']}. A common way to solve this is: {row['reference_solution']}"
        )


def test_level_one_is_two_number_addition_with_the_right_sum():
    row = arithmetic_dataset(num_train=1, num_test=0, level=1, seed=0)["train"][0]
    a, b = map(int, re.match(r"What is (\d+) \+ (\d+)\?", row["prompt"][0]["content"]).groups())
    assert int(row["answer"]) == a + b and 1 <= a <= 20 and 1 <= b <= 20


def test_generator_is_seeded_and_its_held_out_split_is_disjoint():
    first = arithmetic_dataset(num_train=100, num_test=50, level=2, seed=7)
    again = arithmetic_dataset(num_train=100, num_test=50, level=2, seed=7)
    other = arithmetic_dataset(num_train=100, num_test=50, level=2, seed=8)
    assert first["train"]["answer"] == again["train"]["answer"] and first["test"]["prompt"] == again["test"]["prompt"]
    assert first["train"]["prompt"] != other["train"]["prompt"]
    train_questions = {row[0]["content"] for row in first["train"]["prompt"]}
    test_questions = {row[0]["content"] for row in first["test"]["prompt"]}
    assert len(train_questions) == 100 and len(test_questions) == 50 and not train_questions & test_questions


def test_generator_rejects_impossible_requests():
    with pytest.raises(ValueError, match="level must be between 1 and 5"):
        arithmetic_dataset(level=0)
    with pytest.raises(ValueError, match="distinct problems"):
        arithmetic_dataset(num_train=390, num_test=20, level=1)  # level 1 has 20 x 20 = 400 problems


def _write(path, rows):
    if path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


# One fixture row per source, with that source's Hub column names (and a distractor column to be dropped).
FIXTURES = {
    "dapo-math-17k": ({"prompt": "Find x if 2x = 8.", "solution": "4", "data_source": "math_dapo"}, ""),
    "aime24": ({"id": 1, "problem": "Compute 3^2.", "answer": "9", "solution": "3 * 3 = 9.", "url": "u"}, "3 * 3 = 9."),
    "aime25": ({"id": "1", "problem": "Compute 2^5.", "answer": "32"}, ""),
    "amc23": ({"id": 0, "question": "What is 1/2 + 1/2?", "answer": 1.0, "url": "u"}, ""),
}


@pytest.mark.parametrize("suffix", [".parquet", ".json", ".jsonl"])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_local_files_map_each_source_into_the_schema(tmp_path, source, suffix):
    raw, solution = FIXTURES[source]
    path = _write(tmp_path / f"{source}{suffix}", [raw])
    [row] = load_math_dataset(str(path), source=source).to_list()
    spec = SOURCES[source]
    question, answer = raw[spec.question], "1" if source == "amc23" else raw[spec.answer]  # AMC's 1.0 reads "1"
    assert row == {
        "prompt": [{"role": "user", "content": f"{question}\n\n{BOXED_INSTRUCTION}"}],
        "privileged_context": f"The correct answer is {answer}." + (f" A common way to solve this is: {solution}" if solution else ""),
        "answer": answer,
        "reference_solution": solution,
    }  # fmt: skip


def test_column_overrides_give_dapo_a_generated_solution(tmp_path):
    path = _write(tmp_path / "dapo.parquet", [{"prompt": "Find x if 2x = 8.", "solution": "4", "worked": "x = 8 / 2 = 4."}])
    [row] = load_math_dataset(str(path), source="dapo-math-17k", solution_column="worked").to_list()
    assert row["answer"] == "4" and row["reference_solution"] == "x = 8 / 2 = 4."
    assert row["privileged_context"] == "The correct answer is 4. A common way to solve this is: x = 8 / 2 = 4."


def test_bad_files_fail_naming_the_column_and_the_file(tmp_path):
    path = _write(tmp_path / "aime.json", [{"question": "Compute 3^2.", "answer": "9"}])
    with pytest.raises(KeyError, match=r"aime\.json has no question column 'problem'.*\['question', 'answer'\]"):
        load_math_dataset(str(path), source="aime24")
    with pytest.raises(KeyError, match="no solution column 'steps'"):
        load_math_dataset(str(path), source="amc23", solution_column="steps")
    empty = _write(tmp_path / "empty_answer.json", [{"problem": "Compute 3^2.", "answer": ""}])
    with pytest.raises(ValueError, match="column 'answer' holds an empty answer"):
        load_math_dataset(str(empty), source="aime25")
    with pytest.raises(ValueError, match="source="):
        load_math_dataset(str(path))  # a local file needs its column layout named
    with pytest.raises(FileNotFoundError, match="nothing.parquet"):
        load_math_dataset(str(tmp_path / "nothing.parquet"), source="aime24")
    with pytest.raises(ValueError, match="Unknown math source 'aime99'"):
        load_math_dataset(str(path), source="aime99")
    with pytest.raises(ValueError, match="neither a known data set"):
        load_math_dataset("someone/unknown-set")


def test_default_data_arguments_fit_every_level():
    for level in range(1, len(LEVELS) + 1):
        args = DataArguments(arithmetic_level=level)
        assert (len(train_dataset(args)), len(held_out_dataset(args))) == (256, 64)


def test_data_arguments_pick_train_and_held_out_sets(tmp_path):
    args = DataArguments(arithmetic_num_train=30, arithmetic_num_eval=6, arithmetic_seed=1)
    assert len(train_dataset(args)) == 30 and len(held_out_dataset(args)) == 6
    assert held_out_dataset(args)["prompt"] == arithmetic_dataset(30, 6, 1, 1)["test"]["prompt"]

    aime = _write(tmp_path / "aime.parquet", [FIXTURES["aime24"][0]])
    args = DataArguments(dataset_name=str(aime), dataset_source="aime24")
    assert train_dataset(args)["answer"] == ["9"] and held_out_dataset(args) is None
    args.eval_dataset_name, args.eval_dataset_source = str(aime), "aime24"
    assert held_out_dataset(args)["answer"] == ["9"]
