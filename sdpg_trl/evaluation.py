"""mean@k evaluation (pass@1 averaged over k samples per problem, SPEC 4), standalone or every N training steps, of
the student's prompts or of the teacher's (the student prompt plus the privileged context), and the headroom between
the two views.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from ._trl_compat import pad, unwrap_model_for_generation, vllm_generate
from .rewards import GOLD_COLUMNS, get_reward_funcs, math_accuracy_reward
from .teacher import teacher_view_dataset

RewardFunc = Callable[..., list[float]]
PROMPT_VIEWS = ("student", "teacher")  # what `prompt_view` maps a data set to
VIEW_CHOICES = (*PROMPT_VIEWS, "both")  # sdpg-evaluate --view

# The KV cache one `model.generate` call may fill when no batch size is given (`generation_batch_size`): a tenth of
# an 80 GB GPU, so that an evaluation during training fits beside the weights, gradients and optimiser states.
GENERATION_KV_CACHE_BYTES = 8 * 2**30


def generation_batch_size(
    config: Any,
    dtype: torch.dtype,
    prompt_length: int,
    max_new_tokens: int,
    budget_bytes: int = GENERATION_KV_CACHE_BYTES,
) -> int:
    """Sequences per `model.generate` call whose KV cache fits `budget_bytes`: the most sequences of `prompt_length`
    + `max_new_tokens` tokens, at 2 (keys and values) x layers x key-value heads x head size x `dtype`'s bytes per
    token, that fit the budget, and at least 1. Fixed by the model and the settings, not by the free memory, so that
    a seeded evaluation samples the same completions on any GPU. Qwen3-4B in bf16 (36 layers, 8 key-value heads of
    128) keeps 144 KiB per token: 13 sequences of 200 + 4096 tokens (7.8 GiB), where 64 held 38 GiB."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
    return max(1, budget_bytes // (per_token * (prompt_length + max_new_tokens)))


@dataclass
class MeanAtKArguments:
    """Settings of mean@k evaluation (SPEC 4: k=32, temperature 1.0), shared by `sdpg-evaluate` and `sdpg-train`.

    Args:
        eval_k: samples per problem.
        eval_temperature: sampling temperature (`0` = greedy).
        eval_top_p: nucleus sampling threshold.
        eval_max_new_tokens: generation budget per sample.
        eval_generation_batch_size: sequences per `generate` call (transformers back-end); None: as many as fit
            `GENERATION_KV_CACHE_BYTES` of KV cache (`generation_batch_size`).
        eval_reward_func: registry name or dotted path of the verifier (see `sdpg_trl.rewards`).
        eval_seed: sampling seed, so that two evaluations of one model agree.
    """

    eval_k: int = field(default=32, metadata={"help": "Samples per problem (mean@k)."})
    eval_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 is greedy."})
    eval_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    eval_max_new_tokens: int = field(default=4096, metadata={"help": "Maximum tokens generated per sample."})
    eval_generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Sequences per generate call; by default as many as fit 8 GiB of KV cache."},
    )
    eval_reward_func: str = field(default="math_accuracy_reward", metadata={"help": "Verifier used to score."})
    eval_seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def __post_init__(self):
        for name in ("eval_k", "eval_max_new_tokens", "eval_generation_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.eval_temperature < 0:
            raise ValueError(f"eval_temperature must be >= 0, got {self.eval_temperature}.")
        get_reward_funcs([self.eval_reward_func])  # fail now, not after training, on an unknown name

    def eval_kwargs(self) -> dict:
        """These settings as the fields of `MeanAtKSettings`: keyword arguments of `evaluate_mean_at_k`,
        `evaluate_mean_at_k_vllm` and `MeanAtKCallback`."""
        return dict(
            k=self.eval_k,
            temperature=self.eval_temperature,
            top_p=self.eval_top_p,
            max_new_tokens=self.eval_max_new_tokens,
            batch_size=self.eval_generation_batch_size,
            reward_func=get_reward_funcs([self.eval_reward_func])[0],
            seed=self.eval_seed,
        )


# The generation back-end of `mean_at_k`: (token ids of some prompts, samples per prompt) -> the completions' token
# ids, prompt-major (the samples of the first prompt, then those of the second, ...).
Sampler = Callable[[list[list[int]], int], list[list[int]]]


@dataclass(frozen=True)
class MeanAtKSettings:
    """The settings of one mean@k evaluation, whichever back-end samples (`MeanAtKArguments.eval_kwargs` gives them).

    Args:
        k: samples per problem.
        temperature: sampling temperature (`0` = greedy with transformers).
        top_p: nucleus sampling threshold.
        max_new_tokens: generation budget per sample.
        batch_size: sequences per `model.generate` call (transformers only: vLLM schedules its own batches); None:
            as many as fit `GENERATION_KV_CACHE_BYTES` of KV cache (`generation_batch_size`).
        reward_func: the verifier, called as GRPOTrainer calls a reward function.
        seed: sampling seed (plus the process index) of transformers and of a vLLM engine built here; a trainer's
            engine seeds itself.
        chat_template_kwargs: passed to the chat template with the prompt, e.g. `{"enable_thinking": False}`.
    """

    k: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    batch_size: int | None = None
    reward_func: RewardFunc = math_accuracy_reward
    seed: int = 0
    chat_template_kwargs: dict | None = None

    def __post_init__(self):
        if self.k < 1 or (self.batch_size is not None and self.batch_size < 1) or self.max_new_tokens < 1:
            raise ValueError(
                "k, batch_size and max_new_tokens must be >= 1, got "
                f"{self.k}, {self.batch_size}, {self.max_new_tokens}."
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], chat_template_kwargs: dict | None = None
) -> list[int]:
    """Token ids of one prompt as GRPOTrainer builds them: a conversational prompt through the chat template, with
    `chat_template_kwargs` (e.g. `{"enable_thinking": False}`) and the generation prompt; a plain-text one as it is."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {})
    )
    # The chat template already holds the special tokens; adding them again would double the BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _gold(row: dict) -> Any:
    return next((row[column] for column in GOLD_COLUMNS if column in row), None)


def _score(
    index: int, row: dict, completion_ids: list[list[int]], tokenizer: PreTrainedTokenizerBase, reward_func: RewardFunc
) -> dict:
    """One problem's entry of the report, its completions scored as GRPOTrainer calls a reward function."""
    texts, lengths = [], []
    for ids in completion_ids:
        # Up to and including the first EOS: what a trainer counts as the response.
        length = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
        texts.append(tokenizer.decode(ids[:length], skip_special_tokens=True))
        lengths.append(length)
    n = len(texts)
    completions = texts if isinstance(row["prompt"], str) else [[{"role": "assistant", "content": t}] for t in texts]
    columns = {key: [value] * n for key, value in row.items() if key != "prompt"}  # the gold answer among them
    rewards = reward_func(
        prompts=[row["prompt"]] * n, completions=completions, completion_ids=completion_ids, **columns
    )
    return {
        "index": index,
        "answer": _gold(row),
        "accuracy": sum(rewards) / n,
        "mean_completion_tokens": sum(lengths) / n,
        "rewards": rewards,
        "completions": texts,
    }


