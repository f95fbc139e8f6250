"""Teacher headroom: `sdpg-evaluate --view teacher|both`, the prompt views, and the standard errors.

Generation is replaced by a rule that answers with the last digit of the prompt, so that the teacher view (whose
prompt ends with the privileged context, which holds the answer) is measurably better than the student view (whose
prompt ends with the question): the numbers below are known exactly.
"""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import make_dataset, make_model

from sdpg_trl.config import DEFAULT_TEACHER_TEMPLATE, SDPGConfig
from sdpg_trl.data import arithmetic_dataset
from sdpg_trl.evaluation import (
    binomial_se,
    evaluate_mean_at_k,
    evaluate_prompt_views,
    prompt_view,
    teacher_headroom,
)
from sdpg_trl.scripts import evaluate as evaluate_script
from sdpg_trl.teacher import build_teacher_prompt

TEMPLATE = " hint : {context} ."


def _last_digit(text: str) -> str:
    return re.findall(r"\d", text)[-1]


def _write_problems(path, solution: str | None = None):
    """Four problems 'what is i plus 1 ?' (answer i + 1): the question's last digit is right only for i = 0."""
    rows = [{"question": f"what is {i} plus 1 ?", "answer": i + 1} for i in range(4)]
    if solution is not None:
        rows = [{"problem": row["question"], "answer": row["answer"], "solution": solution} for row in rows]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def last_digit_model(tokenizer, monkeypatch):
    """The tiny model as `sdpg-evaluate` loads it, with `generate` answering the prompt's last digit then EOS.

    Records every prompt it is given (token ids without padding) in `model.seen`.
    """
    model = make_model(tokenizer)
    model.seen = []

    def generate(input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        new = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = ids[mask.bool()].tolist()
            model.seen.append(prompt)
            digit = _last_digit(tokenizer.decode(prompt))
            new.append([tokenizer.convert_tokens_to_ids(digit), tokenizer.eos_token_id])
        return torch.cat([input_ids, torch.tensor(new, device=input_ids.device)], dim=1)

    model.generate = generate
    loads = []

    def load(name_or_path, dtype="float32", **kwargs):
        loads.append(name_or_path)
        return model, tokenizer

    monkeypatch.setattr(evaluate_script, "load_model_and_tokenizer", load)
    model.loads = loads
    return model


def _chat_ids(tokenizer, prompt) -> list[int]:
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_teacher_view_is_build_teacher_prompt_of_each_row_and_the_student_view_is_unchanged():
    chat = make_dataset(3)
    text = chat.map(lambda row: {"prompt": row["prompt"][0]["content"]})
    for dataset in (chat, text):
        teacher = prompt_view(dataset, "teacher", TEMPLATE, "privileged_context")
        expected = [
            build_teacher_prompt(r["prompt"], r["privileged_context"], TEMPLATE, "privileged_context") for r in dataset
        ]
        assert teacher["prompt"] == expected
        assert teacher["prompt"] != dataset["prompt"]
        for column in set(dataset.column_names) - {"prompt"}:
            assert teacher[column] == dataset[column]  # the verifier reads the same answers
        assert prompt_view(dataset, "student", TEMPLATE, "privileged_context") is dataset
    with pytest.raises(ValueError, match="Unknown prompt view 'tutor'"):
        prompt_view(chat, "tutor", TEMPLATE, "privileged_context")
    with pytest.raises(ValueError, match=r"must contain \{context\}"):
        prompt_view(chat, "teacher", " hint : {answer}", "privileged_context")


def test_evaluate_defaults_are_sdpg_configs():
    args = evaluate_script.EvaluateArguments(model_name_or_path="m")
    config = SDPGConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False)
    assert args.view == "student"
    assert args.teacher_template == config.teacher_template == DEFAULT_TEACHER_TEMPLATE
    assert args.context_column == config.context_column


