"""mean@k evaluation on the tiny model: aggregation, sampling hygiene, prompts as the trainer builds them, the
in-training callback (its back-ends and metric names), and the `sdpg-evaluate` script."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import CHAT_TEMPLATE, make_dataset, make_model, make_tokenizer
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from test_headroom import _write_problems, fake_vllm, last_digit_model  # noqa: F401 - a fixture
from transformers import AutoModelForCausalLM

from sdpg_trl import SDPGConfig, SDPGTrainer
from sdpg_trl._trl_compat import VLLM_SAMPLING_ATTRIBUTES
from sdpg_trl.data import arithmetic_dataset
from sdpg_trl.evaluation import MeanAtKArguments, MeanAtKCallback, eval_metrics, evaluate_mean_at_k, prompt_token_ids
from sdpg_trl.models import adapter_base_model, merge_adapter
from sdpg_trl.rewards import lenient_math_accuracy_reward
from sdpg_trl.scripts.evaluate import main as evaluate_main

# The test chat template, plus a `hint` chat-template kwarg that it writes after the assistant header.
HINT = "{% if hint is defined %}{{ 'hint ' + hint + ' ' }}{% endif %}"
HINT_TEMPLATE = CHAT_TEMPLATE.replace("'<|assistant|> ' }}", "'<|assistant|> ' }}" + HINT)


def _last_digit_ids(tokenizer, prompt_ids: list[int]) -> list[int]:
    """What the stand-in generators below answer: the prompt's last digit, then EOS."""
    digit = re.findall(r"\d", tokenizer.decode(prompt_ids))[-1]
    return [tokenizer.convert_tokens_to_ids(digit), tokenizer.eos_token_id]


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
    data.write_text(
        "".join(json.dumps({"question": f"what is {i} plus 1 ?", "answer": float(i + 1)}) + "\n" for i in range(2))
    )
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


def test_prompts_are_built_as_the_trainer_builds_them(tokenizer):
    hinted = make_tokenizer()
    hinted.chat_template = HINT_TEMPLATE
    chat = [{"role": "user", "content": "what is 1 plus 1 ?"}]
    plain, templated = prompt_token_ids(hinted, chat), prompt_token_ids(hinted, chat, {"hint": "2"})
    assert hinted.decode(templated) == hinted.decode(plain) + " hint 2"  # chat_template_kwargs reach the template
    assert prompt_token_ids(hinted, "what is 1 plus 1 ?") == hinted("what is 1 plus 1 ?")["input_ids"]  # plain text


def test_plain_text_prompts_give_plain_text_completions_and_rewards_get_every_column(tokenizer):
    model, seen = make_model(tokenizer), []
    model.generate = lambda input_ids, attention_mask, **kw: torch.cat(
        [input_ids, torch.tensor([_last_digit_ids(tokenizer, ids[m.bool()].tolist()) for ids, m in
                                  zip(input_ids, attention_mask, strict=True)])], dim=1)  # fmt: skip
    rows = Dataset.from_list([{"prompt": "what is 2 plus 1 ?", "solution": "1", "level": 3}])

    def reward(prompts, completions, completion_ids, solution, level, **kwargs):
        seen.append((prompts, completions, completion_ids, solution, level))
        return lenient_math_accuracy_reward(completions, solution=solution)

    report = evaluate_mean_at_k(model, tokenizer, rows, k=2, max_new_tokens=2, reward_func=reward, progress=False)
    one = tokenizer.convert_tokens_to_ids("1")
    assert seen == [(["what is 2 plus 1 ?"] * 2, ["1", "1"], [[one, tokenizer.eos_token_id]] * 2, ["1", "1"], [3, 3])]
    assert report["accuracy"] == 1.0 and report["problems"][0]["answer"] == "1"  # TRL's gold column


def test_eval_metrics_follow_trainer_evaluates_names():
    report = {"accuracy": 0.5, "mean_completion_tokens": 7.0}
    assert eval_metrics({None: report}) == {"eval_accuracy": 0.5, "eval_completion_length": 7.0}
    assert eval_metrics({"aime24": report, "amc": {"accuracy": 0.25, "mean_completion_tokens": 3.0}}) == {
        "eval_aime24_accuracy": 0.5, "eval_aime24_completion_length": 7.0,
        "eval_amc_accuracy": 0.25, "eval_amc_completion_length": 3.0,
    }  # fmt: skip