def mean_at_k(
    sample: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    settings: MeanAtKSettings,
    problems_per_call: int = 1,
    progress: bool = True,
) -> dict:
    """mean@k of `dataset` (rows with `prompt` and a gold answer, README "Data contract") with completions from
    `sample`, any generation back-end (`generate_sampler`, `vllm_sampler`, `trainer_vllm_sampler`), which samples
    with `settings`.

    Each problem is sampled `settings.k` times, `problems_per_call` problems per `sample` call; its score is the
    fraction of samples `settings.reward_func` marks correct (called as GRPOTrainer calls it: prompts, completions,
    completion ids and every other column of the row), and `accuracy` is the mean over problems. Under
    `accelerate launch` the problems are split over processes, padded so that every process calls `sample` as often
    and with as many prompts (sharded models and vLLM's server mode need every process in each call), and the result
    gathered, so every process gets the same report.

    Returns a JSON-serialisable dict: `accuracy`, `mean_completion_tokens`, `num_problems`, `k`, `temperature`,
    `max_new_tokens`, and `problems` (per problem: `answer`, `accuracy`, `rewards`, `completions`).
    """
    k, state = settings.k, PartialState()
    indices = list(range(len(dataset)))
    with state.split_between_processes(indices, apply_padding=True) as mine:
        disable = not progress or not state.is_main_process
        bar = tqdm(total=len(mine) * k, desc="mean@k eval", unit="sample", disable=disable)
        scored = []
        for start in range(0, len(mine), problems_per_call):
            rows = [(index, dataset[index]) for index in mine[start : start + problems_per_call]]
            prompts = [prompt_token_ids(tokenizer, row["prompt"], settings.chat_template_kwargs) for _, row in rows]
            completions = [list(ids) for ids in sample(prompts, k)]
            if len(completions) != len(rows) * k:
                raise RuntimeError(f"The sampler returned {len(completions)} completions for {len(rows)} x {k}.")
            for slot, (index, row) in enumerate(rows):
                completion_ids = completions[slot * k : (slot + 1) * k]
                scored.append(_score(index, row, completion_ids, tokenizer, settings.reward_func))
            bar.update(len(rows) * k)
        bar.close()
    if state.num_processes > 1:
        scored = list({problem["index"]: problem for problem in reversed(gather_object(scored))}.values())
    problems = sorted(scored, key=lambda p: p["index"])
    num = len(problems)
    return {
        "accuracy": sum(p["accuracy"] for p in problems) / num if num else 0.0,
        "mean_completion_tokens": sum(p["mean_completion_tokens"] for p in problems) / num if num else 0.0,
        "num_problems": num,
        "k": k,
        "temperature": settings.temperature,
        "max_new_tokens": settings.max_new_tokens,
        "problems": problems,
    }