def test_both_views_sample_alike_and_the_student_view_matches_a_plain_evaluation(tokenizer):
    """Real sampling on the tiny model: the student view is today's evaluation, and each view is seeded alike."""
    model, problems = make_model(tokenizer), arithmetic_dataset(num_train=0, num_test=3, level=1)["test"]
    settings = dict(k=3, max_new_tokens=6, batch_size=4, progress=False)

    def evaluate(data):
        return evaluate_mean_at_k(model, tokenizer, data, **settings)

    report = evaluate_prompt_views(evaluate, problems, "both", TEMPLATE, "privileged_context")
    assert report["student"] == evaluate(problems)
    assert report["teacher"] == evaluate(prompt_view(problems, "teacher", TEMPLATE, "privileged_context"))
    assert report["student"]["problems"] != report["teacher"]["problems"]  # other prompts, other samples
    headroom = report["headroom"]
    assert (headroom["num_problems"], headroom["k"], headroom["samples"]) == (3, 3, 9)
    assert report["view"] == "both" and report["context_column"] == "privileged_context"


def test_view_both_writes_accuracies_ratio_and_standard_errors(tmp_path, tokenizer, last_digit_model, capsys):
    data, output = _write_problems(tmp_path / "amc.jsonl"), tmp_path / "report.json"
    argv = [
        "--model_name_or_path", "tiny", "--dataset_name", str(data), "--dataset_source", "amc23",
        "--eval_k", "2", "--eval_max_new_tokens", "2", "--eval_reward_func", "lenient_math_accuracy_reward",
        "--view", "both", "--output_file", str(output),
    ]  # fmt: skip
    evaluate_script.main(argv)
    report = json.loads(output.read_text())
    assert last_digit_model.loads == ["tiny"]  # one model for both views

    # Exactly the student prompts, then exactly build_teacher_prompt of each row with SDPGConfig's defaults, k each.
    rows = evaluate_script.evaluation_dataset(evaluate_script.EvaluateArguments(
        model_name_or_path="tiny", dataset_name=str(data), dataset_source="amc23"
    ))[0]  # fmt: skip
    student = [_chat_ids(tokenizer, row["prompt"]) for row in rows for _ in range(2)]
    teacher = [
        _chat_ids(
            tokenizer, build_teacher_prompt(row["prompt"], row["privileged_context"], DEFAULT_TEACHER_TEMPLATE, "c")
        )
        for row in rows
        for _ in range(2)
    ]
    assert last_digit_model.seen == student + teacher

    # The student answers the question's last digit (right for problem 0 only), the teacher the context's answer.
    assert [p["accuracy"] for p in report["student"]["problems"]] == [1.0, 0.0, 0.0, 0.0]
    assert [p["accuracy"] for p in report["teacher"]["problems"]] == [1.0, 1.0, 1.0, 1.0]
    headroom = report["headroom"]
    for view in ("student", "teacher"):
        rewards = [r for p in report[view]["problems"] for r in p["rewards"]]
        p, n = sum(rewards) / len(rewards), len(rewards)
        assert headroom[f"{view}_accuracy"] == report[view]["accuracy"] == p
        assert headroom[f"{view}_se"] == pytest.approx(math.sqrt(p * (1 - p) / n))
    assert headroom["samples"] == 8 and headroom["student_accuracy"] == 0.25 and headroom["teacher_accuracy"] == 1.0
    assert headroom["ratio"] == 4.0 and headroom["difference"] == 0.75
    assert headroom["student_se"] == pytest.approx(math.sqrt(0.25 * 0.75 / 8)) and headroom["teacher_se"] == 0.0
    assert headroom["difference_se"] == pytest.approx(headroom["student_se"])
    assert headroom["teacher_better"] and headroom["warning"] is None
    assert report["view"] == "both" and report["teacher_template"] == DEFAULT_TEACHER_TEMPLATE
    out = capsys.readouterr().out
    assert "teacher / student 4.00" in out and "WARNING" not in out


