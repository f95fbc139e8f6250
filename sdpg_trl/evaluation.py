"""mean@k evaluation (pass@1 averaged over k samples per problem, SPEC 4), standalone or every N training steps, of
the student's prompts or of the teacher's (the student prompt plus the privileged context), and the headroom between
the two views.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from ._trl_compat import unwrap_model_for_generation
from .rewards import get_reward_funcs, math_accuracy_reward
from .teacher import teacher_view_dataset

RewardFunc = Callable[..., list[float]]
PROMPT_VIEWS = ("student", "teacher")  # what `prompt_view` maps a data set to
VIEW_CHOICES = (*PROMPT_VIEWS, "both")  # sdpg-evaluate --view


@dataclass
class MeanAtKArguments:
    """Settings of mean@k evaluation (SPEC 4: k=32, temperature 1.0), shared by `sdpg-evaluate` and `sdpg-train`.

    Args:
        eval_k: samples per problem.
        eval_temperature: sampling temperature (`0` = greedy).
        eval_top_p: nucleus sampling threshold.
        eval_max_new_tokens: generation budget per sample.
        eval_generation_batch_size: sequences per `generate` call (transformers back-end).
        eval_reward_func: registry name or dotted path of the verifier (see `sdpg_trl.rewards`).
        eval_seed: sampling seed, so that two evaluations of one model agree.
    """

    eval_k: int = field(default=32, metadata={"help": "Samples per problem (mean@k)."})
    eval_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 is greedy."})
    eval_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    eval_max_new_tokens: int = field(default=4096, metadata={"help": "Maximum tokens generated per sample."})
    eval_generation_batch_size: int = field(default=64, metadata={"help": "Sequences per generate call."})
    eval_reward_func: str = field(default="math_accuracy_reward", metadata={"help": "Verifier used to score."})
    eval_seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def __post_init__(self):
        for name in ("eval_k", "eval_max_new_tokens", "eval_generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.eval_temperature < 0:
            raise ValueError(f"eval_temperature must be >= 0, got {self.eval_temperature}.")
        get_reward_funcs([self.eval_reward_func])  # fail now, not after training, on an unknown name

    def eval_kwargs(self) -> dict:
        """Keyword arguments of `evaluate_mean_at_k` (and `MeanAtKCallback`) for these settings."""
        return dict(
            k=self.eval_k,
            temperature=self.eval_temperature,
            top_p=self.eval_top_p,
            max_new_tokens=self.eval_max_new_tokens,
            batch_size=self.eval_generation_batch_size,
            reward_func=get_reward_funcs([self.eval_reward_func])[0],
            seed=self.eval_seed,
        )


def _summary(problems: list[dict], k: int, temperature: float, max_new_tokens: int) -> dict:
    """Aggregate per-problem results into the evaluation report (shared by both generation back-ends)."""
    problems = sorted(problems, key=lambda p: p["index"])
    num = len(problems)
    return {
        "accuracy": sum(p["accuracy"] for p in problems) / num if num else 0.0,
        "mean_completion_tokens": sum(p["mean_completion_tokens"] for p in problems) / num if num else 0.0,
        "num_problems": num,
        "k": k,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "problems": problems,
    }


def _score(index: int, row: dict, texts: list[str], lengths: list[int], reward_func: RewardFunc) -> dict:
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    rewards = reward_func(completions=completions, answer=[row["answer"]] * len(texts))
    return {
        "index": index,
        "answer": row["answer"],
        "accuracy": sum(rewards) / len(rewards),
        "mean_completion_tokens": sum(lengths) / len(lengths),
        "rewards": rewards,
        "completions": texts,
    }


@torch.no_grad()
def evaluate_mean_at_k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    k: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 4096,
    batch_size: int = 64,
    reward_func: RewardFunc = math_accuracy_reward,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """mean@k of `model` on `dataset` (rows with `prompt` and `answer`, see `sdpg_trl.data`) with transformers.

    Each problem is sampled `k` times at `temperature` (`0` = greedy); its score is the fraction of samples
    `reward_func` marks correct, and `accuracy` is the mean over problems. Under `accelerate launch` the problems are
    split over processes and the result gathered, so every process gets the same report.

    Returns a JSON-serialisable dict: `accuracy`, `mean_completion_tokens`, `num_problems`, `k`, `temperature`,
    `max_new_tokens`, and `problems` (per problem: `answer`, `accuracy`, `rewards`, `completions`).
    """
    if k < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"k, batch_size and max_new_tokens must be >= 1, got {k}, {batch_size}, {max_new_tokens}.")
    state = PartialState()
    was_training = model.training
    model.eval()
    # Decoder-only batch generation needs left padding; restore the caller's setting afterwards.
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    # fork_rng: seeding here must not change the sampling of a training run this evaluation interrupts.
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        # Padding gives every process the same number of problems, hence of `generate` calls: sharded models
        # (ZeRO-3, FSDP) need all processes in each forward. The repeated problem is dropped after the gather.
        indices = list(range(len(dataset)))
        with torch.random.fork_rng(devices=devices), state.split_between_processes(indices, apply_padding=True) as mine:
            torch.manual_seed(seed + state.process_index)
            jobs = [slot for slot in range(len(mine)) for _ in range(k)]  # a slot is one of this process's problems
            texts: list[list[str]] = [[] for _ in mine]
            lengths: list[list[int]] = [[] for _ in mine]
            bar = tqdm(total=len(jobs), desc="mean@k eval", unit="sample", disable=not progress or not state.is_main_process)
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start : start + batch_size]
                prompts = [
                    tokenizer.apply_chat_template(dataset[mine[slot]]["prompt"], add_generation_prompt=True, tokenize=False)
                    for slot in batch
                ]
                # The chat template already holds the special tokens; adding them again would double the BOS.
                inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, **sampling)
                for slot, ids in zip(batch, output[:, inputs["input_ids"].shape[1] :], strict=True):
                    # Count tokens up to and including the first EOS: what a trainer would count as the response.
                    eos = (ids == tokenizer.eos_token_id).nonzero()
                    length = int(eos[0]) + 1 if len(eos) else len(ids)
                    texts[slot].append(tokenizer.decode(ids[:length], skip_special_tokens=True))
                    lengths[slot].append(length)
                bar.update(len(batch))
            bar.close()
            scored = [
                _score(index, dataset[index], texts[slot], lengths[slot], reward_func) for slot, index in enumerate(mine)
            ]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    if state.num_processes > 1:
        scored = list({problem["index"]: problem for problem in reversed(gather_object(scored))}.values())
    return _summary(scored, k, temperature, max_new_tokens)


def evaluate_mean_at_k_vllm(
    model: Any,  # a model name or path, or a vllm.LLM
    dataset: Dataset,
    k: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 4096,
    reward_func: RewardFunc = math_accuracy_reward,
    seed: int = 0,
    **llm_kwargs,
) -> dict:
    """Same report as `evaluate_mean_at_k`, with generation by vLLM (`pip install sdpg-trl[vllm]`, GPU only).

    `model` is a Hub id or local path, from which a `vllm.LLM` is built with `llm_kwargs` (e.g. `tensor_parallel_size`,
    `gpu_memory_utilization`, `max_model_len`), or an `LLM` already built, so that several evaluations (the student
    and the teacher view) share one engine.
    """
    from vllm import LLM, SamplingParams

    if isinstance(model, str):
        llm = LLM(model=model, seed=seed, **llm_kwargs)
    elif llm_kwargs:
        raise ValueError(f"llm_kwargs {sorted(llm_kwargs)} only apply when a model name is given, not an LLM.")
    else:
        llm = model
    params = SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
    outputs = llm.chat([row["prompt"] for row in dataset], params, use_tqdm=True)
    problems = [
        _score(
            index,
            dataset[index],
            [sample.text for sample in output.outputs],
            [len(sample.token_ids) for sample in output.outputs],
            reward_func,
        )
        for index, output in enumerate(outputs)
    ]
    return _summary(problems, k, temperature, max_new_tokens)


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


class MeanAtKCallback(TrainerCallback):
    """Runs `evaluate_mean_at_k` every `eval_every` optimiser steps (and before the first) and logs `eval/accuracy`
    and `eval/completion_length` into `trainer.state.log_history` and the `report_to` back-ends.

    Like TRL's `LogCompletionsCallback`, it holds the trainer: it needs its model, tokenizer and logger.
    """

    def __init__(
        self,
        trainer: Trainer,
        dataset: Dataset,
        eval_every: int,
        eval_on_start: bool = True,
        **eval_kwargs,
    ):
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 step, got {eval_every}.")
        self.trainer, self.dataset, self.eval_every = trainer, dataset, eval_every
        self.eval_on_start, self.eval_kwargs = eval_on_start, eval_kwargs

    def _evaluate(self) -> None:
        trainer, args = self.trainer, self.trainer.args
        # As GRPOTrainer does for its rollouts: gathers ZeRO-3 shards, and turns gradient checkpointing (which
        # disables the KV cache) off while generating.
        with unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        ) as model:
            report = evaluate_mean_at_k(model, trainer.processing_class, self.dataset, **self.eval_kwargs)
        # Transformers' own Trainer.log, not GRPOTrainer.log: the latter flushes the buffered training metrics into
        # whatever it logs, which would move them from the next training log entry into this one. Trainer.log also
        # clears `should_log`, which would cancel this step's training log entry, hence the restore.
        should_log = trainer.control.should_log
        Trainer.log(
            trainer, {"eval/accuracy": report["accuracy"], "eval/completion_length": report["mean_completion_tokens"]}
        )
        trainer.control.should_log = should_log

    def on_train_begin(self, args, state, control, **kwargs):
        if self.eval_on_start and state.global_step == 0:
            self._evaluate()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_every == 0:
            self._evaluate()
