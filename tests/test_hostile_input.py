"""Malformed input fails early, naming what is wrong (issue 23, section 5): data sets with too few or no rows,
contexts of the wrong type, a prompt that is None, and model paths that do not exist."""

from __future__ import annotations

import json
import re

import pytest
from datasets import Dataset
from test_train_script import _argv

from sdpg_trl.scripts import evaluate as evaluate_script
from sdpg_trl.scripts.train import main
from sdpg_trl.teacher import check_dataset


def no_model(tmp_path) -> str:
    """A model path that does not exist: each error below comes before the model loads, or the test fails on it."""
    return str(tmp_path / "no-model")


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "privileged_context": f"It is {i + 1}."}
            for i in range(n)]  # fmt: skip


def test_a_streamed_mixture_smaller_than_one_generation_batch_is_refused_naming_it(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _rows(1)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"datasets:\n  - {{path: json, data_files: {data}}}\nstreaming: true\n")
    # 4 completions per device x 2 steps per generation / 4 generations = 2 prompts per generation batch.
    argv = _argv(no_model(tmp_path), str(tmp_path / "out"), "--config", str(recipe), "--steps_per_generation", "2")
    message = rf"the datasets: mixture \(json {data}\) \(streamed\) has 1 rows, fewer than one generation batch"
    with pytest.raises(ValueError, match=message):
        main(argv)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [("empty.jsonl", "", r"empty\.jsonl has no rows: a data file is empty \(0 bytes\)"),
     ("header.csv", "prompt,answer,privileged_context\n", r"header\.csv has no rows \(0 rows")],
)  # fmt: skip
def test_a_data_file_without_rows_is_named(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        main(_argv(no_model(tmp_path), str(tmp_path / "out"), "--dataset_name", str(path)))
    recipe = tmp_path / "recipe.yaml"  # the same file as a datasets: mixture
    recipe.write_text(f"datasets:\n  - {{path: {'json' if name.endswith('l') else 'csv'}, data_files: {path}}}\n")
    with pytest.raises(ValueError, match=rf"the datasets: mixture \(\w+ {path}\) has no rows"):
        main(_argv(no_model(tmp_path), str(tmp_path / "out"), "--config", str(recipe)))


def test_a_context_of_another_type_says_the_type_and_how_to_convert():
    data = Dataset.from_list([{"prompt": "What is 0 + 1?", "answer": 1}])
    message = (
        r"train_dataset row 0 has a privileged context of type int in column 'answer' .*: 1; the context is text\. "
        r"Convert the column first, e\.g\. dataset\.map\(lambda row: \{'answer': str\(row\['answer'\]\)\}\)"
    )
    with pytest.raises(TypeError, match=message):
        check_dataset(data, "train_dataset", "answer")


@pytest.mark.parametrize("context_column", ["privileged_context", None])  # with a teacher, and without (GRPO)
def test_a_prompt_that_is_none_names_the_row(context_column):
    rows = _rows(3)
    rows[1]["prompt"] = None
    with pytest.raises(TypeError, match=r"train_dataset row 1 has a prompt of type NoneType \(None\)"):
        check_dataset(Dataset.from_list(rows), "train_dataset", context_column)


@pytest.mark.parametrize("path", ["./no/such", "outputs/x"])
def test_sdpg_evaluate_and_sdpg_train_say_a_local_model_path_does_not_exist(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # `outputs/x` is a path into a local folder, not the Hub id of org "outputs"
    message = rf"The model path '{re.escape(path)}' does not exist"
    with pytest.raises(FileNotFoundError, match=message):
        evaluate_script.main(["--model_name_or_path", path, "--output_file", str(tmp_path / "r.json")])
    with pytest.raises(FileNotFoundError, match=message):
        main(_argv(path, str(tmp_path / "out")))