def test_a_teacher_no_better_than_the_student_is_warned_about(tmp_path, last_digit_model, capsys):
    # The worked solution holds no digit, so the teacher's prompt ends with the question's digits like the student's.
    data, output = _write_problems(tmp_path / "aime.jsonl", solution="plus"), tmp_path / "report.json"
    argv = [
        "--model_name_or_path", "tiny", "--dataset_name", str(data), "--dataset_source", "aime24",
        "--context_column", "reference_solution", "--teacher_template", TEMPLATE,
        "--eval_k", "2", "--eval_max_new_tokens", "2", "--eval_reward_func", "lenient_math_accuracy_reward",
        "--view", "both", "--output_file", str(output),
    ]  # fmt: skip
    report = evaluate_script.run(
        evaluate_script.TrlParser(evaluate_script.EvaluateArguments).parse_args_and_config(argv)[0]
    )
    headroom = report["headroom"]
    assert headroom["student_accuracy"] == headroom["teacher_accuracy"] == 0.25 and headroom["ratio"] == 1.0
    assert not headroom["teacher_better"] and "little to distil" in headroom["warning"]
    assert json.loads(output.read_text())["headroom"] == headroom
    assert "WARNING: the teacher view is not clearly better" in capsys.readouterr().out


def test_view_teacher_reports_the_teacher_prompts_accuracy(tmp_path, last_digit_model):
    data, output = _write_problems(tmp_path / "amc.jsonl"), tmp_path / "report.json"
    argv = [
        "--model_name_or_path", "tiny", "--dataset_name", str(data), "--dataset_source", "amc23", "--view", "teacher",
        "--eval_k", "1", "--eval_max_new_tokens", "2", "--eval_reward_func", "lenient_math_accuracy_reward",
        "--output_file", str(output),
    ]  # fmt: skip
    evaluate_script.main(argv)
    report = json.loads(output.read_text())
    assert report["view"] == "teacher" and report["accuracy"] == 1.0 and report["num_problems"] == 4
    assert report["context_column"] == "privileged_context" and len(last_digit_model.seen) == 4


def test_a_missing_context_column_fails_before_the_model_is_loaded(tmp_path, last_digit_model):
    data = _write_problems(tmp_path / "amc.jsonl")
    argv = [
        "--model_name_or_path", "tiny", "--dataset_name", str(data), "--dataset_source", "amc23",
        "--output_file", str(tmp_path / "report.json"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=rf"{re.escape(str(data))} has no privileged-context column 'hint'"):
        evaluate_script.main([*argv, "--view", "both", "--context_column", "hint"])
    with pytest.raises(ValueError, match=r"arithmetic \(training split\) has no privileged-context column 'hint'"):
        evaluate_script.main(
            argv[:2] + argv[-2:] + ["--eval_split", "train", "--view", "teacher", "--context_column", "hint"]
        )
    with pytest.raises(ValueError, match="row 0 has no privileged context in column 'reference_solution'"):
        evaluate_script.main([*argv, "--view", "teacher", "--context_column", "reference_solution"])  # empty
    assert last_digit_model.loads == [] and last_digit_model.seen == []
    evaluate_script.main([*argv, "--context_column", "hint", "--eval_k", "1", "--eval_max_new_tokens", "2"])
    assert last_digit_model.loads == ["tiny"]  # the student view needs no context


def test_eval_split_train_and_max_problems_select_the_training_rows():
    args = evaluate_script.EvaluateArguments(model_name_or_path="m", eval_split="train", max_problems=5)
    rows, name = evaluate_script.evaluation_dataset(args)
    assert rows["prompt"] == arithmetic_dataset(256, 64, 1, 0)["train"]["prompt"][:5] and name.endswith(
        "(training split)"
    )
    rows, name = evaluate_script.evaluation_dataset(evaluate_script.EvaluateArguments(model_name_or_path="m"))
    assert rows["prompt"] == arithmetic_dataset(256, 64, 1, 0)["test"]["prompt"] and name.endswith("(held-out split)")
    with pytest.raises(ValueError, match="eval_split train"):
        evaluate_script.EvaluateArguments(model_name_or_path="m", eval_split="train", eval_dataset_name="aime24")


def fake_vllm(monkeypatch, tokenizer) -> tuple[list[dict], list[list[list[int]]]]:
    """Installs a stand-in `vllm` module (vLLM cannot run here) whose `LLM` answers every prompt with its last digit
    then EOS. Returns the keyword arguments each `LLM` was built with and the prompt token ids of each `generate`.

    An `LLM` built from a local folder also records the config it found there as `loaded_config`, as vLLM reads it
    when it is built."""
    engines, calls = [], []

    class LLM:
        def __init__(self, model, seed, **kwargs):
            engines.append(dict(model=model, seed=seed, **kwargs))
            if Path(model, "config.json").is_file():
                engines[-1]["loaded_config"] = json.loads(Path(model, "config.json").read_text())

        def get_tokenizer(self):
            return tokenizer

        def generate(self, prompts, params, use_tqdm=True):
            calls.append([prompt["prompt_token_ids"] for prompt in prompts])
            outputs = []
            for prompt in prompts:
                digit = _last_digit(tokenizer.decode(prompt["prompt_token_ids"]))
                ids = [tokenizer.convert_tokens_to_ids(digit), tokenizer.eos_token_id]
                outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids)] * params.n))
            return outputs

    class SamplingParams:
        def __init__(self, n, **kwargs):
            self.n, self.kwargs = n, kwargs

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    return engines, calls


