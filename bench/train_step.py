"""Wall time of whole training steps (generation, rewards, reference pass, loss, backward, optimiser step) on the
demo model, SmolLM2-135M-Instruct with its real weights, for GRPO or SDPG. Prints one JSON line.

Both methods train on the same prompts with the same seed, sampling settings and rewards; SDPG's beta(k) is held at
its peak from step 0 so every step pays for the teacher pass. The first step is excluded from the median (warmup).

Usage: python -m bench.train_step --method sdpg [--steps 4 --batch 4 --completion-len 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from datasets import Dataset
from transformers import TrainerCallback

from bench.harness import MemoryProbe, alternating_reward, device
from bench.loss_step import DISTILL_COEF, KL_COEF
from sdpg_trl.models import load_model_and_tokenizer, smollm2_checkpoint


class StepTimer(TrainerCallback):
    """Wall and process-CPU seconds of each optimiser step, from `on_step_begin` (before generation) to
    `on_step_end` (after the optimiser step)."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._start = self._cpu_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def math_prompts(rows: int) -> Dataset:
    """Conversational arithmetic prompts with their answer as privileged context."""
    return Dataset.from_dict(
        {
            "prompt": [
                [{"role": "user", "content": f"What is {17 * i + 3} + {29 * i + 5}? Put the answer in \\boxed{{}}."}]
                for i in range(rows)
            ],
            "privileged_context": [f"The answer is {46 * i + 8}." for i in range(rows)],
        }
    )


def build_trainer(method: str, output_dir: str, steps: int, batch: int, completion_len: int, timer: StepTimer):
    model, tokenizer = load_model_and_tokenizer(str(smollm2_checkpoint()))
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        num_generations=batch,  # one prompt per step, `batch` rollouts of it
        max_completion_length=completion_len,
        max_steps=steps,
        learning_rate=1e-6,
        loss_type="dapo",
        beta=KL_COEF,
        temperature=1.0,
        # TRL defaults to gradient checkpointing, which also turns the KV cache off during generation; a 135M model
        # needs neither, and cached generation keeps the (unchanged) sampling from swamping the update's cost.
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=device().type == "cpu",
    )
    dataset = math_prompts(steps)
    if method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common)
        trainer_cls = GRPOTrainer
    else:
        from sdpg_trl import SDPGConfig, SDPGTrainer

        args = SDPGConfig(**common, distill_coef=DISTILL_COEF, distill_warmup_steps=0, distill_decay_steps=0)
        trainer_cls = SDPGTrainer
    return trainer_cls(
        model, alternating_reward, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("grpo", "sdpg"), required=True)
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps; the first is warmup")
    parser.add_argument("--batch", type=int, default=4, help="rollouts per step (one group)")
    parser.add_argument("--completion-len", type=int, default=64)
    args = parser.parse_args()

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(args.method, output_dir, args.steps, args.batch, args.completion_len, timer)
        probe = MemoryProbe(device())
        probe.start()
        trainer.train()
    history = [log for log in trainer.state.log_history if "completions/mean_length" in log]
    print(
        json.dumps(
            {
                "method": args.method,
                "device": device().type,
                "batch_size": args.batch,
                "max_completion_len": args.completion_len,
                "step_times_s": timer.times,
                "median_step_s": statistics.median(timer.times[1:]),
                "step_cpu_times_s": timer.cpu_times,
                "median_step_cpu_s": statistics.median(timer.cpu_times[1:]),
                "mean_completion_len": statistics.mean(log["completions/mean_length"] for log in history),
                **probe.result(),
            }
        )
    )


if __name__ == "__main__":
    main()