@contextmanager
def generate_sampler(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: MeanAtKSettings
) -> Iterator[Sampler]:
    """A sampler generating with transformers (`model.generate`), `settings.batch_size` sequences per call (by
    default `generation_batch_size` for the call's longest prompt), at `settings.temperature` (`0` = greedy), seeded
    with `settings.seed` plus the process index. While it is open the model is in eval mode, and the caller's random
    state is set aside: seeding here must not change the sampling of a training run this evaluation interrupts."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if settings.temperature > 0:
        sampling = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    else:
        sampling = dict(do_sample=False)

    def sample(prompts: list[list[int]], n: int) -> list[list[int]]:
        jobs = [torch.tensor(ids) for ids in prompts for _ in range(n)]
        size = _sequences_per_call(model, settings, max(map(len, prompts), default=0))
        completions = []
        for start in range(0, len(jobs), size):
            batch = jobs[start : start + size]
            # Decoder-only batch generation needs left padding.
            input_ids = pad(batch, padding_value=pad_token_id, padding_side="left").to(model.device)
            attention_mask = pad([torch.ones_like(ids) for ids in batch], padding_value=0, padding_side="left")
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask.to(model.device),
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_token_id,
                **sampling,
            )
            completions.extend(output[:, input_ids.shape[1] :].tolist())
        return completions

    was_training = model.training
    model.eval()
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(settings.seed + PartialState().process_index)
            yield sample
    finally:
        model.train(was_training)


def _sequences_per_call(model: PreTrainedModel, settings: MeanAtKSettings, prompt_length: int) -> int:
    """`settings.batch_size`, or by default `generation_batch_size` of `model` for prompts of `prompt_length`."""
    if settings.batch_size is not None:
        return settings.batch_size
    return generation_batch_size(
        model.config, model.dtype, prompt_length, settings.max_new_tokens, budget_bytes=GENERATION_KV_CACHE_BYTES
    )


def vllm_sampler(llm: Any, settings: MeanAtKSettings) -> Sampler:
    """A sampler generating with a `vllm.LLM` (`pip install sdpg-trl[vllm]`, GPU only), seeded with `settings.seed`."""
    from vllm import SamplingParams

    params = dict(temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_new_tokens)

    def sample(prompts: list[list[int]], n: int) -> list[list[int]]:
        sampling = SamplingParams(n=n, seed=settings.seed, **params)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling, use_tqdm=True)
        return [list(completion.token_ids) for output in outputs for completion in output.outputs]

    return sample


def trainer_vllm_sampler(trainer: Trainer, settings: MeanAtKSettings) -> Sampler:
    """A sampler generating with a GRPOTrainer's own vLLM engine (`use_vllm`, colocate or server mode), which gets
    the policy's current weights first, as before a rollout; every process takes part, as in a rollout. The engine
    seeds and batches itself, so `settings.seed` and `settings.batch_size` do not apply."""
    return partial(
        vllm_generate,
        trainer,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_new_tokens,
    )


def evaluate_mean_at_k(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, *, progress: bool = True, **settings
) -> dict:
    """`mean_at_k` of `model` on `dataset` with transformers' `generate` (`generate_sampler`); `settings` are the
    fields of `MeanAtKSettings` (`k=32`, `temperature=1.0`, `top_p`, `max_new_tokens`, `batch_size`, `reward_func`,
    `seed`, `chat_template_kwargs`)."""
    options = MeanAtKSettings(**settings)
    with generate_sampler(model, tokenizer, options) as sample:
        per_call = max(1, _sequences_per_call(model, options, prompt_length=0) // options.k)
        return mean_at_k(sample, tokenizer, dataset, options, problems_per_call=per_call, progress=progress)


def evaluate_mean_at_k_vllm(model: Any, dataset: Dataset, llm_kwargs: dict | None = None, **settings) -> dict:
    """`mean_at_k` with vLLM (`vllm_sampler`), from the same prompt token ids as `evaluate_mean_at_k` (the engine's
    own tokenizer and chat template); `settings` are the fields of `MeanAtKSettings` (`batch_size` does not apply).

    `model` is a Hub id or local path, from which a `vllm.LLM` is built with `settings.seed` and `llm_kwargs` (e.g.
    `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`), or an `LLM` already built, so that several
    evaluations (the student and the teacher view) share one engine.
    """
    options = MeanAtKSettings(**settings)
    if isinstance(model, str):
        from vllm import LLM

        model = LLM(model=model, seed=options.seed, **(llm_kwargs or {}))
    elif llm_kwargs:
        raise ValueError(f"llm_kwargs {sorted(llm_kwargs)} only apply when a model name is given, not an LLM.")
    sample = vllm_sampler(model, options)
    return mean_at_k(
        sample, model.get_tokenizer(), dataset, options, problems_per_call=max(1, len(dataset)), progress=False
    )


def prompt_view(
    dataset: Dataset, view: str, teacher_template: str, context_column: str, name: str = "dataset"
) -> Dataset:
    """`dataset` with the prompts of one view: `"student"` returns it unchanged, `"teacher"` gives every row the
    teacher's prompt (`sdpg_trl.teacher.teacher_view_dataset`: the student prompt plus `teacher_template` filled with
    the row's `context_column`, exactly what `SDPGTrainer` scores the teacher on). The other columns, the answer
    included, are unchanged, so either view goes to `evaluate_mean_at_k` or `evaluate_mean_at_k_vllm` as it is.

    Raises `ValueError` naming `name` and the column when a row has no privileged context.
    """
    if view == "student":
        return dataset
    if view == "teacher":
        return teacher_view_dataset(dataset, teacher_template, context_column, name)
    raise ValueError(f"Unknown prompt view {view!r}; expected one of {PROMPT_VIEWS}.")


def binomial_se(p: float, n: int) -> float:
    """Standard error `sqrt(p (1 - p) / n)` of an accuracy `p` measured on `n` samples, each counted as independent.

    Samples of one problem are correlated, so on a set of few problems this understates the spread across problems.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def teacher_headroom(student: dict, teacher: dict) -> dict:
    """How much better the teacher view scores than the student view, from two reports of the same problems.

    Returns `student_accuracy`, `teacher_accuracy`, `ratio` (teacher / student; `None` when the student scores 0),
    `difference` (teacher - student), the binomial standard error of each accuracy over its `samples` samples
    (`binomial_se`) and of the difference (`sqrt(se_s^2 + se_t^2)`, the two views sampled independently),
    `teacher_better` (the difference exceeds 2 standard errors, which implies ratio > 1) and `warning` (the message
    to show when it does not, else `None`).
    """
    if (student["num_problems"], student["k"]) != (teacher["num_problems"], teacher["k"]):
        raise ValueError(
            "The two views must be evaluated on the same problems with the same k; got "
            f"{student['num_problems']} x {student['k']} (student) and {teacher['num_problems']} x {teacher['k']} "
            "(teacher)."
        )
    samples = student["num_problems"] * student["k"]
    p_s, p_t = student["accuracy"], teacher["accuracy"]
    se_s, se_t = binomial_se(p_s, samples), binomial_se(p_t, samples)
    difference, difference_se = p_t - p_s, math.sqrt(se_s**2 + se_t**2)
    ratio = p_t / p_s if p_s > 0 else None
    better = difference > 2 * difference_se
    warning = None
    if not better:
        ratio_text = "undefined (student accuracy 0)" if ratio is None else f"{ratio:.2f}"
        warning = (
            f"the teacher view is not clearly better than the student (ratio {ratio_text}, difference "
            f"{difference:+.3f} with standard error {difference_se:.3f}): SDPG has little to distil on this task with "
            "this template."
        )
    return {
        "student_accuracy": p_s,
        "teacher_accuracy": p_t,
        "ratio": ratio,
        "difference": difference,
        "student_se": se_s,
        "teacher_se": se_t,
        "difference_se": difference_se,
        "samples": samples,
        "num_problems": student["num_problems"],
        "k": student["k"],
        "teacher_better": better,
        "warning": warning,
    }


