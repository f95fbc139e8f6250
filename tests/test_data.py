"""`sdpg_trl.data`: the built-in generator, the real loaders, and data sets already in SDPG form loaded the TRL way
(name, config, splits, column renaming), on local fixtures written here: a local folder stands in for a Hub data
set, since `datasets.load_dataset` reads both the same way."""

from __future__ import annotations

import dataclasses
import json
import re

import pandas as pd
import pytest
from datasets import Dataset

from sdpg_trl.data import (
    BOXED_INSTRUCTION,
    COLUMNS,
    LEVELS,
    MIXTURE_SPLIT_SEED,
    SOURCES,
    DataArguments,
    arithmetic_dataset,
    held_out_dataset,
    load_math_dataset,
    load_sdpg_dataset,
    train_dataset,
)
from sdpg_trl.scripts.evaluate import EvaluateArguments, evaluation_dataset
from sdpg_trl.scripts.train import make_parser


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
    "aime24": (
        {"id": 1, "problem": "Compute 3^2.", "answer": "9", "solution": "3 * 3 = 9.", "url": "u"},
        "3 * 3 = 9.",
    ),
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
        "privileged_context": f"The correct answer is {answer}."
        + (f" A common way to solve this is: {solution}" if solution else ""),
        "answer": answer,
        "reference_solution": solution,
    }  # fmt: skip


def test_column_overrides_give_dapo_a_generated_solution(tmp_path):
    path = _write(
        tmp_path / "dapo.parquet", [{"prompt": "Find x if 2x = 8.", "solution": "4", "worked": "x = 8 / 2 = 4."}]
    )
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
    args = DataArguments(dataset_name=str(aime), dataset_source="aime24", eval_dataset_name=str(aime),
                         eval_dataset_source="aime24")  # fmt: skip
    assert args.eval_dataset_name == [str(aime)]  # a recipe's single name is a list of one
    assert held_out_dataset(args)["answer"] == ["9"]


# --- Data sets already in SDPG form, as a Hub repository lays them out -----------------------------------------------


def _chat_rows(n: int, offset: int = 0) -> list[dict]:
    """SDPG rows with TRL's column names: a chat prompt, the gold answer in `solution`, the context in `hint`."""
    return [
        {"prompt": [{"role": "user", "content": f"what is {i} plus 1 ?"}], "hint": f"it is {i + 1}",
         "solution": str(i + 1), "level": i % 3}
        for i in range(offset, offset + n)
    ]  # fmt: skip


def _hub_folder(tmp_path) -> str:
    """A data set repository with two configurations: `chat` (train and test splits, TRL's column names) and
    `plain` (plain-text prompts with SDPG's column names, train only), declared in its README as on the Hub."""
    root = tmp_path / "my-org" / "sdpg-set"
    (root / "chat").mkdir(parents=True)
    (root / "plain").mkdir()
    Dataset.from_list(_chat_rows(3)).to_parquet(root / "chat" / "train-00000-of-00001.parquet")
    Dataset.from_list(_chat_rows(2, offset=10)).to_parquet(root / "chat" / "test-00000-of-00001.parquet")
    plain = [{"prompt": "What is 2 + 2?", "privileged_context": "The answer is 4.", "answer": "4"}]
    Dataset.from_list(plain).to_parquet(root / "plain" / "train-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: chat\n  data_files:\n  - split: train\n    path: chat/train-*\n"
        "  - split: test\n    path: chat/test-*\n"
        "- config_name: plain\n  data_files:\n  - split: train\n    path: plain/train-*\n---\n"
    )
    return str(root)


def test_a_data_set_in_sdpg_form_loads_by_name_from_a_recipe(tmp_path):
    folder = _hub_folder(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: some/model\ndataset_name: {folder}\ndataset_config: chat\n"
        "dataset_column_mapping: {hint: privileged_context}\n"
    )
    script_args, _, _ = make_parser().parse_args_and_config(["--config", str(recipe), "--use_cpu", "true"])
    train = train_dataset(script_args, context_column="privileged_context")
    # Renamed, every other column kept as it is (TRL passes them all to the rewards), rows in order.
    assert train.column_names == ["prompt", "privileged_context", "solution", "level"]
    assert train.to_list() == [
        {**{k: v for k, v in row.items() if k != "hint"}, "privileged_context": row["hint"]} for row in _chat_rows(3)
    ]
    # The held-out set is the data set's `test` split (TRL's dataset_test_split), renamed the same way.
    held_out = held_out_dataset(script_args, context_column="privileged_context")
    assert held_out["solution"] == ["11", "12"] and "privileged_context" in held_out.column_names

    # The same from the command line, the mapping as JSON (as GRPOConfig's dict fields), and the other config.
    argv = ["--model_name_or_path", "m", "--dataset_name", folder, "--dataset_config", "chat", "--use_cpu", "true",
            "--dataset_column_mapping", '{"hint": "privileged_context"}', "--dataset_train_split", "test"]  # fmt: skip
    script_args, _, _ = make_parser().parse_args_and_config(argv)
    assert script_args.dataset_column_mapping == {"hint": "privileged_context"}
    assert train_dataset(script_args, "privileged_context")["solution"] == ["11", "12"]
    plain = DataArguments(dataset_name=folder, dataset_config="plain")
    assert train_dataset(plain, "privileged_context")["prompt"] == ["What is 2 + 2?"]
    assert held_out_dataset(plain) is None  # no `test` split: no held-out set


