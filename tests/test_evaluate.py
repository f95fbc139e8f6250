"""mean@k evaluation on the tiny model: aggregation, sampling hygiene, and the `sdpg-evaluate` script."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model

from sdpg_trl.data import arithmetic_dataset
from sdpg_trl.evaluation import MeanAtKArguments, evaluate_mean_at_k
from sdpg_trl.scripts.evaluate import main as evaluate_main


@pytest.fixture(scope="module")
def problems():
    return arithmetic_dataset(num_train=0, num_test=3, level=1, seed=0)["test"]


def _first_problem_right(completions, answer, first, **kwargs):
    return [1.0 if gold == first else 0.0 for gold in answer]


def test_accuracy_is_the_mean_over_problems_of_the_mean_over_samples(tokenizer, problems):
    model = make_model(tokenizer)
    first = problems[0]["answer"]
    calls = []

    def reward(completions, answer, **kwargs):
        calls.append(len(completions))
        # Sample j of every problem is right iff j is even: 2 of k=4 per problem -> 0.5 overall.
        return [1.0 if j % 2 == 0 else 0.0 for j in range(len(completions))]

    report = evaluate_mean_at_k(model, tokenizer, problems, k=4, max_new_tokens=5, batch_size=5, reward_func=reward)
    assert report["accuracy"] == 0.5 and report["num_problems"] == 3 and report["k"] == 4
    assert calls == [4, 4, 4]  # the verifier sees each problem's k samples with that problem's gold answer
    assert [p["answer"] for p in report["problems"]] == problems["answer"]
    assert all(len(p["completions"]) == 4 and 1 <= p["mean_completion_tokens"] <= 5 for p in report["problems"])

    report = evaluate_mean_at_k(
        model, tokenizer, problems, k=2, max_new_tokens=3,
        reward_func=lambda completions, answer, **kw: _first_problem_right(completions, answer, first),
    )  # fmt: skip
    assert report["accuracy"] == pytest.approx(1 / 3)
    assert [p["accuracy"] for p in report["problems"]] == [1.0, 0.0, 0.0]


def test_sampling_is_seeded_and_leaves_the_caller_untouched(tokenizer, problems):
    model = make_model(tokenizer).train()
    tokenizer.padding_side = "right"

    def run(seed):
        report = evaluate_mean_at_k(model, tokenizer, problems, k=3, max_new_tokens=6, seed=seed, progress=False)
        return [p["completions"] for p in report["problems"]]

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = run(seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG (a training run's sampling) is untouched
    assert run(seed=0) == first and run(seed=1) != first
    assert model.training and tokenizer.padding_side == "right"


def test_greedy_evaluation_repeats_one_completion(tokenizer, problems):
    report = evaluate_mean_at_k(make_model(tokenizer), tokenizer, problems, k=3, temperature=0.0, max_new_tokens=4)
    assert all(len(set(p["completions"])) == 1 for p in report["problems"])


def test_bad_settings_fail_before_generating(tokenizer, problems):
    with pytest.raises(ValueError, match="k, batch_size and max_new_tokens must be >= 1"):
        evaluate_mean_at_k(make_model(tokenizer), tokenizer, problems, k=0)
    with pytest.raises(ValueError, match="eval_temperature"):
        MeanAtKArguments(eval_temperature=-1.0)
    with pytest.raises(ValueError, match="Unknown reward function 'exact'"):
        MeanAtKArguments(eval_reward_func="exact")


def test_evaluate_script_writes_a_json_report_for_a_local_data_set(tiny_model_dir, tmp_path):
    data = tmp_path / "amc.jsonl"
    data.write_text("".join(json.dumps({"question": f"what is {i} plus 1 ?", "answer": float(i + 1)}) + "\n" for i in range(2)))
    output = tmp_path / "out" / "report.json"
    argv = [
        "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--dataset_source", "amc23",
        "--eval_k", "2", "--eval_max_new_tokens", "3", "--output_file", str(output), "--dtype", "float32",
    ]  # fmt: skip
    assert evaluate_main(argv) is None  # a console script's return value becomes its exit status
    report = json.loads(output.read_text())
    assert report["model"] == tiny_model_dir and report["num_problems"] == 2 and report["k"] == 2
    assert [p["answer"] for p in report["problems"]] == ["1", "2"]
    # A random tiny model cannot write the right number: the verifier must say so.
    assert report["accuracy"] == 0.0 and all(p["rewards"] == [0.0, 0.0] for p in report["problems"])