class FakeVLLMGeneration:
    """GRPOTrainer's `vllm_generation` (a TRL `VLLMGeneration`) without vLLM: answers each prompt's last digit."""

    def __init__(self, tokenizer):
        self.tokenizer, self.synced, self.calls = tokenizer, 0, []
        self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty = 0.7, 0.9, 5, 0.1, 1.2
        self.max_completion_length, self.generation_kwargs = 4, {}

    def sync_weights(self):
        self.synced += 1

    def generate(self, prompts, images, num_generations):
        self.calls.append((prompts, num_generations, {name: getattr(self, name) for name in VLLM_SAMPLING_ATTRIBUTES}))
        return prompts, [_last_digit_ids(self.tokenizer, ids) for ids in prompts], None, None


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_the_callback_evaluates_named_sets_with_the_trainers_engine_and_chat_template_kwargs(
    tmp_path, tiny_model_dir, backend
):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = HINT_TEMPLATE
    args = SDPGConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
        report_to="none", bf16=False, use_cpu=True, chat_template_kwargs={"hint": "1"},
    )  # fmt: skip
    trainer = SDPGTrainer(model=tiny_model_dir, reward_funcs=lenient_math_accuracy_reward, args=args,
                          train_dataset=make_dataset(), processing_class=tokenizer)  # fmt: skip
    generated = []

    def generate(input_ids, attention_mask, **kwargs):
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
        generated.extend(prompts)
        return torch.cat([input_ids, torch.tensor([_last_digit_ids(tokenizer, ids) for ids in prompts])], dim=1)

    trainer.model.generate = generate
    engine = FakeVLLMGeneration(tokenizer)
    if backend == "vllm":  # what GRPOTrainer sets up with use_vllm=True, which needs vLLM itself
        trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, engine, -1
    # Answers 1, 3, 5, 7 and 1: with the hint "1" after the assistant header, only the gold answer "1" is right.
    sets = {"four": make_dataset(4), "one": make_dataset(1)}
    callback = MeanAtKCallback(trainer, sets, eval_every=1, k=2, temperature=0.5, top_p=0.8, max_new_tokens=3,
                               batch_size=4, reward_func=lenient_math_accuracy_reward, seed=0)  # fmt: skip
    callback._evaluate()

    assert trainer.state.log_history[-1] == {
        "eval_four_accuracy": 0.25, "eval_four_completion_length": 2.0, "eval_one_accuracy": 1.0,
        "eval_one_completion_length": 2.0, "epoch": 0, "step": 0,
    }  # fmt: skip
    expected = [prompt_token_ids(tokenizer, row["prompt"], {"hint": "1"}) for data in sets.values() for row in data]
    if backend == "transformers":
        assert sorted(generated) == sorted(ids for ids in expected for _ in range(2)) and engine.calls == []
        return
    assert generated == []  # the engine generated, not model.generate
    assert [prompts for prompts, _, _ in engine.calls] == [[ids for ids in expected[:4] for _ in range(2)],
                                                           [expected[4]] * 2]  # fmt: skip
    assert all(n == 2 for _, n, _ in engine.calls)
    assert engine.calls[0][2] == dict(temperature=0.5, top_p=0.8, top_k=0, min_p=0.0, repetition_penalty=1.0,
                                      max_completion_length=3, generation_kwargs={})  # fmt: skip
    assert engine.synced == 1  # the current weights, once for this step


def test_evaluate_without_a_model_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate_main([])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage:")
    assert "the following arguments are required: --model_name_or_path" in err


@pytest.mark.parametrize("use_vllm", [False, True])
def test_evaluate_passes_chat_template_kwargs_to_either_back_end(tmp_path, monkeypatch, tokenizer, last_digit_model,
                                                                 use_vllm):  # fmt: skip
    monkeypatch.setattr(tokenizer, "chat_template", HINT_TEMPLATE)
    _, calls = fake_vllm(monkeypatch, tokenizer)
    data, output = _write_problems(tmp_path / "amc.jsonl"), tmp_path / "report.json"
    evaluate_main([
        "--model_name_or_path", "tiny", "--dataset_name", str(data), "--dataset_source", "amc23", "--eval_k", "1",
        "--eval_max_new_tokens", "2", "--eval_reward_func", "lenient_math_accuracy_reward", "--output_file",
        str(output), "--use_vllm", str(use_vllm), "--chat_template_kwargs", '{"hint": "4"}',
    ])  # fmt: skip
    seen = calls[0] if use_vllm else last_digit_model.seen
    assert len(seen) == 4 and all(tokenizer.decode(ids).endswith(" hint 4") for ids in seen)  # after the header
    # The prompt's last digit is now the hint's, which answers "what is 3 plus 1 ?", not "what is 0 plus 1 ?".
    assert [p["accuracy"] for p in json.loads(output.read_text())["problems"]] == [0.0, 0.0, 0.0, 1.0]


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path) -> str:
    """A LoRA adapter of the tiny model as `save_model` writes one, with weights that change its output."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    return str(tmp_path / "adapter")


def test_an_adapter_folder_merges_into_its_base_model(tiny_model_dir, adapter_dir, tmp_path):
    assert adapter_base_model(adapter_dir) == tiny_model_dir and adapter_base_model(tiny_model_dir) is None
    merged = merge_adapter(adapter_dir, tmp_path / "merged", dtype=torch.float32)
    ids = torch.tensor([[5, 9, 12, 7]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    merged_logits = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    torch.testing.assert_close(merged_logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)  # the adapter is in the weights
    assert (merged / "tokenizer_config.json").is_file() and not (merged / "adapter_config.json").exists()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        merge_adapter(tiny_model_dir, tmp_path / "again")


def test_evaluate_with_vllm_loads_an_adapter_merged_into_its_base(tiny_model_dir, adapter_dir, tmp_path, monkeypatch,
                                                                  tokenizer):  # fmt: skip
    engines, calls = fake_vllm(monkeypatch, tokenizer)
    data, output = _write_problems(tmp_path / "amc.jsonl"), tmp_path / "report.json"
    argv = ["--dataset_name", str(data), "--dataset_source", "amc23", "--eval_k", "1", "--use_vllm", "true",
            "--output_file", str(output), "--dtype", "float32"]  # fmt: skip
    evaluate_main(["--model_name_or_path", adapter_dir, *argv])
    [engine] = engines
    merged = Path(engine["model"])
    assert merged.name.startswith("sdpg-merged-") and not merged.exists()  # built from it, then cleaned up
    assert engine["loaded_config"]["num_hidden_layers"] == 2 and len(calls) == 1
    evaluate_main(["--model_name_or_path", tiny_model_dir, *argv])  # a full checkpoint is loaded as it is
    assert engines[1]["model"] == tiny_model_dir
