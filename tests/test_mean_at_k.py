"""mean@k is one function over any sampler with one settings object; the back-ends differ only in their sampler."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import make_model

from sdpg_trl.data import arithmetic_dataset
from sdpg_trl.evaluation import (
    MeanAtKArguments,
    MeanAtKSettings,
    evaluate_mean_at_k,
    evaluate_mean_at_k_vllm,
    generate_sampler,
    mean_at_k,
)


def test_mean_at_k_scores_any_sampler_with_its_settings(tokenizer):
    problems = arithmetic_dataset(num_train=0, num_test=2, level=1, seed=0)["test"]
    calls = []

    def answer_first_problem(prompts: list[list[int]], n: int) -> list[list[int]]:
        calls.append((len(prompts), n))
        digits = tokenizer(" ".join(problems[0]["answer"]), add_special_tokens=False)["input_ids"]
        return [digits + [tokenizer.eos_token_id]] * (len(prompts) * n)

    def exact(completions, answer, **kwargs):  # the word-level tokenizer decodes digits with spaces between them
        return [float(c[0]["content"].replace(" ", "") == gold) for c, gold in zip(completions, answer, strict=True)]

    settings = MeanAtKSettings(k=3, temperature=0.5, max_new_tokens=7, reward_func=exact)
    report = mean_at_k(answer_first_problem, tokenizer, problems, settings, problems_per_call=2, progress=False)
    assert calls == [(2, 3)]  # both problems in one call, k samples each
    assert [p["accuracy"] for p in report["problems"]] == [1.0, 0.0] and report["accuracy"] == 0.5
    assert (report["k"], report["temperature"], report["max_new_tokens"]) == (3, 0.5, 7)


def test_settings_are_checked_once_for_every_back_end(tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="k, batch_size and max_new_tokens must be >= 1"):
        MeanAtKSettings(k=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        MeanAtKSettings(temperature=-0.5)
    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM would be imported after the settings are checked
    with pytest.raises(ValueError, match="k, batch_size and max_new_tokens must be >= 1"):
        evaluate_mean_at_k_vllm("any/model", [], k=0)
    # The script arguments give exactly the settings' fields.
    assert MeanAtKSettings(**MeanAtKArguments(eval_k=2, eval_reward_func="accuracy_reward").eval_kwargs()).k == 2


def test_the_generate_sampler_restores_the_models_mode_and_the_callers_random_state(tokenizer):
    model = make_model(tokenizer).train()
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    with generate_sampler(model, tokenizer, MeanAtKSettings(k=2, max_new_tokens=2)) as sample:
        assert not model.training and not torch.is_grad_enabled()
        assert len(sample([[5, 6]], 2)) == 2
    assert model.training and torch.equal(torch.rand(1), expected)
    report = evaluate_mean_at_k(model, tokenizer, arithmetic_dataset(0, 1)["test"], k=2, max_new_tokens=2)
    assert report["num_problems"] == 1 and len(report["problems"][0]["completions"]) == 2