def format_headroom(headroom: dict) -> str:
    """`teacher_headroom`'s result as the lines `sdpg-evaluate --view both` and the demo print."""
    k, n = headroom["k"], headroom["samples"]
    ratio = "n/a (student 0)" if headroom["ratio"] is None else f"{headroom['ratio']:.2f}"
    lines = [
        f"mean@{k} on {headroom['num_problems']} problems ({n} samples per view), +- one standard error:",
        f"  student view  {headroom['student_accuracy']:.4f} +- {headroom['student_se']:.4f}",
        f"  teacher view  {headroom['teacher_accuracy']:.4f} +- {headroom['teacher_se']:.4f}",
        f"  teacher / student {ratio}; teacher - student {headroom['difference']:+.4f} +- "
        f"{headroom['difference_se']:.4f}",
    ]
    if headroom["warning"]:
        lines.append(f"WARNING: {headroom['warning']}")
    return "\n".join(lines)


def evaluate_prompt_views(
    evaluate: Callable[[Dataset], dict],
    dataset: Dataset,
    view: str = "student",
    teacher_template: str | None = None,
    context_column: str | None = None,
    name: str = "dataset",
) -> dict:
    """Evaluate `dataset` in one prompt view or both, with `evaluate` (one data set -> a mean@k report).

    `evaluate` is called once per view with the same settings, hence the same seeded sampling; every view's data set
    is built (and its context column checked) before the first call, so that a wrong column fails before any model
    is loaded or anything generated. Returns `evaluate`'s report with `view` added for a single view, and for
    `"both"` a report holding `student`, `teacher` and their `headroom` (`teacher_headroom`). Reports of a view
    that includes the teacher also carry `teacher_template` and `context_column`.
    """
    if view not in VIEW_CHOICES:
        raise ValueError(f"Unknown view {view!r}; expected one of {VIEW_CHOICES}.")
    views = PROMPT_VIEWS if view == "both" else (view,)
    if "teacher" in views and (teacher_template is None or context_column is None):
        raise ValueError("The teacher view needs teacher_template and context_column.")
    datasets = {v: prompt_view(dataset, v, teacher_template, context_column, name) for v in views}
    reports = {v: evaluate(data) for v, data in datasets.items()}
    report: dict[str, Any] = {"view": view}
    if "teacher" in views:
        report.update(teacher_template=teacher_template, context_column=context_column)
    if view == "both":
        return {**report, "headroom": teacher_headroom(reports["student"], reports["teacher"]), **reports}
    return {**report, **reports[view]}


