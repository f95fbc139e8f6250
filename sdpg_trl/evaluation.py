"""mean@k evaluation (pass@1 averaged over k samples per problem, SPEC 4), standalone or every N training steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from ._trl_compat import unwrap_model_for_generation
from .rewards import get_reward_funcs, math_accuracy_reward

RewardFunc = Callable[..., list[float]]


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
    model_name_or_path: str,
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

    `llm_kwargs` go to `vllm.LLM` (e.g. `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`).
    """
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_name_or_path, seed=seed, **llm_kwargs)
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