def test_a_local_file_in_sdpg_form_needs_no_layout(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [{"prompt": "What is 1 + 1?", "privileged_context": "2", "answer": "2"}])
    [row] = train_dataset(DataArguments(dataset_name=str(path)), "privileged_context").to_list()
    assert row == {"prompt": "What is 1 + 1?", "privileged_context": "2", "answer": "2"}


def test_a_data_set_in_sdpg_form_without_a_column_fails_naming_it_the_data_set_and_its_columns(tmp_path):
    folder = _hub_folder(tmp_path)
    columns = re.escape("['prompt', 'hint', 'solution', 'level']")
    with pytest.raises(ValueError, match=rf"{re.escape(folder)} \(split 'train'\) has no privileged-context column "
                                         rf"'privileged_context'; its columns are {columns}\. Rename a column with "
                                         "dataset_column_mapping"):  # fmt: skip
        train_dataset(DataArguments(dataset_name=folder, dataset_config="chat"), "privileged_context")
    # Without a teacher (context_column None) the context is not needed.
    assert len(train_dataset(DataArguments(dataset_name=folder, dataset_config="chat"))) == 3
    with pytest.raises(ValueError, match=r"has no prompt column 'prompt'; its columns are \['question', 'hint', "):
        load_sdpg_dataset(folder, "chat", column_mapping={"prompt": "question"})
    with pytest.raises(ValueError, match=r"has no gold-answer column \('answer' or 'solution'\)"):
        load_sdpg_dataset(folder, "chat", column_mapping={"solution": "gold"})
    with pytest.raises(ValueError, match=rf"dataset_column_mapping renames 'hnt', but {re.escape(folder)} \(split "
                                         rf"'train'\) has no such column; its columns are {columns}"):  # fmt: skip
        load_sdpg_dataset(folder, "chat", column_mapping={"hnt": "privileged_context"})
    with pytest.raises(ValueError, match=rf"{re.escape(folder)} has no split 'validation'; its splits are "
                                         r"\['train', 'test'\]"):  # fmt: skip
        train_dataset(DataArguments(dataset_name=folder, dataset_config="chat", dataset_train_split="validation"))


def test_data_arguments_refuse_settings_that_would_be_ignored():
    with pytest.raises(ValueError, match="dataset_column_mapping renames columns of a data set in SDPG form; 'aime2"):
        DataArguments(dataset_name="aime24", dataset_column_mapping={"a": "b"})
    with pytest.raises(ValueError, match="answer_column apply to the built-in layouts.*dataset_column_mapping"):
        DataArguments(dataset_name="my-org/sdpg-set", answer_column="gold")
    with pytest.raises(ValueError, match="eval_dataset_column_mapping renames columns of eval sets in SDPG form"):
        DataArguments(eval_dataset_name=["aime24"], eval_dataset_column_mapping={"a": "b"})
    with pytest.raises(ValueError, match=r"dataset_column_mapping must be a JSON object.*got '\[1\]'"):
        DataArguments(dataset_name="my-org/sdpg-set", dataset_column_mapping="[1]")
    with pytest.raises(ValueError, match=r"logged under the same name \(\['amc', 'amc'\]"):
        DataArguments(eval_dataset_name=["a/amc.jsonl", "b/amc.parquet"])


def test_a_trl_dataset_mixture_from_a_recipe_is_trained_on_and_split_the_same_every_time(tmp_path):
    """TRL's `datasets:` mixture (`trl.DatasetMixtureConfig`, loaded by `trl.get_dataset`): two local sources, a
    column selection, fractions, the context renamed into place, and a seeded held-out split."""
    folder = _hub_folder(tmp_path)
    extra = _write(tmp_path / "extra.jsonl", [{**row, "note": "x"} for row in _chat_rows(6, offset=20)])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "datasets:\n"
        f"  - {{path: {folder}, name: chat, split: train, columns: [prompt, hint, solution], fraction: 1}}\n"
        f"  - {{path: json, data_files: {extra}, columns: [prompt, hint, solution], fraction: 2}}\n"
        "test_split_size: 3\n"
        "dataset_column_mapping: {hint: privileged_context}\n"
    )
    script_args, _, _ = make_parser().parse_args_and_config(["--config", str(recipe), "--use_cpu", "true"])
    train = train_dataset(script_args, "privileged_context")
    held_out = held_out_dataset(script_args, "privileged_context")
    # Fractions 1:2 of 3 and 6 rows: all 3 of the first and all 6 of the second; 3 of the 9 held out.
    assert (len(train), len(held_out)) == (6, 3)
    assert set(train.column_names) == set(held_out.column_names) == {"prompt", "privileged_context", "solution"}
    expected = {row["solution"] for row in _chat_rows(3) + _chat_rows(6, offset=20)}
    assert set(train["solution"]) | set(held_out["solution"]) == expected
    assert not set(train["solution"]) & set(held_out["solution"])
    # Seeded (trl.get_dataset's own split is not): the same rows held out on every call, i.e. in every process.
    assert held_out_dataset(script_args)["solution"] == held_out["solution"]
    mixture = Dataset.from_list([r for r in _chat_rows(3) + _chat_rows(6, offset=20)]).select_columns(
        ["prompt", "hint", "solution"]
    )
    split = mixture.train_test_split(test_size=3, seed=MIXTURE_SPLIT_SEED)
    assert held_out["solution"] == split["test"]["solution"]
    # Without test_split_size the mixture is all training data and has no held-out set.
    whole = DataArguments(datasets=[{"path": folder, "name": "chat"}], dataset_column_mapping={"hint": "c"})
    assert len(train_dataset(whole, "c")) == 3 and held_out_dataset(whole) is None