def eval_metrics(reports: dict[str | None, dict]) -> dict[str, float]:
    """Mean@k reports as logged metrics, named as `Trainer.evaluate` names them (`metric_key_prefix`):
    `eval_accuracy` and `eval_completion_length` for the one unnamed set (key None), `eval_<name>_accuracy` and
    `eval_<name>_completion_length` for each named one. Trackers file `eval_*` under their evaluation section."""
    metrics = {}
    for name, report in reports.items():
        prefix = "eval" if name is None else f"eval_{name}"
        metrics[f"{prefix}_accuracy"] = report["accuracy"]
        metrics[f"{prefix}_completion_length"] = report["mean_completion_tokens"]
    return metrics


class MeanAtKCallback(TrainerCallback):
    """Runs mean@k on held-out data every `eval_every` optimiser steps (and before the first) and logs it
    (`eval_metrics`: `eval_accuracy`, or `eval_<name>_accuracy` per named set, and the completion lengths) into
    `trainer.state.log_history` and the `report_to` back-ends.

    `eval_dataset` is what `Trainer` takes as its own: one `Dataset`, or a dict of them by name. Prompts are built
    as the trainer builds its own, with `SDPGConfig.chat_template_kwargs`. Generation uses the trainer's vLLM engine
    when it has one (`use_vllm`, colocate or server mode), with the current weights, as a rollout does (there
    `eval_seed` and `eval_generation_batch_size` do not apply: the engine seeds and batches itself); otherwise
    `model.generate`. Like TRL's `LogCompletionsCallback`, it holds the trainer: it needs its model, tokenizer,
    engine and logger.
    """

    def __init__(
        self,
        trainer: Trainer,
        eval_dataset: Dataset | dict[str, Dataset],
        eval_every: int,
        eval_on_start: bool = True,
        progress: bool = True,
        **settings,
    ):
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 step, got {eval_every}.")
        self.trainer, self.eval_every, self.eval_on_start, self.progress = trainer, eval_every, eval_on_start, progress
        self.settings = MeanAtKSettings(**settings)  # the trainer's chat_template_kwargs are added at each evaluation
        self.eval_sets = dict(eval_dataset) if isinstance(eval_dataset, dict) else {None: eval_dataset}

    def _evaluate(self) -> None:
        trainer, args = self.trainer, self.trainer.args
        settings = replace(self.settings, chat_template_kwargs=args.chat_template_kwargs or {})
        tokenizer = trainer.processing_class
        if getattr(trainer, "use_vllm", False):  # GRPOTrainer's; a plain Trainer has no engine
            sample = trainer_vllm_sampler(trainer, settings)
            reports = {
                name: mean_at_k(
                    sample, tokenizer, data, settings, problems_per_call=max(1, len(data)), progress=self.progress
                )
                for name, data in self.eval_sets.items()
            }
        else:
            # As GRPOTrainer does for its rollouts: gathers ZeRO-3 shards, and turns gradient checkpointing (which
            # disables the KV cache) off while generating.
            with unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                gather_deepspeed3_params=args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            ) as model:
                # Each set seeded on its own, as `sdpg-evaluate` samples it.
                reports = {
                    name: evaluate_mean_at_k(model, tokenizer, data, progress=self.progress, **asdict(settings))
                    for name, data in self.eval_sets.items()
                }
        # Transformers' own Trainer.log, not GRPOTrainer.log: the latter flushes the buffered training metrics into
        # whatever it logs, which would move them from the next training log entry into this one. Trainer.log also
        # clears `should_log`, which would cancel this step's training log entry, hence the restore.
        should_log = trainer.control.should_log
        Trainer.log(trainer, eval_metrics(reports))
        trainer.control.should_log = should_log

    def on_train_begin(self, args, state, control, **kwargs):
        if self.eval_on_start and state.global_step == 0:
            self._evaluate()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_every == 0:
            self._evaluate()