def test_the_vllm_path_gets_the_same_views_from_one_engine(tmp_path, monkeypatch, tokenizer):
    engines, calls = fake_vllm(monkeypatch, tokenizer)
    data, output = _write_problems(tmp_path / "amc.jsonl"), tmp_path / "report.json"
    evaluate_script.main([
        "--model_name_or_path", "some/model", "--dataset_name", str(data), "--dataset_source", "amc23",
        "--use_vllm", "true", "--view", "both", "--eval_k", "2", "--eval_seed", "7",
        "--eval_reward_func", "lenient_math_accuracy_reward", "--output_file", str(output),
    ])  # fmt: skip
    assert engines == [dict(model="some/model", seed=7, gpu_memory_utilization=0.9, tensor_parallel_size=1)]
    rows = evaluate_script.evaluation_dataset(evaluate_script.EvaluateArguments(
        model_name_or_path="m", dataset_name=str(data), dataset_source="amc23"
    ))[0]  # fmt: skip
    teacher = [build_teacher_prompt(r["prompt"], r["privileged_context"], DEFAULT_TEACHER_TEMPLATE, "c") for r in rows]
    # The engine gets token ids, built as the transformers back-end builds them: one generate call per view.
    assert calls == [[_chat_ids(tokenizer, p) for p in rows["prompt"]], [_chat_ids(tokenizer, p) for p in teacher]]
    headroom = json.loads(output.read_text())["headroom"]
    assert (headroom["student_accuracy"], headroom["teacher_accuracy"], headroom["ratio"]) == (0.25, 1.0, 4.0)


def test_standard_errors_against_hand_values():
    assert binomial_se(0.25, 12) == pytest.approx(0.125)  # sqrt(0.1875 / 12)
    assert binomial_se(0.5, 16) == pytest.approx(0.125)
    assert binomial_se(0.0, 5) == binomial_se(1.0, 5) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        binomial_se(0.5, 0)

    def report(accuracy, num_problems=25, k=4):
        return {"accuracy": accuracy, "num_problems": num_problems, "k": k}

    h = teacher_headroom(report(0.2), report(0.5))  # 100 samples per view
    assert h["samples"] == 100 and h["ratio"] == pytest.approx(2.5) and h["difference"] == pytest.approx(0.3)
    assert h["student_se"] == pytest.approx(0.04) and h["teacher_se"] == pytest.approx(0.05)
    assert h["difference_se"] == pytest.approx(math.sqrt(0.0041))  # 0.0640
    assert h["teacher_better"] and h["warning"] is None
    h = teacher_headroom(report(0.2), report(0.3))  # +0.1 with SE sqrt(0.0016 + 0.0021) = 0.0608: under 2 SE
    assert h["difference_se"] == pytest.approx(math.sqrt(0.0037)) and not h["teacher_better"]
    assert "ratio 1.50" in h["warning"] and "little to distil" in h["warning"]
    h = teacher_headroom(report(0.3), report(0.2))  # a worse teacher
    assert h["ratio"] == pytest.approx(2 / 3) and not h["teacher_better"]
    h = teacher_headroom(report(0.0), report(0.0))
    assert h["ratio"] is None and h["difference_se"] == 0.0 and not h["teacher_better"]
    h = teacher_headroom(report(0.0), report(0.5))
    assert h["ratio"] is None and h["teacher_better"]
    with pytest.raises(ValueError, match="same problems with the same k"):
        teacher_headroom(report(0.2), report(0.5, k=2))