def test_a_trl_dataset_mixture_is_checked_and_refused_with_conflicting_settings(tmp_path, caplog):
    folder = _hub_folder(tmp_path)
    mixture = DataArguments(datasets=[{"path": folder, "name": "chat"}])
    message = rf"the datasets: mixture \({re.escape(folder)}\) \(split 'train'\) has no privileged-context column"
    with pytest.raises(ValueError, match=rf"{message} 'privileged_context'; its columns are "):
        train_dataset(mixture, "privileged_context")
    assert len(train_dataset(mixture)) == 3  # no teacher, no context needed
    # sdpg-evaluate takes the same mixture and names it in its report.
    args = EvaluateArguments(model_name_or_path="m", datasets=[{"path": folder, "name": "chat"}], test_split_size=1)
    rows, name = evaluation_dataset(args)
    assert len(rows) == 1 and name == f"the datasets: mixture ({folder}) (held-out split)"
    rows, name = evaluation_dataset(dataclasses.replace(args, eval_split="train"))
    assert len(rows) == 2 and name == f"the datasets: mixture ({folder})"
    with caplog.at_level("WARNING", logger="sdpg_trl.data"):  # as TRL's scripts: the mixture is used
        both = DataArguments(dataset_name="aime24", datasets=[{"path": folder, "name": "chat"}])
    assert "Both dataset_name ('aime24') and a datasets: mixture name the training data" in caplog.text
    assert train_dataset(both)["prompt"] == train_dataset(mixture)["prompt"]
    with pytest.raises(ValueError, match="test_split_size splits a datasets: mixture"):
        DataArguments(dataset_name=folder, test_split_size=0.1)
    with pytest.raises(ValueError, match="answer_column apply to the built-in layouts.*the datasets: mixture"):
        DataArguments(datasets=[{"path": folder}], answer_column="gold")


def test_several_eval_sets_are_named_as_they_are_logged(tmp_path):
    folder = _hub_folder(tmp_path)
    mine = _write(tmp_path / "mine.jsonl", [{"prompt": "What is 1 + 1?", "hint": "2", "answer": "2"}])
    args = DataArguments(eval_dataset_name=[str(mine), f"{folder}/chat/"],
                         eval_dataset_column_mapping={"hint": "privileged_context"})  # fmt: skip
    sets = held_out_dataset(args, context_column="privileged_context")
    assert list(sets) == ["mine", "chat"]  # logged as eval_mine_accuracy and eval_chat_accuracy
    assert sets["mine"]["answer"] == ["2"]  # a file's only split
    assert sets["chat"]["solution"] == ["11", "12"]  # a folder's `test` split (dataset_test_split)
    assert all("privileged_context" in s.column_names for s in sets.values())
    # One eval set is a plain Dataset, logged as eval_accuracy (Trainer's eval_dataset convention).
    args = DataArguments(eval_dataset_name=[str(mine)], eval_dataset_column_mapping={"hint": "privileged_context"})
    assert isinstance(held_out_dataset(args), Dataset)
    with pytest.raises(ValueError, match=r"mine\.jsonl \(split 'train'\) has no privileged-context column 'ctx'"):
        held_out_dataset(args, context_column="ctx")
    # Several splits and none of them `test`: which one is held out must be said.
    two = tmp_path / "two"
    two.mkdir()
    for split in ("train", "validation"):
        Dataset.from_list(_chat_rows(1)).to_parquet(two / f"{split}-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"Eval set .*two has no split 'test' \(dataset_test_split\) and several "
                                         r"others, \['train', 'validation'\]"):  # fmt: skip
        held_out_dataset(DataArguments(eval_dataset_name=[str(two)]))
    args = DataArguments(eval_dataset_name=[str(two)], dataset_test_split="validation")
    assert held_out_dataset(args)["solution"] == ["1"]
